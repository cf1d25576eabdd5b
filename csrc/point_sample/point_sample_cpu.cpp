// CPU kernels of bilinear point sampling, and the ops' schemas.
//
// Shapes: N images, C channels, H x W pixels, R rows of points (images, or boxes with the
// index of their image), P points per row.
//
// The corners and weights of every point are computed once (point_sample.h), then every
// channel plane is gathered from (forward) or scattered into (backward) with them. The
// backward is parallel over (image, channel), so each gradient plane has a single writer.
//
// Precision: the features F may be float16 / bfloat16; they are read as float32 (S), the
// arithmetic (coords, weights, gradients) is float32, and the output is F. The feature
// gradient is accumulated in float32 and narrowed at the end.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#include <ATen/OpMathType.h>

#include "core/cpu_dispatch.h"
#include "point_sample/point_sample.h"
#include "point_sample/point_sample_checks.h"

namespace d2seg {

namespace {

// Corner offsets and weights of every point, (R * P, 4) each; ATen tensors, so that they
// count in PyTorch's memory statistics.
template <typename S>
struct PointTable {
  at::Tensor offset_t, weight_t;
  const int64_t* offset;
  const S* weight;
};

template <typename S>
PointTable<S> make_table(const PointRows<S>& rows, int64_t R, const at::Tensor& like) {
  PointTable<S> t;
  const int64_t P = rows.P;
  t.offset_t = at::empty({R * P, 4}, like.options().dtype(at::kLong));
  t.weight_t = at::empty({R * P, 4}, like.options());
  int64_t* offset = t.offset_t.template data_ptr<int64_t>();
  S* weight = t.weight_t.template data_ptr<S>();
  at::parallel_for(0, R * P, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      S ix, iy;
      rows.pixel(i / P, i % P, ix, iy);
      const auto c = bilinear_corners(ix, iy, rows.H, rows.W);
      for (int k = 0; k < 4; ++k) {
        offset[i * 4 + k] = c.offset[k];
        weight[i * 4 + k] = c.weight[k];
      }
    }
  });
  t.offset = offset;
  t.weight = weight;
  return t;
}

void check_batch_index(const at::Tensor& batch_index, int64_t N) {
  if (!batch_index.defined() || batch_index.numel() == 0) return;
  const int64_t lo = batch_index.min().item<int64_t>(), hi = batch_index.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < N, "sample_points: batch_index must be in [0, N) with N = ", N,
              " images, got values in [", lo, ", ", hi, "]");
}

}  // namespace

