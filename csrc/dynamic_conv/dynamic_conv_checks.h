// Argument checks of the dynamic convolution ops, shared by the CPU and CUDA entry points
// (host code only): every problem raises a RuntimeError that names it.
#pragma once
#include <torch/types.h>
#include <type_traits>

#include "core/macros.h"
#include "core/precision.h"
#include "dynamic_conv/dynamic_conv.h"

namespace d2seg {

inline void check_instance_aware_conv_args(const at::Tensor& input, const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 4, "instance_aware_conv: input must be (R, E, H, W), got shape ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 5, "instance_aware_conv: weight must be (R, B, E, d, d), got shape ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) == input.size(0) && weight.size(2) == input.size(1),
              "instance_aware_conv: weight ", weight.sizes(), " does not match input ",
              input.sizes(), " (R and E must agree)");
  TORCH_CHECK(weight.size(3) == weight.size(4) && weight.size(3) % 2 == 1 && weight.size(3) <= 7,
              "instance_aware_conv: the kernel must be square with an odd size d <= 7, got ",
              weight.size(3), "x", weight.size(4));
  TORCH_CHECK(input.is_floating_point() && input.scalar_type() == weight.scalar_type(),
              "instance_aware_conv: input and weight must have the same floating dtype, got ",
              input.scalar_type(), " and ", weight.scalar_type());
  D2SEG_CHECK_SAME_DEVICE(input, weight);
  if (bias.has_value() && bias->defined()) {
    const auto& b = *bias;
    TORCH_CHECK(b.dim() == 2 && b.size(0) == weight.size(0) && b.size(1) == weight.size(1),
                "instance_aware_conv: bias must be (R, B) = (", weight.size(0), ", ",
                weight.size(1), "), got shape ", b.sizes());
    TORCH_CHECK(b.scalar_type() == input.scalar_type(),
                "instance_aware_conv: bias must have the dtype of input");
    D2SEG_CHECK_SAME_DEVICE(input, b);
  }
}

inline DynLayout check_dynamic_mask_head_args(const at::Tensor& mask_feats,
                                              const at::Tensor& im_inds,
                                              const at::Tensor& params,
                                              const c10::optional<at::Tensor>& locations,
                                              const c10::optional<at::Tensor>& scales,
                                              int64_t channels, int64_t num_layers,
                                              int64_t stride) {
  TORCH_CHECK(mask_feats.dim() == 4, "dynamic_mask_head: mask_feats must be (N, C, H, W), got ",
              mask_feats.sizes());
  TORCH_CHECK(mask_feats.is_floating_point(), "dynamic_mask_head: mask_feats must be floating");
  TORCH_CHECK(params.dim() == 2 && params.scalar_type() == mask_feats.scalar_type(),
              "dynamic_mask_head: params must be (R, P) with the dtype of mask_feats, got ",
              params.sizes(), " ", params.scalar_type());
  TORCH_CHECK(im_inds.dim() == 1 && im_inds.size(0) == params.size(0),
              "dynamic_mask_head: im_inds must be (R,) with R = params.size(0) = ",
              params.size(0), ", got ", im_inds.sizes());
  TORCH_CHECK(im_inds.scalar_type() == at::kLong, "dynamic_mask_head: im_inds must be int64");
  TORCH_CHECK(num_layers >= 1 && num_layers <= kDynMaxLayers,
              "dynamic_mask_head: num_layers must be in [1, ", kDynMaxLayers, "], got ", num_layers);
  TORCH_CHECK(channels >= 1 && channels <= kDynMaxChannels,
              "dynamic_mask_head: channels must be in [1, ", kDynMaxChannels, "], got ", channels);
  TORCH_CHECK(stride >= 1, "dynamic_mask_head: mask_feat_stride must be positive");
  D2SEG_CHECK_SAME_DEVICE(mask_feats, params);
  D2SEG_CHECK_SAME_DEVICE(mask_feats, im_inds);
  const bool rel = locations.has_value() && locations->defined();
  if (rel) {
    const auto& loc = *locations;
    TORCH_CHECK(loc.dim() == 2 && loc.size(0) == params.size(0) && loc.size(1) == 2,
                "dynamic_mask_head: instance_locations must be (R, 2), got ", loc.sizes());
    TORCH_CHECK(aux_dtype_ok(mask_feats.scalar_type(), loc.scalar_type()),
                "dynamic_mask_head: instance_locations must have the dtype of mask_feats (or "
                "float32 beside float16 / bfloat16 mask_feats), got ", loc.scalar_type(),
                " and ", mask_feats.scalar_type());
    D2SEG_CHECK_SAME_DEVICE(mask_feats, loc);
  }
  if (scales.has_value() && scales->defined()) {
    TORCH_CHECK(rel, "dynamic_mask_head: scales are only used with instance_locations");
    const auto& s = *scales;
    TORCH_CHECK(s.dim() == 1 && s.size(0) == params.size(0),
                "dynamic_mask_head: scales must be (R,), got ", s.sizes());
    TORCH_CHECK(aux_dtype_ok(mask_feats.scalar_type(), s.scalar_type()),
                "dynamic_mask_head: scales must have the dtype of mask_feats (or float32 beside "
                "float16 / bfloat16 mask_feats), got ", s.scalar_type(), " and ",
                mask_feats.scalar_type());
    D2SEG_CHECK_SAME_DEVICE(mask_feats, s);
  }
  const int64_t in_channels = mask_feats.size(1) + (rel ? 2 : 0);
  TORCH_CHECK(in_channels <= (1 << 20), "dynamic_mask_head: too many input channels");
  DynLayout L = make_dyn_layout((int)in_channels, (int)channels, (int)num_layers);
  TORCH_CHECK(params.size(1) == L.total, "dynamic_mask_head: params must have ", L.total,
              " values per instance for ", num_layers, " layers of ", channels,
              " channels on ", in_channels, " inputs (C = ", mask_feats.size(1),
              rel ? " + 2 relative coordinates" : "", "), got ", params.size(1));
  return L;
}

// Shared by the CPU and CUDA files.
// Calls fn(std::integral_constant<int, D>{}) for the runtime kernel size d in {1, 3, 5, 7}.
template <typename Fn>
void dispatch_kernel_size(int d, const Fn& fn) {
  switch (d) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 5: return fn(std::integral_constant<int, 5>{});
    case 7: return fn(std::integral_constant<int, 7>{});
    default: TORCH_CHECK(false, "instance_aware_conv: kernel size must be 1, 3, 5 or 7, got ", d);
  }
}

}  // namespace d2seg
