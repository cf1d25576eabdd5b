"""d2seg.model_zoo: config lookup, the checkpoint table (every entry pinned or explicitly
unpinned, live hosts), the ``list`` command, the ``d2seg://`` scheme (also ``shapes/``), checked
downloads from a real HTTP server on 127.0.0.1 (cache, offline with and without a cached file,
opt-ins), safe loading, and the checkpointer's automatic conversion. The download machinery
itself (redirects, resume, mirrors, Google Drive, progress) is tested in
tests/test_model_zoo_download.py, whose server and fixtures are used here; the .pkl
unpickler in tests/test_model_zoo_pickle.py."""
import io
import logging
import os
import re

import pytest
import torch

import d2seg  # noqa: F401
from d2seg import model_zoo
from d2seg.engine.checkpoint import AtomicCheckpointer
from d2seg.model_zoo import (
    CheckpointEntry, DownloadError, UnsafeCheckpointError, UnverifiedDownloadError, get_config, get_config_file,
    list_configs, register_checkpoint,
)
from d2seg.model_zoo.cli import main as zoo_main
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager
from test_model_zoo_download import Route, _Handler, cache, entry, server  # noqa: F401  (fixtures)
from test_model_zoo_download import files as _files
from test_model_zoo_download import sha as _sha

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ckpt_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


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
def test_registry_entries_are_live_pinned_or_explicitly_unpinned():
    configs = set(list_configs())
    converters = {c.name for c in model_zoo.list_converters()}
    assert len(model_zoo.CHECKPOINTS) >= 25
    hashes = []
    for e in model_zoo.CHECKPOINTS.values():
        assert e.config in configs and e.converter in converters, e.name
        assert e.method and e.metric, e.name
        assert set(e.opts[::2]) <= {"MODEL.BLENDMASK.ATTN_SIZE"}
        if e.sha256 is None:
            assert len(e.unpinned) > 20, e.name  # says why
        else:
            assert re.fullmatch(r"[0-9a-f]{64}", e.sha256), e.name
            hashes.append(e.sha256)
        assert e.size is None or e.size > 10_000_000, e.name
        for url in e.urls + e.pages:
            assert url.startswith("https://"), (e.name, url)
            assert "cloudstor" not in url, (e.name, url)  # decommissioned in December 2023
            if url in e.urls and "huggingface.co" in url:
                assert "/resolve/main/" in url and "/blob/" not in url, url  # blob/ is an HTML page
    assert len(set(hashes)) == len(hashes)  # two entries never claim the same file
    for name in model_zoo.CHECKPOINTS:
        if name.startswith("adelaidet/"):
            assert model_zoo.CHECKPOINTS[name].sha256, name  # every AdelaiDet entry is pinned
    fcos = model_zoo.get_checkpoint("d2seg://adelaidet/FCOS_R_50_1x")
    assert fcos.sha256 == "2b63bea109ab38e7528828f4f4cc23cff2720720a9e809bfc9a494fc0d800f36"
    assert fcos.urls == ("https://huggingface.co/tianzhi/AdelaiDet-FCOS/resolve/main/FCOS_R_50_1x.pth",
                         "https://huggingface.co/ZjuCv/AdelaiDet/resolve/main/FCOS_R_50_1x.pth")
    with pytest.raises(ValueError, match="64 lowercase hex"):
        register_checkpoint(CheckpointEntry("x", ("https://x/y.pth",), "abc", None, "FCOS/R_50_1x.yaml", "y.pth"))
    with pytest.raises(ValueError, match="say why in `unpinned`"):
        register_checkpoint(CheckpointEntry("x", ("https://x/y.pth",), None, None, "FCOS/R_50_1x.yaml", "y.pth"))
    with pytest.raises(KeyError, match="no checkpoint named"):
        model_zoo.get_checkpoint("adelaidet/nope")


