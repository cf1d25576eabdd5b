"""Checked, resumable downloads into a local cache.

This module knows URLs and files only (the named checkpoints are in
:mod:`d2seg.model_zoo.registry`, ``MODEL.WEIGHTS`` resolution in
:mod:`d2seg.model_zoo.weights`; both import this one, never the other way round).

:func:`download` fetches one file from a list of mirrors into ``<dst>.part`` and renames it
onto ``dst`` only when it is complete and its sha256 is the expected one:

- **mirrors** are tried in order; a mirror that answers 404 (or another 4xx), keeps
  answering 5xx, serves a file of the wrong size or the wrong hash is skipped for the next;
- **redirects** are followed (Hugging Face's ``resolve/main`` URLs redirect to a CDN);
- **resume**: an interrupted transfer continues from its ``.part`` with an HTTP ``Range``
  request, within the same call (a dropped connection is retried with exponential
  back-off; a host name that does not resolve is not, so that a machine without network
  fails at once) and across calls (the ``.part`` of a transfer cut by a network failure stays);
  a server that ignores ``Range`` is read again from the start;
- **verification**: the sha256 of the whole file is checked before it is renamed; a wrong
  file is deleted (neither ``dst`` nor its ``.part`` is left), and so is a ``.part`` longer
  than the expected size;
- **progress**: a tqdm bar (size, rate, ETA) when stderr is a terminal, else a log line
  every few seconds with the same numbers;
- **Google Drive**: a web page where a file was expected is searched for Drive's large-file
  confirmation form (``<form id="download-form">``: the virus-scan warning), which is
  followed; any other page (e.g. Drive's quota message) is an error naming the manual
  fallback.

Concurrent processes (one per GPU) downloading the same file wait for each other on a lock
file ``<dst>.lock`` (iopath's ``file_lock``, as Detectron2's own downloads do).

Cache folder: ``$D2SEG_CACHE`` if set, else ``<Detectron2's cache>/d2seg``, where
Detectron2's cache is iopath's: ``$FVCORE_CACHE`` or ``~/.torch/iopath_cache``.
"""
import hashlib
import html.parser
import http.client
import logging
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from typing import List, Optional, Sequence, Tuple
from urllib.parse import urlencode, urljoin, urlparse

__all__ = [
    "DownloadError", "ChecksumMismatchError", "UnverifiedDownloadError", "cache_dir", "env_flag",
    "sha256_of", "split_sha256", "cache_path", "download", "fetch",
]

logger = logging.getLogger(__name__)

_SHA_FRAGMENT = re.compile(r"#sha256=([0-9a-fA-F]{64})$")
_CHUNK = 1 << 20
_USER_AGENT = "d2seg-model-zoo"
#: seconds between two progress log lines when stderr is not a terminal
LOG_EVERY_S = 5.0


class DownloadError(OSError):
    """A download failed (no network, HTTP error, truncated body, a web page instead of the
    file); names the URL(s) and the cache path where a file obtained by hand would be used."""


class ChecksumMismatchError(DownloadError):
    """The downloaded or cached file's sha256 is not the expected one."""


class UnverifiedDownloadError(DownloadError):
    """The file's sha256 is unknown and the caller did not opt in to using it unchecked."""


class _MirrorFailed(Exception):
    """This mirror cannot deliver the file (the next one is tried)."""


def cache_dir() -> str:
    """The folder downloads are cached in (see the module docstring)."""
    root = os.environ.get("D2SEG_CACHE")
    if not root:
        from iopath.common.file_io import get_cache_dir

        root = os.path.join(get_cache_dir(), "d2seg")
    return os.path.expanduser(root)


