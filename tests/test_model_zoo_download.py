"""d2seg.model_zoo downloads against a real HTTP server on 127.0.0.1 (http.server in a
thread; no network): redirect chains, resume with HTTP Range after the server cuts a transfer,
retries, the next mirror on 404 / 5xx / wrong size / wrong hash, a wrong hash rejected with
nothing left in the cache, Google Drive's large-file confirmation form and its quota page,
progress lines, pinning an unpinned entry on first download, and the real
``d2seg://adelaidet/FCOS_R_50_1x`` entry (pinned: no opt-in; Hugging Face mirrors in order).

The server and the fixtures (``server``, ``cache``, ``entry``) are also used by
tests/test_model_zoo.py.
"""
import dataclasses
import hashlib
import logging
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from d2seg import model_zoo
from d2seg.model_zoo import (
    CheckpointEntry, ChecksumMismatchError, DownloadError, UnverifiedDownloadError, register_checkpoint,
    unregister_checkpoint,
)
import d2seg.model_zoo.download as dl
from d2seg.model_zoo.cli import main as zoo_main


# ----------------------------------------------------------------------------- the server
@dataclasses.dataclass
class Route:
    """What the server answers for one path (with its query).

    body: the file; status: the HTTP status (a 3xx needs ``location``, a 4xx/5xx sends no
    body); ranges: honour ``Range: bytes=N-`` (206) or ignore it (200, whole file);
    cut_at / cuts: for the first ``cuts`` requests, close the connection after sending the
    file up to byte ``cut_at`` (while promising all of it); content_type: of the answer;
    length: send Content-Length (else the body ends where the connection closes).
    """

    body: bytes = b""
    status: int = 200
    location: str = ""
    ranges: bool = True
    cut_at: int = 0
    cuts: int = 0
    content_type: str = "application/octet-stream"
    length: bool = True


class _Handler(BaseHTTPRequestHandler):
    routes = {}  # path (with query) -> Route
    hits = []  # (path, Range header or None)

    def do_GET(self):
        self.hits.append((self.path, self.headers.get("Range")))
        route = self.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        if route.status != 200:
            self.send_response(route.status)
            if route.location:
                self.send_header("Location", route.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body, start = route.body, 0
        m = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if m and route.ranges:
            start = int(m.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", route.content_type)
        if route.length:
            self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        end = len(body)
        if route.cuts > 0:
            route.cuts -= 1
            end = max(route.cut_at, start)
        self.wfile.write(body[start:end])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """(server, base URL); routes and hits are reset for each test."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    _Handler.routes, _Handler.hits = {}, []
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder as D2SEG_CACHE, and none of the opt-ins set."""
    root = tmp_path / "cache"
    monkeypatch.setenv("D2SEG_CACHE", str(root))
    for var in ("D2SEG_ALLOW_UNVERIFIED", "D2SEG_ALLOW_PICKLE"):
        monkeypatch.delenv(var, raising=False)
    return root


@pytest.fixture
def entry():
    """make(name, urls, sha256, **fields): a registry entry, removed after the test."""
    created = []

    def make(name, urls, sha256, **kw):
        urls = (urls,) if isinstance(urls, str) else tuple(urls)
        kw.setdefault("converter", None)
        kw.setdefault("config", "CondInst/condinst_R18_shapes.yaml")
        kw.setdefault("filename", urls[0].split("/")[-1].split("?")[0])
        if sha256 is None:
            kw.setdefault("unpinned", "a test file without a published checksum.")
        e = register_checkpoint(CheckpointEntry(name, urls, sha256, **kw), overwrite=True)
        created.append(name)
        return e

    yield make
    for n in created:
        unregister_checkpoint(n)


def sha(b):
    return hashlib.sha256(b).hexdigest()


def files(folder):
    """Every file under ``folder`` (relative paths), without iopath's lock files."""
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder)
                  for f in fs if not f.endswith(".lock"))


