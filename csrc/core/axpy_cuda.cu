#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "core/axpy.h"

namespace d2seg {

template <typename scalar_t>
__global__ void axpy_kernel(int64_t n, const scalar_t* x, const scalar_t* y, scalar_t alpha,
                            scalar_t* out) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x) {
    out[i] = axpy_element(x[i], y[i], alpha);
  }
}

at::Tensor axpy_cuda(const at::Tensor& x, const at::Tensor& y, double alpha) {
  TORCH_CHECK(x.sizes() == y.sizes(), "axpy: x and y must have the same shape, got ",
              x.sizes(), " and ", y.sizes());
  D2SEG_CHECK_SAME_DEVICE(x, y);
  at::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto yc = y.contiguous();
  auto out = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return out;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 4096));
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "axpy_cuda", [&] {
    axpy_kernel<scalar_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        n, xc.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>(), static_cast<scalar_t>(alpha),
        out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(d2seg, CUDA, m) { m.impl("axpy", &axpy_cuda); }

}  // namespace d2seg
