"""SparseInst's ONNX export now lives in :mod:`d2seg.deploy`, which exports every d2seg method
with its whole post-processing in the graph (class threshold, top-k, maskness, mask
upsampling and threshold, boxes) and dynamic input height and width (docs/deploy.md):

    python tools/export_model.py --config-file configs/SparseInst/X.yaml --output sparseinst.onnx \
        [--height H --width W | --dynamic] [KEY VALUE ...]

This module keeps the old import path of the export function and graph.
"""
import sys

from d2seg.deploy import export_onnx  # noqa: F401
from d2seg.deploy.sparseinst import SparseInstGraph  # noqa: F401

__all__ = ["export_onnx", "SparseInstGraph"]


if __name__ == "__main__":
    print("python -m d2seg.sparseinst.export has moved: run python tools/export_model.py --config-file X.yaml "
          "--output model.onnx [--height H --width W | --dynamic] [KEY VALUE ...] (docs/deploy.md)", file=sys.stderr)
    sys.exit(2)