BODY = bytes(range(256)) * 4096  # 1 MiB, not constant, so a misplaced byte changes the hash
FAST = dict(backoff=0.0, timeout=10.0)  # retries without waiting


# ----------------------------------------------------------------------------- tests
def test_redirect_chain_is_followed(server, cache, entry):
    _, base = server
    _Handler.routes.update({
        "/resolve/main/w.pth": Route(status=301, location="/r1"),
        "/r1": Route(status=302, location=base + "/r2"),  # absolute
        "/r2": Route(status=307, location="/r3"),
        "/r3": Route(status=308, location="/cdn/w.pth?sig=1"),
        "/cdn/w.pth?sig=1": Route(BODY),
    })
    e = entry("test/redirects", base + "/resolve/main/w.pth", sha(BODY), size=len(BODY))
    path, verified = model_zoo.resolve_weights("d2seg://test/redirects")
    assert verified and path == e.cache_path()
    assert open(path, "rb").read() == BODY
    assert [h[0] for h in _Handler.hits] == ["/resolve/main/w.pth", "/r1", "/r2", "/r3", "/cdn/w.pth?sig=1"]
    assert files(cache) == [os.path.join("zoo", "test", "redirects", "w.pth")]


def test_resume_after_the_server_cuts_the_transfer(server, cache, entry, caplog):
    _, base = server
    cut = 300_001
    _Handler.routes["/w.pth"] = Route(BODY, cut_at=cut, cuts=1)
    e = entry("test/resume", base + "/w.pth", sha(BODY), size=len(BODY))
    with caplog.at_level(logging.INFO, logger="d2seg.model_zoo"):
        path = e.fetch(**FAST)
    assert _Handler.hits == [("/w.pth", None), ("/w.pth", f"bytes={cut}-")]  # the rest only
    assert sha(open(path, "rb").read()) == sha(BODY)  # the resumed file is the published one
    assert f"Resuming w.pth at byte {cut}" in caplog.text
    assert files(cache) == [os.path.join("zoo", "test", "resume", "w.pth")]


def test_resume_across_calls_from_the_part_file(server, cache, entry):
    """A transfer that keeps failing leaves its .part (never the final name); the next call
    continues it with a Range request."""
    _, base = server
    cut = 123_457
    _Handler.routes["/w.pth"] = Route(BODY, cut_at=cut, cuts=1)
    e = entry("test/resume2", base + "/w.pth", sha(BODY), size=len(BODY))
    with pytest.raises(DownloadError, match="is kept and a later call resumes it") as err:
        e.fetch(retries=0, **FAST)
    assert not isinstance(err.value, ChecksumMismatchError)
    assert os.path.getsize(e.cache_path() + ".part") == cut and not os.path.exists(e.cache_path())
    assert open(e.fetch(**FAST), "rb").read() == BODY
    assert _Handler.hits[-1] == ("/w.pth", f"bytes={cut}-")
    assert not os.path.exists(e.cache_path() + ".part")


def test_cut_without_content_length_is_caught_by_the_published_size(server, cache, entry):
    """Without Content-Length a cut transfer looks complete to HTTP; the entry's size shows
    it is not, and the rest is fetched with Range."""
    _, base = server
    _Handler.routes["/w.pth"] = Route(BODY, cut_at=77_777, cuts=1, length=False)
    e = entry("test/nolength", base + "/w.pth", sha(BODY), size=len(BODY))
    assert open(e.fetch(**FAST), "rb").read() == BODY
    assert _Handler.hits == [("/w.pth", None), ("/w.pth", "bytes=77777-")]


def test_server_that_ignores_range_is_read_again(server, cache, entry):
    _, base = server
    _Handler.routes["/w.pth"] = Route(BODY, cut_at=5000, cuts=1, ranges=False)
    e = entry("test/norange", base + "/w.pth", sha(BODY))
    assert open(e.fetch(**FAST), "rb").read() == BODY
    assert _Handler.hits == [("/w.pth", None), ("/w.pth", "bytes=5000-")]  # asked, got 200 + everything


