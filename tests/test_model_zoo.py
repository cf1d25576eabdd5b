"""d2seg.model_zoo: config lookup, the checkpoint table, checked downloads from a real
HTTP server on 127.0.0.1 (truncated body, checksum mismatch, offline with and without a
cached file), safe loading, and the checkpointer's automatic conversion."""
import hashlib
import io
import logging
import os
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import d2seg  # noqa: F401
from d2seg import model_zoo
from d2seg.engine.checkpoint import AtomicCheckpointer
from d2seg.model_zoo import (
    CheckpointEntry, ChecksumMismatchError, DownloadError, UnsafeCheckpointError, UnverifiedDownloadError,
    fetch, get_config, get_config_file, list_configs, register_checkpoint, unregister_checkpoint,
)
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- configs
def test_every_config_is_found_and_loads():
    on_disk = sorted(
        os.path.relpath(os.path.join(d, f), os.path.join(REPO, "configs")).replace(os.sep, "/")
        for d, _, fs in os.walk(os.path.join(REPO, "configs")) for f in fs if f.endswith(".yaml")
    )
    assert list_configs() == on_disk and len(on_disk) > 50
    for rel in on_disk:
        assert os.path.samefile(get_config_file(rel), os.path.join(REPO, "configs", rel))
        cfg = get_config(rel)
        assert cfg.MODEL.META_ARCHITECTURE, rel
    assert get_config("SparseInst/sparse_inst_r50_giam.yaml").MODEL.SPARSE_INST.DECODER.GROUPS == 4


def test_unknown_config_is_a_clear_error():
    with pytest.raises(RuntimeError, match="SparseInst/sparse_inst_r50_giam.yaml"):
        get_config_file("SparseInst/sparse_inst_r50_gaim.yaml")
    with pytest.raises(RuntimeError, match="not a d2seg config"):
        get_config_file("../setup.py")


def test_trained_config_points_at_the_zoo():
    cfg = get_config("BlendMask/R_50_1x.yaml", trained=True)
    assert cfg.MODEL.WEIGHTS == "d2seg://adelaidet/BlendMask_R_50_1x"
    assert cfg.MODEL.BLENDMASK.ATTN_SIZE == 14  # the config holds the checkpoint's attention size
    with pytest.raises(RuntimeError, match="no trained checkpoint"):
        get_config("configs/Base-Shapes.yaml", trained=True)


# ----------------------------------------------------------------------------- the table
def test_registry_entries_are_consistent():
    configs = set(list_configs())
    names = {c.name for c in model_zoo.list_converters()}
    assert len(model_zoo.CHECKPOINTS) >= 15
    for e in model_zoo.CHECKPOINTS.values():
        assert e.config in configs, e.name
        assert e.converter in names, e.name
        assert e.sha256 is None or len(e.sha256) == 64
        assert e.url.startswith("https://")
        assert set(e.opts[::2]) <= {"MODEL.BLENDMASK.ATTN_SIZE"}
    with pytest.raises(ValueError, match="64 lowercase hex"):
        register_checkpoint(CheckpointEntry("x", "https://x/y.pth", "abc", None, "FCOS/R_50_1x.yaml", "y.pth"))
    with pytest.raises(KeyError, match="no checkpoint named"):
        model_zoo.get_checkpoint("adelaidet/nope")


def test_entry_without_checksum_needs_an_opt_in(tmp_path, monkeypatch):
    monkeypatch.setenv("D2SEG_CACHE", str(tmp_path))
    monkeypatch.delenv("D2SEG_ALLOW_UNVERIFIED", raising=False)
    with pytest.raises(UnverifiedDownloadError, match="D2SEG_ALLOW_UNVERIFIED=1"):
        model_zoo.resolve_weights("d2seg://adelaidet/CondInst_MS_R_50_1x")
    # a web-page entry (Google Drive): a clear pointer to where to put the file by hand ...
    entry = model_zoo.get_checkpoint("hustvl/SparseInst/sparse_inst_r50_giam")
    with pytest.raises(DownloadError, match="save it as " + str(tmp_path)):
        entry.fetch(allow_unverified=True)
    # ... which is then used offline
    os.makedirs(os.path.dirname(entry.cache_path()))
    torch.save({"model": {}}, entry.cache_path())
    assert entry.fetch(allow_unverified=True) == entry.cache_path()


