"""dev/reference/reference_speed.py's d2seg backends (ONNX Runtime, TEST.PRECISION bfloat16)
on a tiny FCOS (R-18, shapes config, 64x96 image): the real worker builds the model, exports it and times every backend
through :func:`measure`, which reports ONNX Runtime's detections equal to float32's.

No reference checkout is needed: the "reference" side is a second d2seg worker holding the
same weights (the script's worker and parity check, not a copy of them). Both workers run in
threads of this process over a real pipe; one computes at a time, as in the script."""
import os
import sys
import threading

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "dev", "reference"))
import reference_speed as rs  # noqa: E402

PAIR = dict(d2seg_config="configs/FCOS/fcos_R18_shapes.yaml", reference=None, source=None,
            thresholds=(["MODEL.FCOS.INFERENCE_TH_TEST"], ["MODEL.FCOS.INFERENCE_TH_TEST"]))


class ThreadSide:
    """:class:`reference_speed.Side`'s interface on :func:`reference_speed.worker` in a thread."""

    def __init__(self, args, backends):
        import multiprocessing as mp

        self.conn, child = mp.Pipe()
        self.thread = threading.Thread(target=rs.worker, args=("d2seg", "tiny", dict(args, backends=backends), child),
                                       daemon=True)
        self.thread.start()
        self.side = "d2seg"

    ask = rs.Side.ask

    def close(self):
        self.conn.send(("quit",))
        self.thread.join(timeout=30)


@pytest.fixture
def weights(tmp_path):
    """A random tiny FCOS's state dict in ``weights.pt`` (the "all" setting's score threshold 0
    makes it return detections)."""
    from d2seg.config import get_d2seg_cfg
    from detectron2.modeling import build_model

    cfg = get_d2seg_cfg()
    cfg.merge_from_file(os.path.join(ROOT, PAIR["d2seg_config"]))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    return str(tmp_path)


def test_onnx_and_bf16_backends_run_and_onnx_matches_float32(weights, monkeypatch):
    """... with ``threads`` 2 (``--threads 2``): torch's threads in both workers and ONNX
    Runtime's intra-op threads."""
    import d2seg.deploy

    monkeypatch.setenv("D2SEG_CPU_BF16", "1")  # bfloat16 also on a CPU without it (emulated; tiny model)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the workers set them (threads here: restore)
        monkeypatch.setenv(var, "1")
    threads = torch.get_num_threads()
    torch_threads, sessions = [], []
    set_num_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (torch_threads.append(n), set_num_threads(n))[1])

    class RecordedONNXModel(d2seg.deploy.ONNXModel):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            sessions.append(self.session)

    monkeypatch.setattr(d2seg.deploy, "ONNXModel", RecordedONNXModel)
    args = {"sizes": [(64, 96)], "seed": 0, "checkout": None, "workdir": weights, "pair": PAIR, "threads": 2}
    sides = {"reference": ThreadSide(args, ["d2seg"]), "d2seg": ThreadSide(args, list(rs.BACKENDS))}
    try:
        for s in sides.values():
            s.ask("build", "all")  # every score threshold 0: the maximum number of detections
        loads = []
        row = rs.measure(sides, list(rs.BACKENDS), n_img=1, reps=2, semantic=False, on_rep=lambda: loads.append(1))
    finally:
        for s in sides.values():
            s.close()
        set_num_threads(threads)
    assert [f for f in os.listdir(weights) if f.endswith(".onnx")] == ["model_64x96.onnx"]
    assert torch_threads == [2, 2]  # both workers (reference and d2seg: float32 and bfloat16)
    assert [s.get_session_options().intra_op_num_threads for s in sessions] == [2]
    assert row["parity"] and row["backend_parity"] == {"onnx": True, "bf16": row["backend_parity"]["bf16"]}
    assert len(loads) == 2
    for b in rs.BACKENDS:
        assert len(row["times_s"][b]) == 2 and all(t > 0 for t in row["times_s"][b])
        assert row["backends"][b]["ratio_min"] <= row["backends"][b]["ratio"] <= row["backends"][b]["ratio_max"]
    onnx = row["backend_checks"]["onnx"]
    assert [c["detections"] for c in onnx] == [[n, n] for n in row["detections"]["d2seg"]]
    assert all(n > 0 for n in row["detections"]["onnx"])
    assert all(c["classes_equal"] and c["max_score_diff"] <= rs.SCORE_TOL and c["max_box_diff"] <= rs.BOX_TOL
               for c in onnx)
    assert len(row["detections"]["bf16"]) == 1
    # the table row carries both new columns
    table_row = rs.format_row(dict(row, model="tiny", setting="all", sizes=[(64, 96)]))
    cells = [c.strip() for c in table_row.strip("|").split("|")]
    assert len(cells) == len(rs.HEADER_COLUMNS) + len(rs.EXTRA_COLUMNS)
    assert cells[10].startswith("same")
    assert rs.header(rs.BACKENDS).count("ONNX Runtime") == 3


def test_a_model_without_export_graph_gets_no_onnx_backend(tmp_path):
    """PointINS with DYNAMIC_KERNEL_SIZE > 1 has no graph: the comparison goes on without ONNX
    Runtime and says why; asked alone, it raises."""
    from d2seg.config import get_d2seg_cfg
    from detectron2.modeling import build_model

    cfg = get_d2seg_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs/PointINS/pointins_fcos_R18_shapes.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.POINTINS.DYNAMIC_KERNEL_SIZE = 3
    model = build_model(cfg).eval()
    images = rs.make_images(0, [(64, 96)], False)
    unavailable = {}
    runners = rs.d2seg_backends(model, cfg, images, ["d2seg", "onnx"], str(tmp_path), unavailable)
    assert list(runners) == ["d2seg"] and "DYNAMIC_KERNEL_SIZE" in unavailable["onnx"]
    with pytest.raises(ValueError, match="DYNAMIC_KERNEL_SIZE"):
        rs.d2seg_backends(model, cfg, images, ["onnx"], str(tmp_path))
    with pytest.raises(ValueError, match="unknown backend"):
        rs.d2seg_backends(model, cfg, images, ["int8"], str(tmp_path))


def test_threads_are_recorded_in_the_report(tmp_path):
    import argparse
    import json

    args = argparse.Namespace(threads=2, reps=3, backends=["d2seg", "onnx"], seed=0, size=None)
    rs.write_report([], args, 0.0, str(tmp_path), quiet=True)
    assert json.loads((tmp_path / "reference_speed.json").read_text())["meta"]["threads"] == 2
    md = (tmp_path / "reference_speed.md").read_text()
    assert "2 threads per side" in md and "2 intra-op thread(s)" in md
    with pytest.raises(SystemExit):
        rs.main(["--threads", "0", "--models", "fcos", "--adelaidet", str(tmp_path)])
