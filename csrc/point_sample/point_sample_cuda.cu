// CUDA kernels of bilinear point sampling; the per-point math is the CPU's
// (point_sample.h). Forward: one thread per output value; backward: one thread per
// (row, channel, point) adding into the feature gradient atomically, and one thread per
// point for the coordinate gradient. Features F may be float16 / bfloat16: read as float32
// (S), float32 arithmetic, output in F; the feature gradient accumulates in float32.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "point_sample/point_sample.h"
#include "point_sample/point_sample_checks.h"

namespace d2seg {

namespace {

constexpr int kThreads = 256;

inline int num_blocks(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8));
}

template <typename F, typename S>
__global__ void sample_points_forward_kernel(PointRows<S> rows, const F* feat, F* out,
                                             int64_t R, int64_t N, int64_t C) {
  const int64_t P = rows.P, HW = rows.H * rows.W, n_out = R * C * P;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n_out;
       i += (int64_t)blockDim.x * gridDim.x) {
    const int64_t p = i % P, rc = i / P, c = rc % C, r = rc / C;
    const int64_t n = rows.image(r);
    CUDA_KERNEL_ASSERT(n >= 0 && n < N);
    S ix, iy;
    rows.pixel(r, p, ix, iy);
    const auto corners = bilinear_corners(ix, iy, rows.H, rows.W);
    out[i] = static_cast<F>(bilinear_value(feat + (n * C + c) * HW, corners.offset, corners.weight));
  }
}

template <typename F, typename S>
__global__ void sample_points_grad_feat_kernel(PointRows<S> rows, const F* go, S* grad_feat,
                                               int64_t R, int64_t N, int64_t C) {
  const int64_t P = rows.P, HW = rows.H * rows.W, n_out = R * C * P;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n_out;
       i += (int64_t)blockDim.x * gridDim.x) {
    const int64_t p = i % P, rc = i / P, c = rc % C, r = rc / C;
    const int64_t n = rows.image(r);
    CUDA_KERNEL_ASSERT(n >= 0 && n < N);
    S ix, iy;
    rows.pixel(r, p, ix, iy);
    const auto corners = bilinear_corners(ix, iy, rows.H, rows.W);
    S* plane = grad_feat + (n * C + c) * HW;
    const S g = static_cast<S>(go[i]);
    for (int k = 0; k < 4; ++k)
      if (corners.inside[k]) atomicAdd(plane + corners.offset[k], corners.weight[k] * g);
  }
}

template <typename F, typename S>
__global__ void sample_points_grad_coords_kernel(PointRows<S> rows, const F* feat, const F* go,
                                                 S* grad_coords, int64_t R, int64_t C) {
  const int64_t P = rows.P, HW = rows.H * rows.W;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < R * P;
       i += (int64_t)blockDim.x * gridDim.x) {
    const int64_t r = i / P, p = i % P;
    S ix, iy;
    rows.pixel(r, p, ix, iy);
    const auto corners = bilinear_corners(ix, iy, rows.H, rows.W);
    S gx = S(0), gy = S(0);
    for (int64_t c = 0; c < C; ++c)
      bilinear_coord_grad(feat + (rows.image(r) * C + c) * HW, corners,
                          static_cast<S>(go[(r * C + c) * P + p]), gx, gy);
    grad_coords[i * 2] = gx * static_cast<S>(rows.W);
    grad_coords[i * 2 + 1] = gy * static_cast<S>(rows.H);
  }
}

}  // namespace

at::Tensor sample_points_cuda(const at::Tensor& features, const at::Tensor& coords,
                              const c10::optional<at::Tensor>& boxes,
                              const c10::optional<at::Tensor>& batch_index,
                              double feature_scale) {
  check_sample_points_args(features, coords, boxes, batch_index);
  at::cuda::CUDAGuard guard(features.device());
  auto feat = features.contiguous();
  auto pts = points_in_compute_dtype(coords, feat);
  auto bx = points_in_compute_dtype(contiguous_or_undefined(boxes), feat);
  auto bi = contiguous_or_undefined(batch_index);
  const int64_t R = pts.size(0), P = pts.size(1), N = feat.size(0), C = feat.size(1);
  auto out = at::empty({R, C, P}, feat.options());
  if (out.numel() == 0) return out;
  if (feat.size(2) * feat.size(3) == 0) return out.zero_();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "sample_points_cuda", [&] {
    using S = at::opmath_type<scalar_t>;
    auto rows = make_rows<S>(feat, pts, bx, bi, feature_scale);
    sample_points_forward_kernel<scalar_t, S><<<num_blocks(out.numel()), kThreads, 0, stream>>>(
        rows, feat.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), R, N, C);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> sample_points_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& features, const at::Tensor& coords,
    const c10::optional<at::Tensor>& boxes, const c10::optional<at::Tensor>& batch_index,
    double feature_scale, bool coords_grad) {
  check_sample_points_args(features, coords, boxes, batch_index);
  D2SEG_CHECK_SAME_DEVICE(grad_out, features);
  at::cuda::CUDAGuard guard(features.device());
  const int64_t R = coords.size(0), P = coords.size(1), N = features.size(0);
  const int64_t C = features.size(1);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({R, C, P}),
              "sample_points_backward: grad_out must be ", at::IntArrayRef({R, C, P}), ", got ",
              grad_out.sizes());
  TORCH_CHECK(!(coords_grad && boxes.has_value() && boxes->defined()),
              "sample_points_backward: no point-coordinate gradient in the box form");
  TORCH_CHECK(grad_out.scalar_type() == features.scalar_type(),
              "sample_points_backward: grad_out must have the dtype of the features, got ",
              grad_out.scalar_type(), " and ", features.scalar_type());
  auto go = grad_out.contiguous();
  auto feat = features.contiguous();
  auto pts = points_in_compute_dtype(coords, feat);
  auto bx = points_in_compute_dtype(contiguous_or_undefined(boxes), feat);
  auto bi = contiguous_or_undefined(batch_index);
  // accumulated in the arithmetic type, narrowed to the features' / coords' dtypes at the end
  auto grad_feat = at::zeros(feat.sizes(), pts.options());
  auto grad_coords = at::zeros_like(pts);
  auto narrowed = [&] {
    return std::make_tuple(cast_to(grad_feat, feat.scalar_type()),
                           cast_to(grad_coords, coords.scalar_type()));
  };
  if (go.numel() == 0 || feat.size(2) * feat.size(3) == 0) return narrowed();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "sample_points_backward_cuda", [&] {
    using S = at::opmath_type<scalar_t>;
    auto rows = make_rows<S>(feat, pts, bx, bi, feature_scale);
    sample_points_grad_feat_kernel<scalar_t, S><<<num_blocks(go.numel()), kThreads, 0, stream>>>(
        rows, go.data_ptr<scalar_t>(), grad_feat.data_ptr<S>(), R, N, C);
    if (coords_grad)
      sample_points_grad_coords_kernel<scalar_t, S><<<num_blocks(R * P), kThreads, 0, stream>>>(
          rows, feat.data_ptr<scalar_t>(), go.data_ptr<scalar_t>(), grad_coords.data_ptr<S>(), R,
          C);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return narrowed();
}

TORCH_LIBRARY_IMPL(d2seg, CUDA, m) {
  m.impl("sample_points", &sample_points_cuda);
  m.impl("sample_points_backward", &sample_points_backward_cuda);
}

}  // namespace d2seg
