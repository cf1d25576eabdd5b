#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "core/axpy.h"

namespace d2seg {

at::Tensor axpy_cpu(const at::Tensor& x, const at::Tensor& y, double alpha) {
  TORCH_CHECK(x.sizes() == y.sizes(), "axpy: x and y must have the same shape, got ",
              x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "axpy: x and y must have the same dtype");
  auto xc = x.contiguous();
  auto yc = y.contiguous();
  auto out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "axpy_cpu", [&] {
    const scalar_t* px = xc.data_ptr<scalar_t>();
    const scalar_t* py = yc.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const scalar_t a = static_cast<scalar_t>(alpha);
    at::parallel_for(0, xc.numel(), 2048, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) po[i] = axpy_element(px[i], py[i], a);
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(d2seg, CPU, m) { m.impl("axpy", &axpy_cpu); }

}  // namespace d2seg
