"""A Detectron2 checkpointer whose files are never seen half-written.

Detectron2 (fvcore) writes ``model_XXXXXXX.pth`` in place and then points
``last_checkpoint`` at it. A process killed during that write leaves a truncated file
under the final name, and ``--resume`` then fails on it (or, worse, on a file that happens
to unpickle). Here every file is written to a temporary name in the same folder, flushed
to disk, and atomically renamed; ``last_checkpoint`` is updated the same way, only after
the checkpoint itself is complete.
"""
import os
import tempfile

import torch
from detectron2.checkpoint import DetectionCheckpointer


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
    ``last_checkpoint`` tag. Local paths only for writing (as Detectron2's trainer uses)."""

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
