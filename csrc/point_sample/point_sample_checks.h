// Argument checks and host-side set-up of the point-sampling ops, shared by the CPU and
// CUDA entry points.
#pragma once
#include <torch/types.h>

#include "core/macros.h"
#include "core/precision.h"
#include "point_sample/point_sample.h"

namespace d2seg {

inline void check_sample_points_args(const at::Tensor& features, const at::Tensor& coords,
                                     const c10::optional<at::Tensor>& boxes,
                                     const c10::optional<at::Tensor>& batch_index) {
  TORCH_CHECK(features.dim() == 4, "sample_points: features must be (N, C, H, W), got ",
              features.sizes());
  TORCH_CHECK(features.is_floating_point() &&
                  aux_dtype_ok(features.scalar_type(), coords.scalar_type()),
              "sample_points: point coords must have the floating dtype of the features (or "
              "float32 beside float16 / bfloat16 features), got features ",
              features.scalar_type(), " and coords ", coords.scalar_type());
  TORCH_CHECK(coords.dim() == 3 && coords.size(2) == 2,
              "sample_points: point coords must be (R, P, 2), got ", coords.sizes());
  D2SEG_CHECK_SAME_DEVICE(features, coords);
  const bool has_boxes = boxes.has_value() && boxes->defined();
  const bool has_index = batch_index.has_value() && batch_index->defined();
  TORCH_CHECK(has_boxes == has_index,
              "sample_points: boxes and batch_index must be given together");
  if (has_boxes) {
    const auto& b = *boxes;
    const auto& i = *batch_index;
    TORCH_CHECK(b.dim() == 2 && b.size(0) == coords.size(0) && b.size(1) == 4,
                "sample_points: boxes must be (R, 4) with R = ", coords.size(0), ", got ",
                b.sizes());
    TORCH_CHECK(b.scalar_type() == coords.scalar_type(),
                "sample_points: boxes must have the dtype of the point coords, got boxes ",
                b.scalar_type(), " and coords ", coords.scalar_type());
    TORCH_CHECK(i.dim() == 1 && i.size(0) == coords.size(0) && i.scalar_type() == at::kLong,
                "sample_points: batch_index must be int64 (R,) with R = ", coords.size(0),
                ", got ", i.sizes(), " ", i.scalar_type());
    D2SEG_CHECK_SAME_DEVICE(features, b);
    D2SEG_CHECK_SAME_DEVICE(features, i);
  } else {
    TORCH_CHECK(coords.size(0) == features.size(0),
                "sample_points: point coords (N, P, 2) must have N = features.size(0) = ",
                features.size(0), ", got ", coords.size(0));
  }
}


// The kernels' view of one call's points (device pointers when the tensors are on a GPU);
// coords and boxes in the arithmetic type S (see points_in_compute_dtype).
template <typename S>
inline PointRows<S> make_rows(const at::Tensor& features, const at::Tensor& coords,
                              const at::Tensor& boxes, const at::Tensor& batch_index,
                              double feature_scale) {
  return PointRows<S>{coords.data_ptr<S>(),
                      boxes.defined() ? boxes.data_ptr<S>() : nullptr,
                      batch_index.defined() ? batch_index.data_ptr<int64_t>() : nullptr,
                      static_cast<S>(feature_scale),
                      coords.size(1),
                      features.size(2),
                      features.size(3)};
}

inline at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

// Point coords (or boxes) in the dtype the kernels compute in for these features: float32
// for float16 / bfloat16 features (whatever the coords' own dtype), else the features' dtype.
inline at::Tensor points_in_compute_dtype(const at::Tensor& t, const at::Tensor& features) {
  return t.defined() ? cast_to(t, compute_dtype(features.scalar_type())).contiguous() : t;
}

}  // namespace d2seg
