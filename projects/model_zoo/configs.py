"""Config lookup in the style of ``detectron2.model_zoo``: paths relative to configs/,
e.g. ``"SparseInst/sparse_inst_r50_giam.yaml"``.

The YAML files ship inside the package as ``d2seg/model_zoo/configs/`` (setup.py maps that
package folder to the repository's configs/). In an editable install or a source checkout
that folder does not exist under projects/, and the repository's configs/ is used.
"""
import os
from typing import List, Optional

__all__ = ["configs_root", "list_configs", "get_config_file", "get_config", "get"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def configs_root() -> str:
    """The folder holding the YAML configs (installed package data, else the checkout's)."""
    candidates = [
        os.path.join(_HERE, "configs"),  # wheel / regular install
        os.path.join(os.path.dirname(os.path.dirname(_HERE)), "configs"),  # editable: projects/../configs
    ]
    for c in candidates:
        if os.path.isdir(c) and any(f.endswith(".yaml") for _, _, fs in os.walk(c) for f in fs):
            return c
    raise FileNotFoundError(f"d2seg's configs were not found (looked in {candidates}); "
                            f"reinstall the package (pip install .) so that they ship with it")


def list_configs() -> List[str]:
    """Every config, as a path relative to configs/ with '/' separators, sorted."""
    root = configs_root()
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".yaml"):
                out.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(out)


def get_config_file(config_path: str) -> str:
    """The absolute path of ``config_path`` (relative to configs/, e.g.
    ``"CondInst/R_50_1x.yaml"``). Raises RuntimeError naming close matches if unknown."""
    root = configs_root()
    rel = config_path.replace("\\", "/").lstrip("/")
    if rel.startswith("configs/"):
        rel = rel[len("configs/"):]
    path = os.path.normpath(os.path.join(root, rel))
    if not path.startswith(os.path.normpath(root) + os.sep) or not os.path.isfile(path):
        folder = rel.split("/")[0]
        near = [c for c in list_configs() if c.startswith(folder + "/")] or list_configs()[:10]
        raise RuntimeError(f"{config_path} is not a d2seg config (looked in {root}); e.g. {near[:10]}")
    return path


def get_config(config_path: str, trained: bool = False, opts: Optional[list] = None):
    """A d2seg CfgNode: Detectron2's defaults + d2seg's keys + the YAML (+ ``opts``).
    ``trained=True`` also sets MODEL.WEIGHTS to the model zoo's checkpoint for this config
    (``d2seg://<name>``) and applies that entry's config overrides."""
    from d2seg.config import get_d2seg_cfg

    cfg = get_d2seg_cfg()
    cfg.merge_from_file(get_config_file(config_path))
    if trained:
        entry = _entry_for(config_path)
        cfg.merge_from_list(list(entry.opts))
        cfg.MODEL.WEIGHTS = f"d2seg://{entry.name}"
    if opts:
        cfg.merge_from_list(list(opts))
    return cfg


def _entry_for(config_path):
    from .registry import CHECKPOINTS, find_by_config

    rel = config_path.replace("\\", "/").lstrip("/")
    entries = find_by_config(rel)
    if not entries:
        have = sorted({e.config for e in CHECKPOINTS.values()})
        raise RuntimeError(f"the model zoo has no trained checkpoint for {config_path}; configs with one: {have}")
    return entries[0]


def get(config_path: str, trained: bool = False, device: Optional[str] = None, opts: Optional[list] = None):
    """Build the model of ``config_path`` (eval mode unless untrained). ``trained=True``
    loads the zoo checkpoint for it (downloaded, checked, converted). ``device`` defaults
    to "cuda" when available, else "cpu"."""
    import torch
    from detectron2.modeling import build_model

    import d2seg  # noqa: F401  (registers every method)
    from d2seg.engine.checkpoint import AtomicCheckpointer

    cfg = get_config(config_path, trained=trained, opts=opts)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.MODEL.DEVICE = device
    model = build_model(cfg)
    if trained:
        AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        model.eval()
    return model
