"""Detectron2's DatasetMapper with clear errors for unreadable images and a complete
empty target for images without instances.

Differences from ``detectron2.data.DatasetMapper`` (same constructor and from_config):

* an image that is missing or cannot be decoded raises :class:`ImageReadError`
  (a ValueError) naming the file and the record's image_id, instead of a bare PIL/OS
  error from inside a data-loader worker;
* images of more than 8 bits per channel (16-bit grayscale PNG or TIFF, 32-bit integer)
  are scaled to 8 bits (:func:`read_image_8bit`), where Detectron2's ``read_image``
  saturates them (a 16-bit grayscale PNG arrives all white); float images are refused;
  label maps (sem_seg_file_name) are read unscaled, as Detectron2 reads them;
* RLE masks with INPUT.MASK_FORMAT "polygon" raise a ValueError saying to use "bitmask";
* a decoded size that differs from the record's height/width raises Detectron2's
  ``SizeMismatchError`` (unchanged);
* in training, an image without instances gets an empty ``Instances`` that still has
  every field the others have (gt_boxes, gt_classes and, when masks are used, an empty
  gt_masks), so heads that read ``gt_masks`` need no special case.

Shape shorthand: H, W: image height and width after augmentation; R: instances.
"""
import copy

import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, PolygonMasks
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = ["D2SegDatasetMapper", "ImageReadError", "read_image_8bit", "read_image_checked"]

# PIL modes of one channel with more than 8 bits: the value scaled to 255.
_HIGH_BIT_DEPTH_MAX = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


class ImageReadError(ValueError):
    """An image file of a data set record that is missing or cannot be decoded."""


def read_image_8bit(file_name, format=None):
    """Detectron2's ``read_image`` (EXIF orientation, then ``format``: "BGR", "RGB", "L",
    ... or None), with images of more than 8 bits per channel scaled to 8 bits instead of
    saturated: a 16-bit grayscale image (PIL mode I;16*) is scaled by 255 / 65535, as is
    a 32-bit integer one (mode I) whose values lie in [0, 65535]. (PIL itself reduces
    16-bit RGB(A) PNGs to 8 bits.)

    Returns:
        (H, W, C) uint8 array.

    Raises:
        ValueError: a float image (mode F), or a mode-I image with values outside
            [0, 65535] (its bit depth is unknown): convert it to 8 bits first.
        OSError, PIL.UnidentifiedImageError, FileNotFoundError: as PIL raises them.
    """
    with PathManager.open(file_name, "rb") as f:
        image = utils._apply_exif_orientation(Image.open(f))
        if image.mode == "F":
            raise ValueError(f"'{file_name}' is a floating-point image (PIL mode F), which has no "
                             "defined 8-bit range: convert it to an 8-bit image first")
        if image.mode in _HIGH_BIT_DEPTH_MAX:
            values = np.asarray(image).astype(np.int64)
            top = _HIGH_BIT_DEPTH_MAX[image.mode]
            if values.size and (values.min() < 0 or values.max() > top):
                raise ValueError(
                    f"'{file_name}' has values in [{values.min()}, {values.max()}] (PIL mode "
                    f"{image.mode}), outside the 16-bit range that is scaled to 8 bits: convert "
                    "it to an 8-bit image first")
            scaled = (values * 255 + top // 2) // top
            image = Image.fromarray(scaled.astype(np.uint8), mode="L")
        return utils.convert_PIL_to_numpy(image, format)


def read_image_checked(dataset_dict, image_format, scale_to_8bit=True):
    """Read the record's image as (H, W, C) uint8 in ``image_format`` (high bit depths
    scaled to 8 bits by :func:`read_image_8bit`; with ``scale_to_8bit`` False, read as
    Detectron2 reads it, e.g. for label maps), or raise ImageReadError naming the file and
    the record's image_id."""
    file_name = dataset_dict.get("file_name")
    where = f"(dataset record image_id={dataset_dict.get('image_id', '?')})"
    if file_name is None:
        raise ImageReadError(f"dataset record has no 'file_name' {where}")
    try:
        reader = read_image_8bit if scale_to_8bit else utils.read_image
        image = reader(file_name, format=image_format)
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), FileNotFoundError, float
        reason = "file does not exist" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
        raise ImageReadError(f"cannot read image '{file_name}' {where}: {reason}") from e
    return image


def _empty_masks(mask_format, image_shape):
    """Zero masks in ``mask_format`` for an image of ``image_shape`` (H, W)."""
    if mask_format == "bitmask":
        return BitMasks(torch.zeros((0, *image_shape), dtype=torch.bool))
    return PolygonMasks([])


class D2SegDatasetMapper(DatasetMapper):
    """Build with ``D2SegDatasetMapper(cfg, is_train=True)`` or Detectron2's keyword
    arguments (see ``detectron2.data.DatasetMapper``)."""

    def _check_mask_format(self, dataset_dict):
        """RLE masks cannot become PolygonMasks: say which setting to change."""
        if not (self.use_instance_mask and self.instance_mask_format == "polygon"):
            return
        for anno in dataset_dict["annotations"]:
            if isinstance(anno.get("segmentation"), dict):
                raise ValueError(
                    f"image '{dataset_dict.get('file_name')}' (dataset record image_id="
                    f"{dataset_dict.get('image_id', '?')}) has RLE masks, which "
                    "INPUT.MASK_FORMAT 'polygon' cannot hold: set INPUT.MASK_FORMAT to "
                    "'bitmask' (the built-in shapes data sets use RLE)"
                )

    def __call__(self, dataset_dict):
        """
        Args:
            dataset_dict (dict): one record in Detectron2's data set format.

        Returns:
            dict: the record with "image" ((C, H, W) uint8 tensor), and in training
            "instances" (Instances with R >= 0 entries) and "sem_seg" ((H, W) long) when
            the record has them.
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_checked(dataset_dict, self.image_format)
        utils.check_image_size(dataset_dict, image)

        sem_seg_gt = None
        if "sem_seg_file_name" in dataset_dict:
            seg_record = {"file_name": dataset_dict.pop("sem_seg_file_name"),
                          "image_id": dataset_dict.get("image_id", "?")}
            sem_seg_gt = read_image_checked(seg_record, "L", scale_to_8bit=False).squeeze(2)

        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))

        if self.proposal_topk is not None:
            utils.transform_proposals(
                dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk
            )

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
            return dataset_dict

        if "annotations" in dataset_dict:
            self._check_mask_format(dataset_dict)
            self._transform_annotations(dataset_dict, transforms, image_shape)
            instances = dataset_dict["instances"]
            if self.use_instance_mask and not instances.has("gt_masks") and len(instances) == 0:
                instances.gt_masks = _empty_masks(self.instance_mask_format, image_shape)
        return dataset_dict