# ----------------------------------------------------------------------------- HTTP server
class _Handler(BaseHTTPRequestHandler):
    routes = {}  # path -> (body, claimed length or None)
    hits = []

    def do_GET(self):
        self.hits.append(self.path)
        if self.path not in self.routes:
            self.send_error(404)
            return
        body, claimed = self.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(claimed if claimed is not None else len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    _Handler.routes, _Handler.hits = {}, []
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _ckpt_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _sha(b):
    return hashlib.sha256(b).hexdigest()


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("D2SEG_CACHE", str(root))
    monkeypatch.delenv("D2SEG_ALLOW_UNVERIFIED", raising=False)
    monkeypatch.delenv("D2SEG_ALLOW_PICKLE", raising=False)
    return root


@pytest.fixture
def entry():
    created = []

    def make(name, url, sha256, **kw):
        kw.setdefault("converter", None)
        kw.setdefault("config", "CondInst/condinst_R18_shapes.yaml")
        kw.setdefault("filename", url.split("/")[-1])
        e = register_checkpoint(CheckpointEntry(name, url, sha256, **kw), overwrite=True)
        created.append(name)
        return e

    yield make
    for n in created:
        unregister_checkpoint(n)


def test_download_verify_cache_and_offline(server, cache, entry):
    srv, base = server
    body = _ckpt_bytes({"model": {"w": torch.arange(5.0)}})
    _Handler.routes["/zoo/download"] = (body, None)
    e = entry("test/good", base + "/zoo/download", _sha(body), filename="good.pth")
    path, verified = model_zoo.resolve_weights("d2seg://test/good")
    assert verified and path == e.cache_path() and path.startswith(str(cache))
    with open(path, "rb") as f:
        assert f.read() == body
    assert _files(cache) == [os.path.join("zoo", "test", "good", "good.pth")]  # no temporary left
    # Detectron2's PathManager resolves the scheme too
    assert PathManager.get_local_path("d2seg://test/good") == path
    # offline: the server is gone, the cached file is used (and re-verified)
    srv.shutdown()
    srv.server_close()
    assert model_zoo.resolve_weights("d2seg://test/good") == (path, True)
    assert _Handler.hits == ["/zoo/download"]


def test_checksum_mismatch_leaves_nothing(server, cache, entry):
    _, base = server
    body = _ckpt_bytes({"model": {"w": torch.ones(3)}})
    _Handler.routes["/bad.pth"] = (body, None)
    entry("test/bad", base + "/bad.pth", "0" * 64)
    with pytest.raises(ChecksumMismatchError, match=f"expected {'0' * 64}, got {_sha(body)}"):
        model_zoo.resolve_weights("d2seg://test/bad")
    assert _files(cache) == []
    # the same through a plain URL with a #sha256= fragment
    with pytest.raises(ChecksumMismatchError):
        fetch(base + "/bad.pth#sha256=" + "1" * 64)
    assert _files(cache) == []
    assert fetch(base + "/bad.pth#sha256=" + _sha(body)).endswith("bad.pth")


def test_truncated_download_leaves_nothing(server, cache, entry):
    _, base = server
    body = _ckpt_bytes({"model": {"w": torch.ones(1000)}})
    _Handler.routes["/trunc.pth"] = (body[: len(body) // 2], len(body))  # promises more than it sends
    entry("test/trunc", base + "/trunc.pth", _sha(body))
    with pytest.raises(DownloadError) as err:
        model_zoo.resolve_weights("d2seg://test/trunc")
    assert base + "/trunc.pth" in str(err.value)
    assert not isinstance(err.value, ChecksumMismatchError)  # caught as incomplete, before hashing
    assert _files(cache) == []


def test_offline_without_cache_names_url_and_cache_path(cache, entry):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more
    url = f"http://127.0.0.1:{port}/weights/model.pth"
    e = entry("test/offline", url, "a" * 64)
    with pytest.raises(DownloadError) as err:
        model_zoo.resolve_weights("d2seg://test/offline")
    msg = str(err.value)
    assert url in msg and e.cache_path() in msg
    assert _files(cache) == []


def test_plain_url_without_checksum_needs_opt_in(server, cache, monkeypatch):
    _, base = server
    body = _ckpt_bytes({"model": {"w": torch.ones(2)}})
    _Handler.routes["/free.pth"] = (body, None)
    with pytest.raises(UnverifiedDownloadError, match="sha256 is unknown"):
        model_zoo.resolve_weights(base + "/free.pth")
    assert _Handler.hits == []  # refused before any request
    monkeypatch.setenv("D2SEG_ALLOW_UNVERIFIED", "1")
    path, verified = model_zoo.resolve_weights(base + "/free.pth")
    assert not verified and open(path, "rb").read() == body


def test_corrupted_cache_is_downloaded_again(server, cache, entry):
    _, base = server
    body = _ckpt_bytes({"model": {"w": torch.ones(2)}})
    _Handler.routes["/c.pth"] = (body, None)
    e = entry("test/c", base + "/c.pth", _sha(body))
    path = e.fetch()
    with open(path, "ab") as f:
        f.write(b"garbage")
    assert e.fetch() == path and open(path, "rb").read() == body
    assert _Handler.hits == ["/c.pth", "/c.pth"]


# ----------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def condinst():
    from d2seg.model_zoo import get_config

    cfg = get_config("CondInst/condinst_R18_shapes.yaml")
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _adelaidet_layout(sd):
    out = {}
    for k, v in sd.items():
        k = k.replace("mask_head.controller.", "controller.").replace("mask_head.mask_branch.", "mask_branch.")
        out[k] = torch.randn_like(v) if v.is_floating_point() else v
    out["mask_head._iter"] = torch.zeros(1)
    return out


def test_checkpointer_downloads_and_converts(server, cache, entry, condinst, caplog):
    _, base = server
    model = build_model(condinst)
    src = _adelaidet_layout(model.state_dict())
    body = _ckpt_bytes({"model": src, "iteration": 90000})
    _Handler.routes["/CondInst_MS_R_18.pth"] = (body, None)
    entry("test/condinst", base + "/CondInst_MS_R_18.pth", _sha(body), converter="adelaidet-condinst")
    with caplog.at_level(logging.INFO):
        AtomicCheckpointer(model).load("d2seg://test/condinst")
    assert "Recognised the checkpoint layout of AdelaiDet CondInst" in caplog.text and "sha256 verified" in caplog.text
    assert torch.equal(model.mask_head.controller.weight, src["controller.weight"])
    assert torch.equal(model.backbone.bottom_up.stem.conv1.weight, src["backbone.bottom_up.stem.conv1.weight"])
    # the same file by its URL (found in the table, so checked) loads as well
    model2 = build_model(condinst)
    AtomicCheckpointer(model2).load(base + "/CondInst_MS_R_18.pth")
    assert torch.equal(model2.mask_head.controller.weight, src["controller.weight"])


def test_checkpoint_of_another_model_is_refused(tmp_path, condinst):
    model = build_model(condinst)
    path = tmp_path / "other.pth"
    torch.save({"model": {"decoder.inst_branch.cls_score.weight": torch.ones(2, 2)}}, path)
    with pytest.raises(RuntimeError) as err:
        AtomicCheckpointer(model).load(str(path))
    msg = str(err.value)
    assert "shares no key" in msg and "decoder.inst_branch.cls_score.weight" in msg
    assert "mask_head.controller.* (2)" in msg


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_safety(tmp_path, cache, server, entry, condinst, monkeypatch):
    model = build_model(condinst)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    pkl = tmp_path / "model_final.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": sd, "__author__": "Detectron2 Model Zoo"}, f)
    with pytest.raises(UnsafeCheckpointError, match="D2SEG_ALLOW_PICKLE=1"):
        AtomicCheckpointer(model).load(str(pkl))
    AtomicCheckpointer(model, allow_pickle=True).load(str(pkl))

    # a .pkl from the zoo's checksummed table needs no opt-in
    _, base = server
    body = pkl.read_bytes()
    _Handler.routes["/model_final.pkl"] = (body, None)
    entry("test/pkl", base + "/model_final.pkl", _sha(body))
    AtomicCheckpointer(model).load("d2seg://test/pkl")

    # a .pth that needs more than tensors is refused (weights_only=True)
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _Evil()}, evil)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        AtomicCheckpointer(model).load(str(evil))
    with pytest.raises(UnsafeCheckpointError):
        model_zoo.load_checkpoint_file(str(evil))
    # the CLI refuses it as well
    import sys

    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import convert_checkpoint
    finally:
        sys.path.pop(0)
    assert convert_checkpoint.main(["--config-file", "CondInst/condinst_R18_shapes.yaml", str(pkl),
                                    str(tmp_path / "o.pth")]) == 1
    assert not (tmp_path / "o.pth").exists()


