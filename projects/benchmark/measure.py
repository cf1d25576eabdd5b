"""Measure one config: inference latency and training iteration time, with peak memory.

Each function is meant to run in its own fresh process (see tools/benchmark.py and
:mod:`d2seg.benchmark.worker`), so that peak memory is the phase's alone.

Shape shorthand: B: images per batch; C: image channels (3); H, W: image height and
width fed to the model (before the model pads them to its size divisibility);
R: instances of an image.
"""
import time

import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from ..data import D2SegDatasetMapper, prepare_datasets
from ..engine import AtomicCheckpointer, Trainer, at_precision
from ..layers import roi_align_backward_from_config
from .memory import PeakMemory
from .stats import summarize

__all__ = ["resize_record", "inference_inputs", "train_batches", "measure_inference", "measure_training"]


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _resize_instances(instances, size, scale_x, scale_y):
    """A copy of ``instances`` (R entries) for an image resized to ``size`` (H, W):
    boxes scaled, bit masks resampled (nearest), polygons scaled, other fields kept."""
    out = Instances(size)
    for name, value in instances.get_fields().items():
        if isinstance(value, Boxes):
            value = value.clone()
            value.scale(scale_x, scale_y)
        elif isinstance(value, BitMasks):
            masks = value.tensor
            if masks.shape[0] == 0:
                value = BitMasks(torch.zeros((0, *size), dtype=torch.bool))
            else:
                value = BitMasks(F.interpolate(masks[None].float(), size=size, mode="nearest")[0] > 0.5)
        elif isinstance(value, PolygonMasks):
            polys = []
            for obj in value.polygons:
                scaled = []
                for p in obj:
                    p = p.copy()
                    p[0::2] *= scale_x
                    p[1::2] *= scale_y
                    scaled.append(p)
                polys.append(scaled)
            value = PolygonMasks(polys)
        out.set(name, value)
    return out


def resize_record(record, size):
    """Resize a mapped record (the dict a dataset mapper returns) to ``size`` = (H, W).

    ``record["image"]`` ((C, h, w) tensor) is resampled bilinearly, "instances" and
    "sem_seg" ((h, w)) follow, and "height"/"width" become H/W, so a model also returns
    its outputs at H x W. Returns a new dict.
    """
    H, W = int(size[0]), int(size[1])
    record = dict(record)
    image = record["image"]
    h, w = image.shape[-2:]
    if (h, w) == (H, W):
        return record
    resized = F.interpolate(image[None].float(), size=(H, W), mode="bilinear", align_corners=False)[0]
    if not image.is_floating_point():
        resized = resized.round().clamp(0, 255)
    record["image"] = resized.to(image.dtype)
    if "instances" in record:
        record["instances"] = _resize_instances(record["instances"], (H, W), W / w, H / h)
    if "sem_seg" in record:
        seg = record["sem_seg"]
        record["sem_seg"] = F.interpolate(seg[None, None].float(), size=(H, W), mode="nearest")[0, 0].to(seg.dtype)
    record["height"], record["width"] = H, W
    return record


def inference_inputs(cfg, num_images, input_size=None):
    """The first ``num_images`` records of cfg.DATASETS.TEST[0], mapped as for testing
    (the config's test-time resize), optionally resized to ``input_size`` (H, W)."""
    prepare_datasets(cfg)
    name = cfg.DATASETS.TEST[0]
    dicts = DatasetCatalog.get(name)
    if not dicts:
        raise ValueError(f"data set '{name}' (DATASETS.TEST) has no images")
    mapper = D2SegDatasetMapper(cfg, is_train=False)
    records = [mapper(d) for d in dicts[: max(1, num_images)]]
    if input_size is not None:
        records = [resize_record(r, input_size) for r in records]
    return records


def train_batches(cfg, num_batches, input_size=None):
    """``num_batches`` batches (lists of cfg.SOLVER.IMS_PER_BATCH mapped records) from
    the trainer's real training data loader (augmentation included), optionally resized
    to ``input_size`` (H, W)."""
    prepare_datasets(cfg)
    loader = iter(Trainer.build_train_loader(cfg))
    batches = [next(loader) for _ in range(num_batches)]
    if input_size is not None:
        batches = [[resize_record(r, input_size) for r in b] for b in batches]
    return batches


def _load_weights(model, cfg):
    """Load cfg.MODEL.WEIGHTS (when set) with d2seg's checkpointer, as train_net.py does."""
    if cfg.MODEL.WEIGHTS:
        AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)


def _count_outputs(outputs):
    """Instances per image of a model's outputs (None for semantic outputs)."""
    counts = [len(o["instances"]) for o in outputs if "instances" in o]
    return (sum(counts) / len(counts)) if counts else None


