"""Checked downloads of weights into a local cache, and the ``d2seg://`` scheme.

``MODEL.WEIGHTS`` may be

- ``d2seg://<name>``: an entry of :mod:`d2seg.model_zoo.registry` (URL, sha256);
- ``https://...`` / ``http://...``: checked against the registry entry with that URL, or
  against a ``#sha256=<64 hex>`` fragment on the URL;
- a local path (unchanged).

A download goes to a temporary file in the cache folder, is hashed while it streams, and
is renamed onto its final name only when it is complete (its length equals the server's
Content-Length) and its sha256 is the expected one; otherwise the temporary file is
removed and :class:`DownloadError` / :class:`ChecksumMismatchError` is raised, so the cache
never holds a partial or wrong file. A cached file is re-hashed on every use.

A URL whose sha256 is unknown is refused unless the caller opts in
(``allow_unverified=True`` or the environment variable ``D2SEG_ALLOW_UNVERIFIED=1``).

Cache folder: ``$D2SEG_CACHE`` if set, else ``<Detectron2's cache>/d2seg``, where
Detectron2's cache is iopath's: ``$FVCORE_CACHE`` or ``~/.torch/iopath_cache``.

``d2seg://`` is registered as a handler in Detectron2's ``PathManager``
(:data:`detectron2.utils.file_io.PathManager`), so any Detectron2 code that resolves a path
(``DetectionCheckpointer``, ``DefaultPredictor``) understands it.
"""
import hashlib
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
from typing import Optional, Tuple
from urllib.parse import urlparse

from detectron2.utils.file_io import PathHandler, PathManager

__all__ = [
    "DownloadError", "ChecksumMismatchError", "UnverifiedDownloadError", "cache_dir",
    "sha256_of", "fetch", "resolve_weights", "D2SegHandler", "PREFIX",
]

logger = logging.getLogger(__name__)

PREFIX = "d2seg://"
_SHA_FRAGMENT = re.compile(r"#sha256=([0-9a-fA-F]{64})$")
_CHUNK = 1 << 20


class DownloadError(OSError):
    """A download failed (no network, HTTP error, truncated body); names the URL and the
    cache path where a manually downloaded file would be used."""


class ChecksumMismatchError(DownloadError):
    """The downloaded or cached file's sha256 is not the expected one."""


class UnverifiedDownloadError(DownloadError):
    """The URL's sha256 is unknown and the caller did not opt in to using it unchecked."""


def cache_dir() -> str:
    """The folder downloads are cached in (see the module docstring)."""
    root = os.environ.get("D2SEG_CACHE")
    if not root:
        from iopath.common.file_io import get_cache_dir

        root = os.path.join(get_cache_dir(), "d2seg")
    return os.path.expanduser(root)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def split_sha256(url: str) -> Tuple[str, Optional[str]]:
    """``https://x/y.pth#sha256=<hex>`` -> (``https://x/y.pth``, ``<hex>``)."""
    m = _SHA_FRAGMENT.search(url)
    if m:
        return url[: m.start()], m.group(1).lower()
    return url, None


def cache_path(url: str, filename: Optional[str] = None) -> str:
    """Where ``url`` is cached: ``<cache>/<host>/<url path>`` (``filename`` replaces the
    last part, for URLs like ``.../download``)."""
    parsed = urlparse(url)
    parts = [p for p in parsed.path.split("/") if p not in ("", ".", "..")]
    if filename:
        parts = parts[:-1] + [filename] if parts else [filename]
    if not parts:
        parts = ["index"]
    host = (parsed.hostname or "local") + (f"_{parsed.port}" if parsed.port else "")
    return os.path.join(cache_dir(), host, *parts)


