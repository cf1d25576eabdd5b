"""Learning MEInst's mask encoding from any data set registered in Detectron2, streaming
(one image's instances at a time), and measuring its reconstruction quality (the
paper's Fig. 5 upper-bound analysis).

Shape shorthand: B masks in a batch, m mask side, N components.

Each non-crowd instance mask (polygons, COCO RLE compressed or not, or a (H, W) array)
is cropped to its annotated box and resized to m x m with Detectron2's
``crop_and_resize`` (ROIAlign, then >= 0.5), exactly as the training targets are made.
"""
import itertools
import logging
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from detectron2.data import DatasetCatalog
from detectron2.utils import comm
from detectron2.structures import BitMasks, BoxMode, PolygonMasks

from .encoding import (
    _DEGENERATE_VARIANCE,
    MaskEncoding,
    MaskEncodingError,
    MaskEncodingParams,
    MaskStatistics,
    mask_iou,
)

__all__ = [
    "crop_masks_of_record",
    "data_hash",
    "default_encoding_path",
    "encoding_for_config",
    "encoding_sources",
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
    if whiten and float(params.explained_variance.max(initial=0.0)) < _DEGENERATE_VARIANCE:
        logger.warning(f"The {stats.count} masks of {name or 'the given records'} have no variance "
                       "once cropped to their boxes (every mask fills its box?): the codes are "
                       "not whitened.")
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


def encoding_sources(cfg) -> List[str]:
    """The data sets the encoding of ``cfg`` is learnt from: ``MODEL.MEINST.ENCODING_DATASET``
    when set (it must be one of DATASETS.TRAIN), else every data set of DATASETS.TRAIN.

    Raises:
        MaskEncodingError: ENCODING_DATASET is not among DATASETS.TRAIN (the encoding would
            come from other data than the model trains on), or both are empty.
    """
    mc, train = cfg.MODEL.MEINST, list(cfg.DATASETS.TRAIN)
    if mc.ENCODING_DATASET:
        if train and mc.ENCODING_DATASET not in train:
            raise MaskEncodingError(
                f"MODEL.MEINST.ENCODING_DATASET={mc.ENCODING_DATASET!r} is not among "
                f"DATASETS.TRAIN={tuple(train)}: the mask encoding would be learnt from other data "
                "than the model trains on. Set MODEL.MEINST.ENCODING_DATASET '' to learn it from "
                "DATASETS.TRAIN, or name one of them."
            )
        return [mc.ENCODING_DATASET]
    if not train:
        raise FileNotFoundError(
            "MEInst needs a mask encoding: set MODEL.MEINST.PATH_COMPONENTS to a file made by "
            "tools/meinst_encoding.py, or DATASETS.TRAIN (or MODEL.MEINST.ENCODING_DATASET) to "
            "the registered data set to learn it from on first use."
        )
    return train


def data_hash(names: Sequence[str]) -> str:
    """A SHA-1 of the data sets ``names``: each one's json file (its bytes) when its metadata
    names an existing one, else its records (Detectron2 dicts, as sorted JSON)."""
    import hashlib
    import json
    import os

    from detectron2.data import MetadataCatalog

    h = hashlib.sha1()
    for name in names:
        json_file = MetadataCatalog.get(name).get("json_file", None)
        if json_file and os.path.isfile(json_file):
            with open(json_file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(json.dumps(DatasetCatalog.get(name), sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def default_encoding_path(cfg) -> str:
    """Where the encoding learnt from :func:`encoding_sources` is cached when
    ``MODEL.MEINST.PATH_COMPONENTS`` is empty:
    $DETECTRON2_DATASETS/meinst/<tag>_m.._n.._whiten._sigmoid._<hash>.npz, <tag> being each
    source's folder (when its metadata has a json_file) or name, <hash> the first 12 hex
    digits of :func:`data_hash`: changed data gives another file."""
    import os

    from detectron2.data import MetadataCatalog

    from d2seg.data import datasets_root

    mc = cfg.MODEL.MEINST
    names = encoding_sources(cfg)
    tags = []
    for name in names:
        json_file = MetadataCatalog.get(name).get("json_file", None) if name in DatasetCatalog.list() else None
        tags.append(os.path.basename(os.path.dirname(json_file)) if json_file else name)
    fname = (f"{'+'.join(tags)}_m{mc.MASK_SIZE}_n{mc.DIM_MASK}_whiten{int(mc.WHITEN)}"
             f"_sigmoid{int(mc.SIGMOID)}_{data_hash(names)[:12]}.npz")
    return os.path.join(datasets_root(), "meinst", fname)


def _check_source(params: MaskEncodingParams, path: str, cfg) -> None:
    """Warn when an encoding file named by MODEL.MEINST.PATH_COMPONENTS records that it was
    learnt from a data set that is not among DATASETS.TRAIN. A warning, not an error: a
    file is an explicit choice, and the encoding of a pretrained checkpoint (extracted by
    d2seg.meinst.convert) is the right one to fine-tune that checkpoint on other data."""
    train = list(cfg.DATASETS.TRAIN)
    sources = [s for s in params.dataset.split("+") if s]
    if train and sources and not set(sources) <= set(train):
        logger.warning(
            f"MEInst: the mask encoding {path} (MODEL.MEINST.PATH_COMPONENTS) was learnt from "
            f"{params.dataset!r}, not from DATASETS.TRAIN={tuple(train)}. Set "
            "MODEL.MEINST.PATH_COMPONENTS '' to learn it from the training data (cached by a "
            "hash of the data)."
        )


def _learns_here() -> bool:
    """Whether this process learns a missing encoding: the main process of its machine
    (Detectron2's per-machine group, which its launcher and tools/train_net.py set up), or
    the global main process where that group does not exist."""
    try:
        return comm.get_local_rank() == 0
    except AssertionError:  # torch.distributed initialised without Detectron2's local group
        return comm.is_main_process()


def encoding_for_config(cfg) -> MaskEncodingParams:
    """The encoding a config asks for, following the training data:

    * ``MODEL.MEINST.PATH_COMPONENTS`` set: that file (checked against MASK_SIZE / DIM_MASK /
      WHITEN / SIGMOID; a warning when it records another source than DATASETS.TRAIN); a
      missing file is learnt there from ENCODING_DATASET when that is set;
    * else learnt from :func:`encoding_sources` (ENCODING_DATASET, which must be one of
      DATASETS.TRAIN, or all of DATASETS.TRAIN) on first use and cached under
      :func:`default_encoding_path`, named by a hash of the data.

    One INFO line names the file and the data it was learnt from.
    """
    import os

    from .encoding import load_encoding, save_encoding

    mc = cfg.MODEL.MEINST
    kw = dict(mask_size=mc.MASK_SIZE, num_components=mc.DIM_MASK, whiten=mc.WHITEN, sigmoid=mc.SIGMOID)
    path = mc.PATH_COMPONENTS
    if not path or mc.ENCODING_DATASET:
        from d2seg.data import prepare_datasets

        prepare_datasets(cfg)  # registers/generates the built-in data sets with cfg's params
        names = encoding_sources(cfg)
        missing = [n for n in names if n not in DatasetCatalog.list()]
        if missing:
            raise KeyError(f"MEInst: the mask encoding's data set {missing[0]!r} (MODEL.MEINST."
                           f"ENCODING_DATASET or DATASETS.TRAIN) is not a registered data set.")
        path = path or default_encoding_path(cfg)
        # in distributed training one process per machine learns it (the machines need not
        # share DETECTRON2_DATASETS; the file is written atomically), the others wait and read it
        if not os.path.isfile(path) and _learns_here():
            source = "+".join(names)
            logger.info(f"MEInst: learning the mask encoding from {source} into {path}")
            records = itertools.chain.from_iterable(DatasetCatalog.get(n) for n in names)
            params = learn_encoding(records, mc.MASK_SIZE, mc.DIM_MASK, mc.WHITEN, mc.SIGMOID)
            params.dataset = source
            save_encoding(path, params)
        comm.synchronize()
    what = "MODEL.MEINST.PATH_COMPONENTS" if mc.PATH_COMPONENTS else "cached encoding"
    params = load_encoding(path, what=what, **kw)
    _check_source(params, path, cfg)
    learnt_from = (f"learnt from {params.dataset} ({params.num_masks} masks)" if params.dataset
                   else "its source data set is not recorded")
    logger.info(f"MEInst: mask encoding {path}: {learnt_from}")
    return params