def test_wrong_hash_is_rejected_and_nothing_is_left(server, cache, entry):
    _, base = server
    _Handler.routes["/w.pth"] = Route(BODY)
    e = entry("test/bad", base + "/w.pth", "0" * 64)
    with pytest.raises(ChecksumMismatchError, match=f"expected {'0' * 64}, got {sha(BODY)}"):
        model_zoo.resolve_weights("d2seg://test/bad")
    assert files(cache) == []  # neither the file nor its .part
    assert not os.path.exists(e.cache_path())
    # the same rule for a plain URL with a #sha256= fragment
    with pytest.raises(ChecksumMismatchError):
        model_zoo.fetch(base + "/w.pth#sha256=" + "1" * 64)
    assert files(cache) == []
    assert open(model_zoo.fetch(base + "/w.pth#sha256=" + sha(BODY)), "rb").read() == BODY


def test_404_on_the_first_mirror_falls_to_the_second(server, cache, entry, caplog):
    _, base = server
    _Handler.routes["/mirror2/w.pth"] = Route(BODY)
    e = entry("test/mirrors", (base + "/mirror1/w.pth", base + "/mirror2/w.pth"), sha(BODY))
    with caplog.at_level(logging.INFO, logger="d2seg.model_zoo"):
        assert open(e.fetch(**FAST), "rb").read() == BODY
    assert [h[0] for h in _Handler.hits] == ["/mirror1/w.pth", "/mirror2/w.pth"]  # no retry of a 404
    assert "HTTP 404" in caplog.text and "Trying the next mirror" in caplog.text


def test_a_host_that_does_not_resolve_fails_without_waiting(server, cache, entry, caplog):
    """No network (or DNS): the mirror fails at once, without the back-off meant for dropped
    connections (2 mirrors x 15 s of waiting on an offline compute node), and the next
    mirror is tried."""
    _, base = server
    _Handler.routes["/w.pth"] = Route(BODY)
    e = entry("test/nodns", ("http://d2seg-test.invalid/w.pth", base + "/w.pth"), sha(BODY))
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="d2seg.model_zoo.download"):
        assert os.path.isfile(e.fetch(backoff=5.0, timeout=10.0))
    assert time.monotonic() - t0 < 5.0
    assert "cannot resolve 'd2seg-test.invalid'" in caplog.text and "retrying" not in caplog.text


def test_5xx_is_retried_then_the_next_mirror(server, cache, entry):
    _, base = server
    _Handler.routes["/m1/w.pth"] = Route(status=503)
    _Handler.routes["/m2/w.pth"] = Route(BODY)
    e = entry("test/5xx", (base + "/m1/w.pth", base + "/m2/w.pth"), sha(BODY))
    assert open(e.fetch(retries=2, **FAST), "rb").read() == BODY
    assert [h[0] for h in _Handler.hits] == ["/m1/w.pth"] * 3 + ["/m2/w.pth"]


def test_mirror_with_another_size_or_hash_is_skipped(server, cache, entry):
    _, base = server
    other = BODY[::-1]
    _Handler.routes.update({"/small.pth": Route(BODY[:1000]), "/other.pth": Route(other), "/w.pth": Route(BODY)})
    e = entry("test/size", (base + "/small.pth", base + "/other.pth", base + "/w.pth"), sha(BODY),
              size=len(BODY), filename="w.pth")
    assert open(e.fetch(**FAST), "rb").read() == BODY
    # every mirror failing: the message lists each one's reason, and the manual fallback
    e2 = entry("test/size2", (base + "/small.pth", base + "/other.pth"), sha(BODY), size=len(BODY),
               filename="w.pth")
    with pytest.raises(ChecksumMismatchError) as err:
        e2.fetch(**FAST)
    msg = str(err.value)
    assert f"offers 1000 bytes, the zoo expects {len(BODY)}" in msg and f"got {sha(other)}" in msg
    assert "save it as " + e2.cache_path() in msg
    assert files(cache / "zoo" / "test" / "size2") == []


