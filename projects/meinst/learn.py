"""Learning MEInst's mask encoding from any data set registered in Detectron2, streaming
(one image's instances at a time), and measuring its reconstruction quality (the
paper's Fig. 5 upper-bound analysis).

Shape shorthand: B masks in a batch, m mask side, N components.

Each non-crowd instance mask (polygons, COCO RLE compressed or not, or a (H, W) array)
is cropped to its annotated box and resized to m x m with Detectron2's
``crop_and_resize`` (ROIAlign, then >= 0.5), exactly as the training targets are made.
"""
import logging
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from detectron2.data import DatasetCatalog
from detectron2.structures import BitMasks, BoxMode, PolygonMasks

from .encoding import MaskEncoding, MaskEncodingParams, MaskStatistics, mask_iou

__all__ = [
    "crop_masks_of_record",
    "iter_dataset_masks",
    "learn_encoding",
    "reconstruction_miou",
]

logger = logging.getLogger(__name__)


def _as_mask_structure(segm, height: int, width: int, what: str):
    if isinstance(segm, list):
        polys = [np.asarray(p, dtype=np.float64) for p in segm if len(p) >= 6]
        return PolygonMasks([polys]) if polys else None
    if isinstance(segm, dict):
        from pycocotools import mask as mask_util

        rle = segm
        if isinstance(segm.get("counts"), list):  # uncompressed RLE
            rle = mask_util.frPyObjects(segm, *segm["size"])
        return BitMasks(torch.from_numpy(mask_util.decode(rle).astype(bool))[None])
    if isinstance(segm, np.ndarray):
        if segm.ndim != 2:
            raise ValueError(f"{what}: mask array must be (H, W), got {segm.shape}.")
        return BitMasks(torch.from_numpy(segm.astype(bool))[None])
    raise ValueError(f"{what}: unsupported segmentation type {type(segm).__name__}.")


def crop_masks_of_record(record: dict, mask_size: int) -> Tensor:
    """The (B, m, m) float {0, 1} box-cropped masks of one Detectron2 data set dict.

    Crowd annotations, annotations without "segmentation" and empty boxes are skipped.
    """
    out = []
    h, w = record.get("height"), record.get("width")
    for k, ann in enumerate(record.get("annotations", [])):
        if ann.get("iscrowd", 0) or "segmentation" not in ann:
            continue
        box = BoxMode.convert(list(ann["bbox"]), ann.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS)
        if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
            continue
        what = f"{record.get('file_name', '?')} annotation {k}"
        masks = _as_mask_structure(ann["segmentation"], h, w, what)
        if masks is None:
            continue
        boxes = torch.tensor([box], dtype=torch.float32)
        out.append(masks.crop_and_resize(boxes, mask_size).float())
    if not out:
        return torch.zeros(0, mask_size, mask_size)
    return torch.cat(out)


def iter_dataset_masks(
    dataset: Union[str, Iterable[dict]], mask_size: int, batch_size: int = 512,
    max_masks: Optional[int] = None,
) -> Iterator[Tensor]:
    """Yield (B, m, m) batches of box-cropped masks of a registered data set (by name) or
    of an iterable of Detectron2 dicts; never holds more than one batch of masks."""
    records = DatasetCatalog.get(dataset) if isinstance(dataset, str) else dataset
    buf: List[Tensor] = []
    n_buf = n_total = 0
    for record in records:
        masks = crop_masks_of_record(record, mask_size)
        if max_masks is not None:
            masks = masks[: max(0, max_masks - n_total)]
        if len(masks) == 0:
            if max_masks is not None and n_total >= max_masks:
                break
            continue
        buf.append(masks)
        n_buf += len(masks)
        n_total += len(masks)
        if n_buf >= batch_size:
            yield torch.cat(buf)
            buf, n_buf = [], 0
    if buf:
        yield torch.cat(buf)


def learn_encoding(
    dataset: Union[str, Iterable[dict]], mask_size: int = 28, num_components: int = 60,
    whiten: bool = True, sigmoid: bool = True, max_masks: Optional[int] = None,
    statistics: Optional[MaskStatistics] = None,
) -> MaskEncodingParams:
    """PCA encoding of ``dataset``'s masks (one streaming pass).

    Pass ``statistics`` (a fresh MaskStatistics) to keep the moments, e.g. to fit other
    numbers of components later without reading the data again.
    """
    stats = statistics if statistics is not None else MaskStatistics(mask_size, sigmoid)
    for batch in iter_dataset_masks(dataset, mask_size, max_masks=max_masks):
        stats.update(batch)
    name = dataset if isinstance(dataset, str) else ""
    params = stats.fit(num_components, whiten, dataset=name)
    logger.info(f"Learnt a {mask_size}x{mask_size} -> {num_components} mask encoding from "
                f"{stats.count} masks of {name or 'the given records'}.")
    return params