def measure_inference(cfg, warmup=5, repeats=30, batch_size=1, input_size=None):
    """Latency of ``model(batch)`` in eval mode under ``torch.no_grad()``, at
    ``cfg.TEST.PRECISION`` (bfloat16: under autocast, results cast to float32).

    ``warmup`` untimed calls, then ``repeats`` timed calls, each on the next
    ``batch_size`` images of the test set (cycling). The model (random init, or
    cfg.MODEL.WEIGHTS when set) is built after the memory baseline, so peak memory
    includes its weights.

    Returns:
        dict: ms (summary, see summarize), images_per_s (batch_size / median),
        detections (mean instances per image over the timed calls; None for
        semantic outputs), detections_min/max, input_hw, batch_size, peak_mib,
        memory_method, output ("instances" or "sem_seg").
    """
    if warmup < 0 or repeats < 1 or batch_size < 1:
        raise ValueError(f"need warmup >= 0, repeats >= 1, batch_size >= 1 (got {warmup}, {repeats}, {batch_size})")
    device = cfg.MODEL.DEVICE
    records = inference_inputs(cfg, (warmup + repeats) * batch_size, input_size)
    mem = PeakMemory(device)
    mem.start()
    model = Trainer.build_model(cfg)
    _load_weights(model, cfg)
    model.eval()
    model = at_precision(cfg, model)

    def batch(i):
        return [records[(i * batch_size + k) % len(records)] for k in range(batch_size)]

    times, dets = [], []
    output = None
    with torch.no_grad():
        for i in range(warmup):
            model(batch(i))
        for i in range(warmup, warmup + repeats):
            inputs = batch(i)
            _sync(device)
            t0 = time.perf_counter()
            outputs = model(inputs)
            _sync(device)
            times.append((time.perf_counter() - t0) * 1000.0)
            n = _count_outputs(outputs)
            output = "instances" if n is not None else ("sem_seg" if "sem_seg" in outputs[0] else "other")
            if n is not None:
                dets.append(n)
    peak = mem.peak_mib()
    ms = summarize(times)
    h, w = records[0]["image"].shape[-2:]
    return {
        "ms": ms,
        "images_per_s": batch_size * 1000.0 / ms["median"],
        "detections": (sum(dets) / len(dets)) if dets else None,
        "detections_min": min(dets) if dets else None,
        "detections_max": max(dets) if dets else None,
        "input_hw": [int(h), int(w)],
        "batch_size": batch_size,
        "warmup": warmup,
        "peak_mib": peak,
        "memory_method": mem.method,
        "output": output,
        "precision": cfg.TEST.PRECISION,
    }


def measure_training(cfg, warmup=2, iters=5, input_size=None):
    """Time of the real training step: the trainer's model (train mode), optimizer and
    LR scheduler, one batch of cfg.SOLVER.IMS_PER_BATCH images from the trainer's data
    loader per iteration: ``loss = sum(model(batch).values())``, ``zero_grad``,
    ``backward``, ``optimizer.step``, ``scheduler.step`` (as Detectron2's SimpleTrainer
    does). Batches are loaded before timing, so data loading is not counted.

    Returns:
        dict: ms (summary per iteration), input_hw, batch_size, peak_mib,
        memory_method, loss_first, loss_last (total loss of the first and last step).
    """
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1 (got {warmup}, {iters})")
    device = cfg.MODEL.DEVICE
    batches = train_batches(cfg, warmup + iters, input_size)
    mem = PeakMemory(device)
    mem.start()
    model = Trainer.build_model(cfg)
    _load_weights(model, cfg)
    model.train()
    roi_align_backward_from_config(cfg)  # RoIAlign's CPU backward as the Trainer chooses it
    optimizer = Trainer.build_optimizer(cfg, model)
    scheduler = Trainer.build_lr_scheduler(cfg, optimizer)
    times, losses = [], []
    with EventStorage(0) as storage:
        for i, data in enumerate(batches):
            storage.iter = i
            _sync(device)
            t0 = time.perf_counter()
            loss_dict = model(data)
            loss = sum(loss_dict.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            _sync(device)
            dt = (time.perf_counter() - t0) * 1000.0
            losses.append(float(loss.detach()))
            if i >= warmup:
                times.append(dt)
    peak = mem.peak_mib()
    h, w = batches[0][0]["image"].shape[-2:]
    return {
        "ms": summarize(times),
        "input_hw": [int(h), int(w)],
        "batch_size": len(batches[0]),
        "warmup": warmup,
        "peak_mib": peak,
        "memory_method": mem.method,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
