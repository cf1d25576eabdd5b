"""A Detectron2 checkpointer whose files are never seen half-written.

Detectron2 (fvcore) writes ``model_XXXXXXX.pth`` in place and then points
``last_checkpoint`` at it. A process killed during that write leaves a truncated file
under the final name, and ``--resume`` then fails on it (or, worse, on a file that happens
to unpickle). Here every file is written to a temporary name in the same folder, flushed
to disk, and atomically renamed; ``last_checkpoint`` is updated the same way, only after
the checkpoint itself is complete.

Loading (``MODEL.WEIGHTS``) goes through :mod:`d2seg.model_zoo`:
- ``d2seg://<name>`` and http(s) URLs are downloaded into a cache and checked against the
  model zoo's sha256 (a URL without a known checksum needs an explicit opt-in);
- ``.pth`` files are read with ``torch.load(weights_only=True)``; Detectron2 ``.pkl`` files
  (model zoo and ImageNet backbones) with a restricted unpickler that builds numpy arrays and
  plain containers only; a file needing more only with ``allow_pickle`` /
  ``D2SEG_ALLOW_PICKLE=1``;
- a recognised foreign layout (AdelaiDet, Detectron2's first PointRend checkpoints) is
  converted to d2seg's names, with a log line saying so; stale buffers (``pixel_mean``,
  ``_iter``, ...) are dropped;
- a checkpoint that shares no key with the model is refused, naming the keys on both sides.
"""
import os
import tempfile
from urllib.parse import parse_qs

import torch
from detectron2.checkpoint import DetectionCheckpointer

from d2seg.model_zoo import weights as _zoo_weights  # noqa: F401  (registers d2seg:// in PathManager)


def _atomic_write(path, write_fn, mode="wb"):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class AtomicCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` with atomic writes of checkpoints and of the
    ``last_checkpoint`` tag (local paths only for writing, as Detectron2's trainer uses),
    and checked, safe, converting loads (see the module docstring).

    Args (besides DetectionCheckpointer's):
        allow_pickle: unpickle files in full, beyond the arrays and containers the
            restricted unpickler builds (None: the D2SEG_ALLOW_PICKLE environment variable
            decides).
        allow_unverified: use URLs whose sha256 is unknown (None: D2SEG_ALLOW_UNVERIFIED).
    """

    def __init__(self, model, save_dir="", *, allow_pickle=None, allow_unverified=None, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.allow_pickle = allow_pickle
        self.allow_unverified = allow_unverified
        self._requested = None

    def load(self, path, *args, **kwargs):
        from d2seg.model_zoo.weights import resolve_weights

        self._requested = path
        if path and not os.path.isfile(path):
            local, verified = resolve_weights(path, allow_unverified=self.allow_unverified)
            if local != path:
                self.logger.info(f"{path} resolved to {local}" + (" (sha256 verified)" if verified else ""))
                path = local
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        from d2seg.model_zoo.loading import as_detectron2_checkpoint, load_checkpoint_file, pickle_allowed

        try:
            if filename.endswith(".pkl"):
                # Detectron2's own reader would unpickle anything; the restricted one builds arrays only
                return as_detectron2_checkpoint(load_checkpoint_file(filename, self.allow_pickle), filename)
            if filename.endswith(".pyth") and not pickle_allowed(self.allow_pickle):
                load_checkpoint_file(filename, allow_pickle=False)  # raises the explanation if it needs more
        except Exception as e:
            requested = getattr(self, "_requested", None)
            if requested and requested != filename:
                raise type(e)(f"{e} (requested as {requested})") from e
            raise
        if filename.endswith(".pyth"):
            return super()._load_file(filename)
        loaded = load_checkpoint_file(filename, allow_pickle=self.allow_pickle)
        if not isinstance(loaded, dict):
            raise TypeError(f"{filename}: a checkpoint must hold a dict, got {type(loaded).__name__}")
        if "model" not in loaded:
            loaded = {"model": loaded}
        # Detectron2's "?matching_heuristics=True" suffix on the path, as its loader reads it.
        parsed = getattr(self, "_parsed_url_during_load", None)
        if parsed is not None and parse_qs(parsed.query).get("matching_heuristics") == ["True"]:
            loaded["matching_heuristics"] = True
        return loaded

    def _load_model(self, checkpoint):
        from d2seg.model_zoo.converters import compare_with_model, convert_state_dict, mismatch_message

        if not checkpoint.get("matching_heuristics", False):
            target = self.model.state_dict()
            result = convert_state_dict(checkpoint["model"], target_keys=target.keys(), renaming_only=True)
            if result.converter is not None:
                self.logger.info(f"Recognised the checkpoint layout of {result.converter.description}; "
                                 f"converted to d2seg's names ({result.summary()})")
            if result.dropped:
                self.logger.info("Dropped buffers the model recomputes: "
                                 + ", ".join(f"{k} ({why})" for k, why in sorted(result.dropped.items())[:10])
                                 + (" ..." if len(result.dropped) > 10 else ""))
            checkpoint["model"] = result.state_dict
            missing, unexpected, shapes = compare_with_model(result.state_dict, target)
            if result.state_dict and len(missing) == len([k for k in target if not k.endswith("num_batches_tracked")]):
                raise RuntimeError(mismatch_message(missing, unexpected, shapes,
                                                    "the checkpoint (it shares no key with the model)"))
            if shapes:
                # e.g. an 80-class COCO checkpoint fine-tuned on 5 classes: Detectron2's loader
                # skips these; the model keeps their fresh initialisation.
                self.logger.warning(
                    f"{len(shapes)} parameter(s) of the checkpoint have another shape than the model's "
                    "(class-dependent layers when the class count differs): not loaded, kept at the model's "
                    "initialisation: "
                    + "; ".join(shapes))
        return super()._load_model(checkpoint)

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda f: f.write(last_filename_basename), mode="w")