def _download(url: str, dst: str, sha256: Optional[str], timeout: float) -> str:
    """Stream ``url`` into a temporary file beside ``dst``; rename it to ``dst`` only if it
    is complete and (when ``sha256`` is given) has that hash. Returns the hash."""
    folder = os.path.dirname(dst)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(dst) + ".", suffix=".part", dir=folder)
    h = hashlib.sha256()
    received = 0
    try:
        logger.info(f"Downloading {url} -> {dst}")
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "d2seg"})
            with urllib.request.urlopen(req, timeout=timeout) as resp, os.fdopen(fd, "wb") as f:
                expected_len = resp.headers.get("Content-Length")
                while True:
                    block = resp.read(_CHUNK)
                    if not block:
                        break
                    f.write(block)
                    h.update(block)
                    received += len(block)
                f.flush()
                os.fsync(f.fileno())
        except (urllib.error.URLError, OSError, ValueError) as e:  # incl. http.client.IncompleteRead
            reason = getattr(e, "reason", None) or e
            raise DownloadError(
                f"cannot download {url}: {type(e).__name__}: {reason}. No usable file at {dst}; "
                f"download it by other means and put it there (or point D2SEG_CACHE elsewhere)."
            ) from e
        if expected_len is not None and received != int(expected_len):
            raise DownloadError(f"download of {url} is truncated: got {received} of {expected_len} bytes "
                                f"(nothing was written to {dst})")
        if received == 0:
            raise DownloadError(f"download of {url} is empty (nothing was written to {dst})")
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256:
            raise ChecksumMismatchError(
                f"sha256 mismatch for {url}: expected {sha256}, got {digest} ({received} bytes); "
                f"the file was discarded (nothing was written to {dst})")
        os.replace(tmp, dst)
        logger.info(f"Downloaded {url} ({received} bytes, sha256 {digest})")
        return digest
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch(url: str, sha256: Optional[str] = None, filename: Optional[str] = None,
          allow_unverified: Optional[bool] = None, timeout: float = 60.0) -> str:
    """The local path of ``url``'s file: the cached copy if present (and, with ``sha256``,
    matching), else a checked download.

    Args:
        url: http(s) URL, optionally with a ``#sha256=<hex>`` fragment.
        sha256: expected hex digest; None means unknown (then ``allow_unverified`` or
            ``D2SEG_ALLOW_UNVERIFIED=1`` is required).
        filename: cache file name to use instead of the URL's last part.
    Raises:
        UnverifiedDownloadError, DownloadError, ChecksumMismatchError.
    """
    url, frag = split_sha256(url)
    sha256 = (sha256 or frag)
    sha256 = sha256.lower() if sha256 else None
    if allow_unverified is None:
        allow_unverified = _env_flag("D2SEG_ALLOW_UNVERIFIED")
    if sha256 is None and not allow_unverified:
        raise UnverifiedDownloadError(
            f"refusing to use {url}: its sha256 is unknown. Add '#sha256=<hex>' to the URL, use a "
            f"registry entry with a checksum, or opt in with D2SEG_ALLOW_UNVERIFIED=1.")
    dst = cache_path(url, filename)
    if os.path.isfile(dst):
        if sha256 is None:
            logger.warning(f"Using cached {dst} for {url} without a checksum (opted in)")
            return dst
        digest = sha256_of(dst)
        if digest == sha256:
            logger.info(f"Using cached {dst} for {url} (sha256 verified)")
            return dst
        logger.warning(f"Cached {dst} has sha256 {digest}, expected {sha256}: removing it and downloading again")
        os.unlink(dst)
    _download(url, dst, sha256, timeout)
    return dst


def resolve_weights(path: str, allow_unverified: Optional[bool] = None) -> Tuple[str, bool]:
    """``MODEL.WEIGHTS`` -> (local path, verified), where ``verified`` is True when the file
    was checked against a known sha256. ``d2seg://`` names and http(s) URLs are fetched;
    anything else is returned unchanged (verified False)."""
    from .registry import find_by_url, get_checkpoint

    if not path:
        return path, False
    if path.startswith(PREFIX):
        entry = get_checkpoint(path[len(PREFIX):])
        return entry.fetch(allow_unverified=allow_unverified), entry.sha256 is not None
    if path.startswith(("http://", "https://")):
        url, frag = split_sha256(path)
        entry = find_by_url(url)
        if entry is not None and frag is None:
            return entry.fetch(allow_unverified=allow_unverified), entry.sha256 is not None
        return fetch(path, allow_unverified=allow_unverified), frag is not None or (
            entry is not None and entry.sha256 is not None)
    return path, False


class D2SegHandler(PathHandler):
    """``d2seg://<name>`` for Detectron2's PathManager: fetches the registry entry (checked)."""

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
        from .registry import CHECKPOINTS

        return path[len(PREFIX):] in CHECKPOINTS


def register_handler() -> None:
    """Register :class:`D2SegHandler` in Detectron2's PathManager (once)."""
    if not any(isinstance(h, D2SegHandler) for h in PathManager._path_handlers.values()):
        PathManager.register_handler(D2SegHandler())


register_handler()