def env_flag(name: str) -> bool:
    """True when the environment variable ``name`` is 1 / true / yes / on."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def sha256_of(path: str) -> str:
    """The hex sha256 of a file."""
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
    """Where a plain ``url`` is cached: ``<cache>/<host>/<url path>`` (``filename`` replaces
    the last part, for URLs like ``.../download``)."""
    parsed = urlparse(url)
    parts = [p for p in parsed.path.split("/") if p not in ("", ".", "..")]
    if filename:
        parts = parts[:-1] + [filename] if parts else [filename]
    if not parts:
        parts = ["index"]
    host = (parsed.hostname or "local") + (f"_{parsed.port}" if parsed.port else "")
    return os.path.join(cache_dir(), host, *parts)


# ----------------------------------------------------------------------------- progress
def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class _Progress:
    """Bytes received of one file: a tqdm bar on a terminal, else a log line every
    ``LOG_EVERY_S`` seconds (received / total, percent, rate, ETA)."""

    def __init__(self, name: str, total: Optional[int], initial: int):
        self.name, self.total, self.done = name, total, initial
        self.start_bytes, self.t0 = initial, time.monotonic()
        self.last_log = self.t0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=name, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last_log >= LOG_EVERY_S:
            self.last_log = now
            logger.info(f"{self.name}: {self.line(now)}")

    def line(self, now: Optional[float] = None) -> str:
        elapsed = max((now or time.monotonic()) - self.t0, 1e-6)
        rate = (self.done - self.start_bytes) / elapsed
        if not self.total:
            return f"{_mb(self.done)} received, {_mb(rate)}/s"
        left = max(self.total - self.done, 0)
        eta = f"{left / rate:.0f} s" if rate > 0 else "unknown"
        return (f"{_mb(self.done)} of {_mb(self.total)} ({100.0 * self.done / self.total:.1f} %), "
                f"{_mb(rate)}/s, ETA {eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- Google Drive
class _DriveForm(html.parser.HTMLParser):
    """The large-file confirmation form of Google Drive's virus-scan warning page:
    ``<form id="download-form" action=...>`` and its hidden inputs (id, confirm, uuid)."""

    def __init__(self):
        super().__init__()
        self.action, self.method, self.fields, self._inside = None, "get", [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form" and attrs.get("id") == "download-form":
            self.action, self.method, self._inside = attrs.get("action"), (attrs.get("method") or "get"), True
        elif tag == "input" and self._inside and attrs.get("name") and attrs.get("type", "hidden") == "hidden":
            self.fields.append((attrs["name"], attrs.get("value") or ""))

    def handle_endtag(self, tag):
        if tag == "form":
            self._inside = False


def _page_text(page: str, limit: int = 200) -> str:
    """The visible text of an HTML page, shortened (for error messages)."""
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", page, flags=re.S | re.I)
    text = re.sub(r"<[^>]+>", " ", text)
    text = " ".join(html.unescape(text).split())
    return text[:limit] + ("..." if len(text) > limit else "")


def drive_confirm_url(page: str, page_url: str) -> Optional[str]:
    """The file URL behind Google Drive's large-file warning ``page`` (its download form's
    action plus hidden fields, e.g. ``.../download?id=<ID>&confirm=t&uuid=<uuid>``), or None
    when the page has no such form (quota exceeded, access denied, ...)."""
    form = _DriveForm()
    form.feed(page)
    if not form.action or form.method.lower() != "get":
        return None
    return urljoin(page_url, form.action) + ("&" if "?" in form.action else "?") + urlencode(form.fields)


# ----------------------------------------------------------------------------- HTTP
def _open(url: str, offset: int, timeout: float):
    """GET ``url`` from byte ``offset`` on (redirects followed by urllib, the Range header
    travels with them)."""
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


_RETRYABLE = (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, http.client.HTTPException)


def _fetch_part(url: str, part: str, size: Optional[int], name: str, timeout: float, retries: int,
                backoff: float) -> str:
    """Complete ``part`` from ``url`` (resuming what it holds). Returns the URL the bytes
    finally came from. Raises _MirrorFailed when this mirror cannot deliver the file."""
    attempt, hops = 0, 0
    while True:
        offset = os.path.getsize(part) if os.path.exists(part) else 0
        if size is not None and offset > size:
            logger.warning(f"{part} holds {offset} bytes, more than the expected {size}: starting again")
            os.unlink(part)
            offset = 0
        if size is not None and offset == size:
            return url
        try:
            with _open(url, offset, timeout) as resp:
                ctype = resp.headers.get("Content-Type", "")
                if ctype.startswith("text/html"):
                    page = resp.read(2_000_000).decode("utf-8", "replace")
                    confirm = drive_confirm_url(page, resp.geturl())
                    if confirm is None or hops >= 2:
                        raise _MirrorFailed(
                            f"{url} answered with a web page, not the file (Google Drive's quota or "
                            f"permission page looks like this): \"{_page_text(page)}\"")
                    logger.info(f"{url}: following Google Drive's large-file confirmation to {confirm}")
                    url, hops = confirm, hops + 1
                    continue
                length = resp.headers.get("Content-Length")
                length = int(length) if length is not None else None
                if offset and resp.status == 206:
                    m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
                    if not m or int(m.group(1)) != offset:
                        raise _MirrorFailed(f"{url}: asked for bytes from {offset}, got Content-Range "
                                            f"{resp.headers.get('Content-Range')!r}")
                    logger.info(f"Resuming {name} at byte {offset} from {resp.geturl()}")
                elif offset:
                    logger.info(f"{url} does not support resuming (status {resp.status}): starting again")
                    offset = 0
                total = offset + length if length is not None else None
                if size is not None and total is not None and total != size:
                    raise _MirrorFailed(f"{url} offers {total} bytes, the zoo expects {size}: another file")
                progress = _Progress(name, total if total is not None else size, offset)
                try:
                    with open(part, "ab" if offset else "wb") as f:
                        while True:
                            block = resp.read(_CHUNK)
                            if not block:
                                break
                            f.write(block)
                            progress.update(len(block))
                finally:
                    progress.close()
                got = os.path.getsize(part)
                expected = total if total is not None else size  # no Content-Length: the published size
                if expected is not None and got < expected:
                    raise http.client.IncompleteRead(b"", expected - got)
                if size is not None and got > size:
                    os.unlink(part)
                    raise _MirrorFailed(f"{url} delivered {got} bytes, the zoo expects {size}: another file")
                return resp.geturl()
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset:  # the part does not fit the file any more
                os.unlink(part)
                continue
            if (e.code < 500 and e.code != 429) or attempt >= retries:
                raise _MirrorFailed(f"{url}: HTTP {e.code} {e.reason}") from e
            why = f"HTTP {e.code}"
        except _RETRYABLE as e:
            if isinstance(e, urllib.error.URLError) and isinstance(e.reason, socket.gaierror):
                # the host's name does not resolve (no network or DNS here): waiting will not help
                raise _MirrorFailed(f"{url}: cannot resolve {urlparse(url).hostname!r} ({e.reason}); "
                                    f"no network here?") from e
            if attempt >= retries:
                raise _MirrorFailed(f"{url}: {type(e).__name__}: {getattr(e, 'reason', None) or e} "
                                    f"(gave up after {retries + 1} attempts)") from e
            why = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
        delay = backoff * (2 ** attempt)
        attempt += 1
        have = os.path.getsize(part) if os.path.exists(part) else 0
        logger.warning(f"{name}: {why}; retrying in {delay:.1f} s from byte {have} "
                       f"(attempt {attempt + 1} of {retries + 1})")
        time.sleep(delay)


def download(urls: Sequence[str], dst: str, sha256: Optional[str] = None, size: Optional[int] = None, *,
             timeout: float = 60.0, retries: int = 4, backoff: float = 1.0, hint: str = "") -> str:
    """Download one file from ``urls`` (mirrors of the same file, tried in order) to ``dst``.

    Args:
        urls: http(s) URLs of the same file.
        dst: the final path; the transfer goes to ``dst + ".part"``.
        sha256: expected hex digest of the whole file (None: not checked).
        size: expected size in bytes (None: not checked); a mirror offering another size is
            skipped before its body is read.
        retries: attempts after the first, per mirror, on a dropped connection or a 5xx;
            the n-th waits ``backoff * 2**(n-1)`` seconds and resumes from the ``.part``.
        hint: appended to the error message (what to do by hand).
    Returns:
        the file's sha256.
    Raises:
        ChecksumMismatchError when every mirror that delivered a file delivered a wrong one;
        DownloadError when no mirror delivered the file.
    """
    from iopath.common.file_io import file_lock

    if not urls:
        raise ValueError(f"no URL to download {dst} from")
    name = os.path.basename(dst)
    part = dst + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    failures: List[str] = []
    mismatched = False
    with file_lock(dst):
        if os.path.isfile(dst) and sha256 is not None and sha256_of(dst) == sha256:
            return sha256  # another process finished it while we waited for the lock
        for i, url in enumerate(urls):
            if i:
                logger.info(f"Trying the next mirror for {name}: {url}")
            else:
                logger.info(f"Downloading {url} -> {dst}")
            try:
                source = _fetch_part(url, part, size, name, timeout, retries, backoff)
            except _MirrorFailed as e:
                failures.append(str(e))
                logger.warning(f"{name}: {e}")
                continue
            digest = sha256_of(part)
            if sha256 is not None and digest != sha256:
                got = os.path.getsize(part)
                os.unlink(part)
                mismatched = True
                failures.append(f"{url}: sha256 mismatch: expected {sha256}, got {digest} ({got} bytes); "
                                f"the file was discarded")
                logger.warning(f"{name}: {failures[-1]}")
                continue
            os.replace(part, dst)
            logger.info(f"Downloaded {name} from {source} ({os.path.getsize(dst)} bytes, sha256 {digest}"
                        + (", verified)" if sha256 is not None else ", not verified: no checksum known)"))
            return digest
    kept = f" The partial file {part} is kept and a later call resumes it." if os.path.exists(part) else ""
    cls = ChecksumMismatchError if mismatched else DownloadError
    raise cls(f"cannot download {name}; nothing was written to {dst}.{kept}\n  "
              + "\n  ".join(failures) + (f"\n{hint}" if hint else ""))


def fetch(url: str, sha256: Optional[str] = None, filename: Optional[str] = None,
          allow_unverified: Optional[bool] = None, timeout: float = 60.0) -> str:
    """The local path of a plain ``url``'s file: the cached copy if present (and, with a
    sha256, matching), else a checked download into :func:`cache_path`.

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
        allow_unverified = env_flag("D2SEG_ALLOW_UNVERIFIED")
    if sha256 is None and not allow_unverified:
        raise UnverifiedDownloadError(
            f"refusing to use {url}: its sha256 is unknown. Add '#sha256=<hex>' to the URL, use a "
            f"registry entry with a checksum, or opt in with D2SEG_ALLOW_UNVERIFIED=1.")
    dst = cache_path(url, filename)
    if use_cached(dst, sha256, url):
        return dst
    download([url], dst, sha256, timeout=timeout,
             hint=f"Without network, download {url} by other means and save it as {dst}.")
    return dst


def use_cached(dst: str, sha256: Optional[str], what: str) -> bool:
    """True when ``dst`` exists and (with ``sha256``) has that hash; a cached file with
    another hash is deleted (and False returned)."""
    if not os.path.isfile(dst):
        return False
    if sha256 is None:
        logger.warning(f"Using cached {dst} for {what} without a checksum (opted in)")
        return True
    digest = sha256_of(dst)
    if digest == sha256:
        logger.info(f"Using cached {dst} for {what} (sha256 verified)")
        return True
    logger.warning(f"Cached {dst} has sha256 {digest}, expected {sha256}: removing it and downloading again")
    os.unlink(dst)
    return False
