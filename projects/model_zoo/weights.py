"""``MODEL.WEIGHTS`` -> a local file, and the ``d2seg://`` scheme in Detectron2's PathManager.

``MODEL.WEIGHTS`` may be

- ``d2seg://<name>``: an entry of :mod:`d2seg.model_zoo.registry` (mirrors, sha256),
  downloaded and verified (:mod:`d2seg.model_zoo.download`);
- ``d2seg://shapes/<name>``: a checkpoint made on this machine on first use
  (:func:`d2seg.data.pretrained.resolve_pretrained`);
- ``https://...`` / ``http://...``: checked against the registry entry with that URL, or
  against a ``#sha256=<64 hex>`` fragment on the URL;
- anything else (a local path, ``detectron2://...``): returned unchanged.

:class:`D2SegHandler` is registered in Detectron2's ``PathManager``
(:data:`detectron2.utils.file_io.PathManager`) when :mod:`d2seg.model_zoo` is imported, so any
Detectron2 code that resolves a path (``DetectionCheckpointer``, ``DefaultPredictor``)
understands ``d2seg://``. It adds a prefix; it changes no other handler.
"""
from typing import Optional, Tuple

from detectron2.utils.file_io import PathHandler, PathManager

from .download import fetch, split_sha256
from .registry import CHECKPOINTS, PREFIX, find_by_url, get_checkpoint

__all__ = ["resolve_weights", "D2SegHandler", "register_handler", "LOCAL_PREFIX"]

#: ``d2seg://`` names under this prefix are made locally, not downloaded
LOCAL_PREFIX = "shapes/"


def resolve_weights(path: str, allow_unverified: Optional[bool] = None) -> Tuple[str, bool]:
    """``MODEL.WEIGHTS`` -> (local path, verified), where ``verified`` is True when the file
    was checked against a known sha256 (see the module docstring)."""
    if not path:
        return path, False
    if path.startswith(PREFIX):
        name = path[len(PREFIX):]
        if name.startswith(LOCAL_PREFIX):
            from d2seg.data.pretrained import resolve_pretrained

            return resolve_pretrained(name), False
        entry = get_checkpoint(name)
        local = entry.fetch(allow_unverified=allow_unverified)
        return local, entry.expected_sha256() is not None
    if path.startswith(("http://", "https://")):
        url, frag = split_sha256(path)
        entry = find_by_url(url)
        if entry is not None and frag is None:
            return entry.fetch(allow_unverified=allow_unverified), entry.expected_sha256() is not None
        return fetch(path, allow_unverified=allow_unverified), frag is not None
    return path, False


class D2SegHandler(PathHandler):
    """``d2seg://<name>`` for Detectron2's PathManager: the checked file of the registry
    entry (or the locally made ``shapes/`` checkpoint)."""

    def _get_supported_prefixes(self):
        return [PREFIX]

    def _get_local_path(self, path, force=False, **kwargs):
        # ``force`` (re-download) is what PathManager passes for URLs; a cached file is
        # re-verified on every use here, so there is nothing to force.
        self._check_kwargs(kwargs)
        return resolve_weights(path)[0]

    def _open(self, path, mode="r", buffering=-1, **kwargs):
        self._check_kwargs(kwargs)
        if mode not in ("r", "rb"):
            raise ValueError(f"{path}: d2seg:// paths are read-only (mode {mode!r})")
        return open(self._get_local_path(path), mode)

    def _exists(self, path, **kwargs):
        from .registry import LOCAL_CHECKPOINTS

        name = path[len(PREFIX):]
        return name in CHECKPOINTS or name in LOCAL_CHECKPOINTS


def register_handler() -> None:
    """Register :class:`D2SegHandler` in Detectron2's PathManager (once)."""
    if not any(isinstance(h, D2SegHandler) for h in PathManager._path_handlers.values()):
        PathManager.register_handler(D2SegHandler())