at::Tensor sample_points_cpu(const at::Tensor& features, const at::Tensor& coords,
                             const c10::optional<at::Tensor>& boxes,
                             const c10::optional<at::Tensor>& batch_index,
                             double feature_scale) {
  check_sample_points_args(features, coords, boxes, batch_index);
  auto feat = features.contiguous();
  auto pts = points_in_compute_dtype(coords, feat);
  auto bx = points_in_compute_dtype(contiguous_or_undefined(boxes), feat);
  auto bi = contiguous_or_undefined(batch_index);
  check_batch_index(bi, feat.size(0));
  const int64_t R = pts.size(0), P = pts.size(1), C = feat.size(1);
  const int64_t HW = feat.size(2) * feat.size(3);
  auto out = at::empty({R, C, P}, feat.options());
  if (out.numel() == 0) return out;
  if (HW == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "sample_points_cpu", [&] {
    using F = scalar_t;
    using S = at::opmath_type<F>;
    const auto rows = make_rows<S>(feat, pts, bx, bi, feature_scale);
    const auto table = make_table(rows, R, pts);
    const F* f = feat.data_ptr<F>();
    F* o = out.data_ptr<F>();
    at::parallel_for(0, R * C, std::max<int64_t>(1, 4096 / std::max<int64_t>(P, 1)),
                     [&](int64_t begin, int64_t end) {
      run_best([&] {
        for (int64_t rc = begin; rc < end; ++rc) {
          const int64_t r = rc / C, c = rc % C;
          const F* plane = f + (rows.image(r) * C + c) * HW;
          const int64_t* off = table.offset + r * P * 4;
          const S* w = table.weight + r * P * 4;
          F* orow = o + rc * P;
          for (int64_t p = 0; p < P; ++p)
            orow[p] = static_cast<F>(bilinear_value(plane, off + p * 4, w + p * 4));
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sample_points_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& features, const at::Tensor& coords,
    const c10::optional<at::Tensor>& boxes, const c10::optional<at::Tensor>& batch_index,
    double feature_scale, bool coords_grad) {
  check_sample_points_args(features, coords, boxes, batch_index);
  const int64_t R = coords.size(0), P = coords.size(1), N = features.size(0);
  const int64_t C = features.size(1), H = features.size(2), W = features.size(3), HW = H * W;
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
  check_batch_index(bi, N);
  // accumulated in the arithmetic type, narrowed to the features' / coords' dtypes at the end
  auto grad_feat = at::zeros(feat.sizes(), pts.options());
  auto grad_coords = at::zeros_like(pts);
  auto narrowed = [&] {
    return std::make_tuple(cast_to(grad_feat, feat.scalar_type()),
                           cast_to(grad_coords, coords.scalar_type()));
  };
  if (go.numel() == 0 || HW == 0) return narrowed();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "sample_points_backward_cpu", [&] {
    using F = scalar_t;
    using S = at::opmath_type<F>;
    const auto rows = make_rows<S>(feat, pts, bx, bi, feature_scale);
    const auto table = make_table(rows, R, pts);
    std::vector<std::vector<int64_t>> of_image(N);
    for (int64_t r = 0; r < R; ++r) of_image[rows.image(r)].push_back(r);
    const F* g = go.data_ptr<F>();
    S* gf = grad_feat.data_ptr<S>();
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      run_best([&] {
        for (int64_t nc = begin; nc < end; ++nc) {
          const int64_t n = nc / C, c = nc % C;
          S* plane = gf + nc * HW;
          for (int64_t r : of_image[n]) {
            const int64_t* off = table.offset + r * P * 4;
            const S* w = table.weight + r * P * 4;
            const F* grow = g + (r * C + c) * P;
            for (int64_t p = 0; p < P; ++p) {
              const S gv = static_cast<S>(grow[p]);
              for (int k = 0; k < 4; ++k)
                if (w[p * 4 + k] != S(0)) plane[off[p * 4 + k]] += w[p * 4 + k] * gv;
            }
          }
        }
      });
    });
    if (coords_grad) {
      const F* f = feat.data_ptr<F>();
      S* gc = grad_coords.data_ptr<S>();
      at::parallel_for(0, R * P, 256, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t r = i / P, p = i % P;
          S ix, iy;
          rows.pixel(r, p, ix, iy);
          const auto corners = bilinear_corners(ix, iy, H, W);
          S gx = 0, gy = 0;
          for (int64_t c = 0; c < C; ++c)
            bilinear_coord_grad(f + (rows.image(r) * C + c) * HW, corners,
                                static_cast<S>(g[(r * C + c) * P + p]), gx, gy);
          // d pixel / d point = size (grid = 2p - 1, pixel = ((grid + 1) size - 1) / 2).
          gc[i * 2] = gx * static_cast<S>(W);
          gc[i * 2 + 1] = gy * static_cast<S>(H);
        }
      });
    }
  });
  return narrowed();
}

TORCH_LIBRARY_FRAGMENT(d2seg, m) {
  m.def(
      "sample_points(Tensor features, Tensor coords, Tensor? boxes, Tensor? batch_index, "
      "float feature_scale) -> Tensor");
  m.def(
      "sample_points_backward(Tensor grad_out, Tensor features, Tensor coords, Tensor? boxes, "
      "Tensor? batch_index, float feature_scale, bool coords_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(d2seg, CPU, m) {
  m.impl("sample_points", &sample_points_cpu);
  m.impl("sample_points_backward", &sample_points_backward_cpu);
}

}  // namespace d2seg
