"""Python face of the compiled ops in csrc/: autograd wrappers, pure-PyTorch references
and the dispatch between them."""
from .dynamic_conv import (
    dynamic_kernel_product,
    dynamic_mask_head,
    dynamic_mask_head_num_params,
    instance_aware_conv,
    parse_dynamic_params,
)
from .extension import axpy, extension_available, load_extension
from .local_conv import conv2d_at_locations, supports_conv2d_at_locations
from .point_features import (
    get_uncertain_point_coords_on_grid,
    get_uncertain_point_coords_with_randomness,
    point_sample,
    point_sample_boxes,
    point_sample_fine_grained_features,
)
from .roi_align import (
    fast_roi_align_backward_active,
    roi_align_backward_from_config,
    use_fast_roi_align_backward,
    use_torchvision_roi_align_backward,
)

# Importing registers nothing in other libraries: d2seg's faster RoIAlign backward replaces
# torchvision's CPU kernel only when asked (use_fast_roi_align_backward(), or d2seg's
# Trainer with MODEL.FAST_ROI_ALIGN_BACKWARD).

__all__ = [
    "axpy",
    "extension_available",
    "load_extension",
    "conv2d_at_locations",
    "supports_conv2d_at_locations",
    "instance_aware_conv",
    "dynamic_mask_head",
    "dynamic_mask_head_num_params",
    "parse_dynamic_params",
    "dynamic_kernel_product",
    "point_sample",
    "point_sample_boxes",
    "point_sample_fine_grained_features",
    "get_uncertain_point_coords_with_randomness",
    "get_uncertain_point_coords_on_grid",
    "use_fast_roi_align_backward",
    "use_torchvision_roi_align_backward",
    "roi_align_backward_from_config",
    "fast_roi_align_backward_active",
]