def reconstruction_miou(
    dataset: Union[str, Iterable[dict]], encodings: Sequence[MaskEncodingParams],
    max_masks: Optional[int] = None,
) -> Dict[int, float]:
    """Mean IoU between each binary m x m mask and its encode -> decode -> (>= 0.5)
    reconstruction, for each encoding (one streaming pass). Returns {N: mIoU}."""
    if not encodings:
        return {}
    m = encodings[0].mask_size
    modules = [MaskEncoding.from_params(p).double() for p in encodings]
    sums = [0.0] * len(modules)
    count = 0
    with torch.no_grad():
        for batch in iter_dataset_masks(dataset, m, max_masks=max_masks):
            gt = batch >= 0.5
            for i, enc in enumerate(modules):
                rec = enc.decode(enc.encode(batch.double())) >= 0.5
                sums[i] += mask_iou(gt, rec).sum().item()
            count += len(batch)
    if count == 0:
        raise ValueError("no instance masks to evaluate the reconstruction on.")
    return {p.num_components: s / count for p, s in zip(encodings, sums)}


def default_encoding_path(cfg) -> str:
    """Where the encoding of ``MODEL.MEINST.ENCODING_DATASET`` is cached when
    ``MODEL.MEINST.PATH_COMPONENTS`` is empty: $DETECTRON2_DATASETS/meinst/<name>_m.._n...npz,
    <name> being the data set's folder when its metadata has a json_file."""
    import os

    from detectron2.data import MetadataCatalog

    from d2seg.data import datasets_root

    mc = cfg.MODEL.MEINST
    name = mc.ENCODING_DATASET
    json_file = MetadataCatalog.get(name).get("json_file", None) if name in DatasetCatalog.list() else None
    tag = os.path.basename(os.path.dirname(json_file)) if json_file else name
    fname = f"{tag}_m{mc.MASK_SIZE}_n{mc.DIM_MASK}_whiten{int(mc.WHITEN)}_sigmoid{int(mc.SIGMOID)}.npz"
    return os.path.join(datasets_root(), "meinst", fname)


def encoding_for_config(cfg) -> MaskEncodingParams:
    """The encoding a config asks for: read ``MODEL.MEINST.PATH_COMPONENTS`` (checked
    against MASK_SIZE / DIM_MASK / WHITEN / SIGMOID), or, when that file is missing and
    ``MODEL.MEINST.ENCODING_DATASET`` is set, learn it from that data set and save it."""
    import os

    from .encoding import load_encoding, save_encoding

    mc = cfg.MODEL.MEINST
    kw = dict(mask_size=mc.MASK_SIZE, num_components=mc.DIM_MASK, whiten=mc.WHITEN, sigmoid=mc.SIGMOID)
    path = mc.PATH_COMPONENTS
    if not path and not mc.ENCODING_DATASET:
        raise FileNotFoundError(
            "MEInst needs a mask encoding: set MODEL.MEINST.PATH_COMPONENTS to a file made by "
            "tools/meinst_encoding.py, or MODEL.MEINST.ENCODING_DATASET to a registered data set "
            "to learn it from on first use."
        )
    if mc.ENCODING_DATASET:
        from d2seg.data import prepare_datasets

        prepare_datasets(cfg)  # registers/generates the built-in data sets with cfg's params
        if not path:
            path = default_encoding_path(cfg)
        if not os.path.isfile(path):
            if mc.ENCODING_DATASET not in DatasetCatalog.list():
                raise KeyError(f"MODEL.MEINST.ENCODING_DATASET={mc.ENCODING_DATASET!r} is not a "
                               f"registered data set.")
            logger.info(f"MEInst: learning the mask encoding from {mc.ENCODING_DATASET} into {path}")
            params = learn_encoding(mc.ENCODING_DATASET, mc.MASK_SIZE, mc.DIM_MASK, mc.WHITEN, mc.SIGMOID)
            save_encoding(path, params)
    what = "MODEL.MEINST.PATH_COMPONENTS" if mc.PATH_COMPONENTS else "cached encoding"
    return load_encoding(path, what=what, **kw)