def test_own_checkpoints_still_resume(tmp_path, condinst):
    """Our own saves (model + optimizer-like state + iteration) load back with weights_only."""
    model = build_model(condinst)
    ck = AtomicCheckpointer(model, save_dir=str(tmp_path), extra=torch.optim.SGD(model.parameters(), lr=0.1))
    ck.save("model_0000009", iteration=9)
    model2 = build_model(condinst)
    ck2 = AtomicCheckpointer(model2, save_dir=str(tmp_path), extra=torch.optim.SGD(model2.parameters(), lr=0.1))
    assert ck2.has_checkpoint()
    out = ck2.resume_or_load("", resume=True)
    assert out["iteration"] == 9
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_get_trained_model_from_the_zoo(server, cache, entry, condinst):
    """model_zoo.get(config, trained=True): the table entry for that config is downloaded,
    checked, converted from AdelaiDet's layout and loaded; the model is in eval mode."""
    _, base = server
    src = _adelaidet_layout(build_model(condinst).state_dict())
    body = _ckpt_bytes({"model": src})
    _Handler.routes["/zoo/condinst_r18.pth"] = (body, None)
    entry("test/condinst_r18", base + "/zoo/condinst_r18.pth", _sha(body), converter="adelaidet-condinst",
          config="CondInst/condinst_R18_shapes.yaml")
    model = model_zoo.get("CondInst/condinst_R18_shapes.yaml", trained=True, device="cpu")
    assert not model.training
    assert torch.equal(model.mask_head.controller.bias, src["controller.bias"])