def test_model_zoo_modules_import_each_other_without_a_cycle():
    """download <- registry <- weights, and so on: the graph of imports between the
    modules of d2seg/model_zoo/ (also those inside functions) has no cycle."""
    import ast
    import graphlib

    folder = os.path.join(REPO, "projects", "model_zoo")
    mods = {f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py"}
    graph = {}
    for m in mods:
        tree = ast.parse(open(os.path.join(folder, m + ".py")).read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                name = node.module or ""
                if node.level == 1 or name.startswith("d2seg.model_zoo"):
                    name = name.rsplit(".", 1)[-1] if name else ""
                    deps |= {name} if name in mods else {a.name for a in node.names if a.name in mods}
        graph[m] = deps - {m}
    assert "registry" in graph["weights"] and "download" in graph["registry"]
    assert not graph["download"] & {"registry", "weights"}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError on a cycle


def test_list_command_prints_every_entry(capsys):
    assert zoo_main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in out[2:]}
    assert set(rows) == set(model_zoo.CHECKPOINTS) | set(model_zoo.LOCAL_CHECKPOINTS)
    fcos = rows["adelaidet/FCOS_R_50_1x"].split()
    assert fcos[1:] == ["FCOS", "FCOS/R_50_1x.yaml", "129", "MB", "box", "AP", "38.7", "pinned"]
    assert rows["detectron2/PointRend/pointrend_rcnn_R_50_FPN_3x_coco"].endswith("unpinned")
    assert rows["shapes/R18-GN-pretrained"].split()[1] == "backbone"
    assert rows["shapes/R18-GN-pretrained"].endswith("made on first use")


def test_unpinned_entry_needs_a_pin_or_an_opt_in(cache):
    with pytest.raises(UnverifiedDownloadError) as err:
        model_zoo.resolve_weights("d2seg://detectron2/PointRend/pointrend_rcnn_R_50_FPN_3x_coco")
    msg = str(err.value)
    assert "publishes no checksum" in msg and "D2SEG_ALLOW_UNVERIFIED=1" in msg
    assert "python -m d2seg.model_zoo download detectron2/PointRend/pointrend_rcnn_R_50_FPN_3x_coco --pin" in msg
    # a file put into the cache by hand is used offline with the opt-in ...
    entry = model_zoo.get_checkpoint("hustvl/SparseInst/sparse_inst_r50_giam")
    os.makedirs(os.path.dirname(entry.cache_path()))
    torch.save({"model": {}}, entry.cache_path())
    assert entry.fetch(allow_unverified=True) == entry.cache_path()
    # ... or pinned (no request: the file is there) and then verified without it
    assert zoo_main(["download", "hustvl/SparseInst/sparse_inst_r50_giam", "--pin"]) == 0
    assert model_zoo.resolve_weights("d2seg://hustvl/SparseInst/sparse_inst_r50_giam") == (entry.cache_path(), True)


def test_shapes_names_are_made_locally(monkeypatch, tmp_path):
    """``d2seg://shapes/<name>`` goes to d2seg.data.pretrained, not to the registry; an
    unknown shapes name is that module's error (nothing is downloaded)."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(KeyError, match="unknown pretrained backbone"):
        model_zoo.resolve_weights("d2seg://shapes/R99-nothing")
    assert PathManager.exists("d2seg://shapes/R18-GN-pretrained")
    assert not PathManager.exists("d2seg://shapes/R99-nothing")


# ----------------------------------------------------------------------------- downloads
def test_download_verify_cache_and_offline(server, cache, entry):
    srv, base = server
    body = _ckpt_bytes({"model": {"w": torch.arange(5.0)}})
    _Handler.routes["/zoo/download"] = Route(body)
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
    assert [h[0] for h in _Handler.hits] == ["/zoo/download"]


def test_offline_without_cache_names_url_and_cache_path(cache, entry):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more
    url = f"http://127.0.0.1:{port}/weights/model.pth"
    e = entry("test/offline", url, "a" * 64)
    with pytest.raises(DownloadError) as err:
        e.fetch(retries=1, backoff=0.0)
    msg = str(err.value)
    assert url in msg and e.cache_path() in msg and "gave up after 2 attempts" in msg
    assert _files(cache) == []


def test_plain_url_without_checksum_needs_opt_in(server, cache, monkeypatch):
    _, base = server
    body = _ckpt_bytes({"model": {"w": torch.ones(2)}})
    _Handler.routes["/free.pth"] = Route(body)
    with pytest.raises(UnverifiedDownloadError, match="sha256 is unknown"):
        model_zoo.resolve_weights(base + "/free.pth")
    assert _Handler.hits == []  # refused before any request
    monkeypatch.setenv("D2SEG_ALLOW_UNVERIFIED", "1")
    path, verified = model_zoo.resolve_weights(base + "/free.pth")
    assert not verified and open(path, "rb").read() == body


def test_corrupted_cache_is_downloaded_again(server, cache, entry):
    _, base = server
    body = _ckpt_bytes({"model": {"w": torch.ones(2)}})
    _Handler.routes["/c.pth"] = Route(body)
    e = entry("test/c", base + "/c.pth", _sha(body))
    path = e.fetch()
    with open(path, "ab") as f:
        f.write(b"garbage")
    assert e.fetch() == path and open(path, "rb").read() == body
    assert [h[0] for h in _Handler.hits] == ["/c.pth", "/c.pth"]


# ----------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def condinst():
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
    _Handler.routes["/CondInst_MS_R_18.pth"] = Route(body)
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


def test_pickles_load_without_opt_in_and_pth_payloads_are_refused(tmp_path, cache, server, entry, condinst):
    """A Detectron2 .pkl of numpy arrays from the zoo (a d2seg:// entry) loads with no
    environment variable (restricted unpickler; its refusals: tests/test_model_zoo_pickle.py);
    a .pth that needs more than tensors is refused (weights_only=True)."""
    import pickle

    model = build_model(condinst)
    sd = {k: v.numpy() + 1 if v.is_floating_point() else v.numpy() for k, v in model.state_dict().items()}
    body = pickle.dumps({"model": sd, "__author__": "Detectron2 Model Zoo"}, protocol=2)
    _, base = server
    _Handler.routes["/model_final.pkl"] = Route(body)
    entry("test/pkl", base + "/model_final.pkl", _sha(body))
    AtomicCheckpointer(model).load("d2seg://test/pkl")
    assert torch.equal(model.mask_head.controller.weight, torch.from_numpy(sd["mask_head.controller.weight"]))

    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _Evil()}, evil)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        AtomicCheckpointer(model).load(str(evil))
    with pytest.raises(UnsafeCheckpointError):
        model_zoo.load_checkpoint_file(str(evil))


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
    _Handler.routes["/zoo/condinst_r18.pth"] = Route(body)
    entry("test/condinst_r18", base + "/zoo/condinst_r18.pth", _sha(body), converter="adelaidet-condinst",
          config="CondInst/condinst_R18_shapes.yaml")
    model = model_zoo.get("CondInst/condinst_R18_shapes.yaml", trained=True, device="cpu")
    assert not model.training
    assert torch.equal(model.mask_head.controller.bias, src["controller.bias"])