def _drive_page(action, file_id):
    return (f'<html><body><p>Google Drive can\'t scan this file for viruses.</p>'
            f'<form id="download-form" action="{action}" method="get">'
            f'<input type="submit" value="Download anyway"/>'
            f'<input type="hidden" name="id" value="{file_id}">'
            f'<input type="hidden" name="confirm" value="t">'
            f'<input type="hidden" name="uuid" value="1b2c-3d"></form></body></html>').encode()


def test_google_drive_large_file_form_is_followed_and_pinned(server, cache, entry, capsys):
    _, base = server
    _Handler.routes.update({
        "/uc?export=download&id=ABC": Route(_drive_page(base + "/download", "ABC"), content_type="text/html"),
        "/download?id=ABC&confirm=t&uuid=1b2c-3d": Route(BODY),
    })
    e = entry("test/drive", base + "/uc?export=download&id=ABC", None, filename="sparse.pth")
    with pytest.raises(UnverifiedDownloadError, match="download test/drive --pin"):
        e.fetch()
    assert _Handler.hits == []  # refused before any request
    assert zoo_main(["download", "d2seg://test/drive", "--pin"]) == 0
    out = capsys.readouterr().out
    assert f"pinned locally: sha256 {sha(BODY)}" in out and f'sha256="{sha(BODY)}"' in out
    assert [h[0] for h in _Handler.hits] == ["/uc?export=download&id=ABC", "/download?id=ABC&confirm=t&uuid=1b2c-3d"]
    # from now on the entry is verified against its pin, with no opt-in
    assert model_zoo.resolve_weights("d2seg://test/drive") == (e.cache_path(), True)
    assert e.checksum_status() == "pinned locally"
    # a changed file upstream no longer matches the pin
    os.unlink(e.cache_path())
    _Handler.routes["/download?id=ABC&confirm=t&uuid=1b2c-3d"] = Route(BODY[::-1])
    with pytest.raises(ChecksumMismatchError, match=f"expected {sha(BODY)}"):
        e.fetch(**FAST)
    assert not os.path.exists(e.cache_path())


def test_google_drive_quota_page_names_the_manual_fallback(server, cache, entry):
    _, base = server
    page = (b"<html><head><title>Google Drive - Quota exceeded</title><style>p{}</style></head><body>"
            b"<p>Too many users have viewed or downloaded this file recently.</p></body></html>")
    _Handler.routes["/uc?export=download&id=XYZ"] = Route(page, content_type="text/html; charset=utf-8")
    e = entry("test/quota", base + "/uc?export=download&id=XYZ", None, filename="q.pth",
              manual="Open https://drive.google.com/file/d/XYZ/view in a browser and save the file as {dst}.")
    with pytest.raises(DownloadError) as err:
        e.fetch(allow_unverified=True, **FAST)
    msg = str(err.value)
    assert "answered with a web page, not the file" in msg and "Too many users have viewed" in msg
    assert "https://drive.google.com/file/d/XYZ/view in a browser and save the file as " + e.cache_path() in msg
    assert files(cache) == []


def test_progress_lines_when_not_on_a_terminal(server, cache, entry, caplog, monkeypatch):
    _, base = server
    _Handler.routes["/w.pth"] = Route(BODY * 3)
    monkeypatch.setattr(dl, "LOG_EVERY_S", 0.0)
    e = entry("test/progress", base + "/w.pth", sha(BODY * 3))
    with caplog.at_level(logging.INFO, logger="d2seg.model_zoo"):
        e.fetch(**FAST)
    lines = [r.getMessage() for r in caplog.records if "ETA" in r.getMessage()]
    assert lines and all(line.startswith("w.pth: ") for line in lines)
    assert re.search(r"3\.1 MB of 3\.1 MB \(100\.0 %\), [\d.]+ MB/s, ETA 0 s", lines[-1]), lines[-1]


