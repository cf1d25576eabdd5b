// Autocast policy of the d2seg ops: what each op does with its inputs' dtypes inside a
// torch.autocast region (registered for the AutocastCPU and AutocastCUDA dispatch keys).
// Each policy casts the arguments, then calls the op again with autocast excluded, so the
// op's own compiled kernel runs (every kernel takes float16 / bfloat16; see
// core/precision.h). The casts are differentiable, as PyTorch's own autocast casts are.
//
//   instance_aware_conv   a convolution: input, weight and bias in the autocast dtype
//                         (as torch.conv2d under autocast).
//   dynamic_mask_head     a stack of 1x1 convolutions: mask_feats and params in the autocast
//                         dtype; instance_locations and scales in float32 (pixel positions
//                         of up to a few thousand lose whole pixels in float16 / bfloat16).
//   sample_points         an interpolation: the features keep their dtype (nothing is summed
//                         but 4 weighted corners); point coords and boxes in float32 (a
//                         bfloat16 coordinate in [0, 1] is off by up to 1/256 of the map).
//
// Backward ops get no policy: autograd calls them with the dtypes of the forward.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#include <torch/types.h>

#include "core/precision.h"

namespace d2seg {

namespace {

using OptTensor = c10::optional<at::Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Excludes this device's autocast key for the nested call, as PyTorch's own policies do.
template <c10::DeviceType DT>
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{
      at::autocast::get_autocast_dispatch_key_from_device_type(DT)};
};

// The dtype point coordinates are computed in next to features of dtype t.
inline at::ScalarType coords_dtype_for(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

template <c10::DeviceType DT>
at::Tensor instance_aware_conv_autocast(const at::Tensor& input, const at::Tensor& weight,
                                        const OptTensor& bias) {
  NoAutocast<DT> no_autocast;
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)>(
          "d2seg::instance_aware_conv");
  const auto dt = at::autocast::get_autocast_dtype(DT);
  return op.call(at::autocast::cached_cast(dt, input, DT),
                 at::autocast::cached_cast(dt, weight, DT),
                 at::autocast::cached_cast(dt, bias, DT));
}

template <c10::DeviceType DT>
at::Tensor dynamic_mask_head_autocast(const at::Tensor& mask_feats, const at::Tensor& im_inds,
                                      const at::Tensor& params, const OptTensor& locations,
                                      const OptTensor& scales, int64_t channels,
                                      int64_t num_layers, int64_t stride) {
  NoAutocast<DT> no_autocast;
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const OptTensor&, const OptTensor&, int64_t, int64_t, int64_t)>(
          "d2seg::dynamic_mask_head");
  const auto dt = at::autocast::get_autocast_dtype(DT);
  const at::Tensor feats = at::autocast::cached_cast(dt, mask_feats, DT);
  const auto lt = coords_dtype_for(feats.scalar_type());
  return op.call(feats, im_inds, at::autocast::cached_cast(dt, params, DT),
                 cast_to(locations, lt), cast_to(scales, lt), channels, num_layers, stride);
}

template <c10::DeviceType DT>
at::Tensor sample_points_autocast(const at::Tensor& features, const at::Tensor& coords,
                                  const OptTensor& boxes, const OptTensor& batch_index,
                                  double feature_scale) {
  NoAutocast<DT> no_autocast;
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&,
                           const OptTensor&, double)>("d2seg::sample_points");
  const auto ct = coords_dtype_for(features.scalar_type());
  return op.call(features, cast_to(coords, ct), cast_to(boxes, ct), batch_index, feature_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(d2seg, AutocastCPU, m) {
  m.impl("instance_aware_conv", &instance_aware_conv_autocast<c10::DeviceType::CPU>);
  m.impl("dynamic_mask_head", &dynamic_mask_head_autocast<c10::DeviceType::CPU>);
  m.impl("sample_points", &sample_points_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(d2seg, AutocastCUDA, m) {
  m.impl("instance_aware_conv", &instance_aware_conv_autocast<c10::DeviceType::CUDA>);
  m.impl("dynamic_mask_head", &dynamic_mask_head_autocast<c10::DeviceType::CUDA>);
  m.impl("sample_points", &sample_points_autocast<c10::DeviceType::CUDA>);
}

}  // namespace d2seg
