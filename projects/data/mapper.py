"""Detectron2's DatasetMapper with clear errors for unreadable images and a complete
empty target for images without instances.

Differences from ``detectron2.data.DatasetMapper`` (same constructor and from_config):

* an image that is missing or cannot be decoded raises :class:`ImageReadError`
  (a ValueError) naming the file and the record's image_id, instead of a bare PIL/OS
  error from inside a data-loader worker;
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

__all__ = ["D2SegDatasetMapper", "ImageReadError", "read_image_checked"]


class ImageReadError(ValueError):
    """An image file of a data set record that is missing or cannot be decoded."""


def read_image_checked(dataset_dict, image_format):
    """Read the record's image as (H, W, C) uint8 in ``image_format``, or raise
    ImageReadError naming the file and the record's image_id."""
    file_name = dataset_dict.get("file_name")
    where = f"(dataset record image_id={dataset_dict.get('image_id', '?')})"
    if file_name is None:
        raise ImageReadError(f"dataset record has no 'file_name' {where}")
    try:
        image = utils.read_image(file_name, format=image_format)
    except Exception as e:  # PIL.UnidentifiedImageError, OSError (truncated), FileNotFoundError
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
            sem_seg_gt = read_image_checked(seg_record, "L").squeeze(2)

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