def test_progress_bar_on_a_terminal(server, cache, entry, monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    _, base = server
    _Handler.routes["/w.pth"] = Route(BODY * 3)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    entry("test/bar", base + "/w.pth", sha(BODY * 3)).fetch(**FAST)
    assert re.search(r"w\.pth: 100%.*3\.00M/3\.00M", term.getvalue()), term.getvalue()[-300:]


def test_cli_download_fills_another_cache(server, cache, entry, tmp_path, capsys):
    _, base = server
    _Handler.routes["/a.pth"] = Route(BODY)
    _Handler.routes["/b.pth"] = Route(BODY[::-1])
    entry("clitest/a", base + "/a.pth", sha(BODY))
    entry("clitest/b", base + "/b.pth", sha(BODY[::-1]))
    shared = tmp_path / "shared"
    assert zoo_main(["download", "clitest/*", "--to", str(shared)]) == 0
    out = capsys.readouterr().out
    assert f"export D2SEG_CACHE={shared}" in out and out.count("verified") == 2
    assert files(shared) == [os.path.join("zoo", "clitest", n, f"{n}.pth") for n in ("a", "b")]
    assert files(cache) == []
    assert zoo_main(["download", "clitest/nothing*"]) == 2


def test_cli_download_to_a_relative_folder_prints_its_absolute_path(server, cache, entry, tmp_path,
                                                                     capsys, monkeypatch):
    """The printed ``export D2SEG_CACHE=...`` is for other machines and job scripts, which
    do not start in this folder."""
    _, base = server
    _Handler.routes["/a.pth"] = Route(BODY)
    entry("clitest/a", base + "/a.pth", sha(BODY))
    monkeypatch.chdir(tmp_path)
    assert zoo_main(["download", "clitest/a", "--to", "shared"]) == 0
    assert f"export D2SEG_CACHE={tmp_path / 'shared'}\n" in capsys.readouterr().out
    assert files(tmp_path / "shared") == [os.path.join("zoo", "clitest", "a", "a.pth")]


def test_fcos_r50_entry_needs_no_opt_in_and_tries_the_hugging_face_mirrors(server, cache):
    """The real d2seg://adelaidet/FCOS_R_50_1x: pinned (no environment variable), fetched from
    Hugging Face ``resolve/main`` URLs, tianzhi/AdelaiDet-FCOS first, ZjuCv/AdelaiDet second.
    Its URLs are pointed at the local server (same paths, as the real host would redirect to
    its CDN); the server's file is not the real one, so each mirror is rejected by its size
    (before the body is read) and the download fails with both named, in order."""
    srv, base = server
    real = model_zoo.get_checkpoint("adelaidet/FCOS_R_50_1x")
    local = dataclasses.replace(real, urls=tuple(u.replace("https://huggingface.co", base) for u in real.urls))
    for u in local.urls:
        path = u[len(base):]
        _Handler.routes[path] = Route(status=302, location="/cdn" + path)
        _Handler.routes["/cdn" + path] = Route(BODY)
    register_checkpoint(local, overwrite=True)
    try:
        with pytest.raises(DownloadError) as err:
            model_zoo.resolve_weights("d2seg://adelaidet/FCOS_R_50_1x")
    finally:
        register_checkpoint(real, overwrite=True)
    assert not isinstance(err.value, UnverifiedDownloadError)
    assert [h[0] for h in _Handler.hits] == [
        "/tianzhi/AdelaiDet-FCOS/resolve/main/FCOS_R_50_1x.pth", "/cdn/tianzhi/AdelaiDet-FCOS/resolve/main/FCOS_R_50_1x.pth",
        "/ZjuCv/AdelaiDet/resolve/main/FCOS_R_50_1x.pth", "/cdn/ZjuCv/AdelaiDet/resolve/main/FCOS_R_50_1x.pth"]
    assert str(err.value).count("the zoo expects 129471951") == 2
    assert files(cache) == []
