"""tools/benchmark.py and d2seg.benchmark: statistics, config discovery, the
all-detections switch, input resizing, peak memory, the report, and one tiny end-to-end
run in a subprocess."""
import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.structures import BitMasks, Boxes, Instances

from d2seg.benchmark import discover_shapes_configs, method_name, percentile, summarize
from d2seg.benchmark.configs import YARDSTICK, all_detections_opts, score_threshold_keys
from d2seg.benchmark.measure import resize_record
from d2seg.benchmark.report import COLUMNS, add_ratios, markdown_table, order_rows
from d2seg.engine import setup_cfg

from conftest import CONFIGS, REPO, TINY_SHAPES, TOOLS

BENCHMARK = os.path.join(TOOLS, "benchmark.py")


# ---------------------------------------------------------------- statistics


def test_summarize_hand_values():
    s = summarize([7, 1, 10, 4, 2, 9, 3, 6, 8, 5])  # 1..10, shuffled
    assert s["n"] == 10
    assert s["median"] == pytest.approx(5.5)
    # linear interpolation at index q/100 * (n - 1): p10 -> 0.9 -> 1.9, p90 -> 8.1 -> 9.1
    assert s["p10"] == pytest.approx(1.9)
    assert s["p90"] == pytest.approx(9.1)
    assert s["q1"] == pytest.approx(3.25) and s["q3"] == pytest.approx(7.75)
    assert s["iqr"] == pytest.approx(4.5)
    assert s["mean"] == pytest.approx(5.5)
    assert (s["min"], s["max"]) == (1, 10)


def test_summarize_odd_count_single_value_and_errors():
    assert summarize([30.0, 10.0, 20.0])["median"] == 20.0
    assert percentile([10.0, 20.0, 30.0], 25) == pytest.approx(15.0)
    one = summarize([4.0])
    assert one["median"] == one["p10"] == one["p90"] == 4.0 and one["iqr"] == 0.0
    with pytest.raises(ValueError, match="no values"):
        summarize([])
    with pytest.raises(ValueError, match="q must be"):
        percentile([1.0], 101)


# ---------------------------------------------------------------- configs


def test_discover_puts_yardstick_first_and_skips_bases(tmp_path):
    for rel in ["quick/mask_rcnn_shapes.yaml", "B/b_shapes.yaml", "A/a_R18_shapes.yaml",
                "A/Base-A-shapes.yaml", "A/a_R_50_1x.yaml", "C/deep/c_shapes.yaml"]:
        p = tmp_path / "configs" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("")
    found = discover_shapes_configs(str(tmp_path))
    assert found == [YARDSTICK, "configs/A/a_R18_shapes.yaml", "configs/B/b_shapes.yaml",
                     "configs/C/deep/c_shapes.yaml"]


def test_discover_finds_every_shapes_config_of_the_repo():
    found = discover_shapes_configs(REPO)
    assert found[0] == YARDSTICK
    on_disk = {os.path.relpath(os.path.join(d, f), REPO) for d, _, fs in os.walk(CONFIGS) for f in fs
               if "shapes" in f and f.endswith(".yaml") and not f.startswith("Base-")}
    assert set(found) == on_disk
    assert method_name(os.path.join(REPO, YARDSTICK)) == "Mask R-CNN (yardstick)"
    assert method_name("configs/NewMethod/new_shapes.yaml") == "NewMethod"


def test_all_detections_sets_only_test_score_thresholds():
    cfg = setup_cfg(os.path.join(CONFIGS, "quick", "mask_rcnn_shapes.yaml"))
    keys = score_threshold_keys(cfg)
    for k in ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "MODEL.RETINANET.SCORE_THRESH_TEST",
              "MODEL.FCOS.INFERENCE_TH_TEST", "MODEL.SOLO.SCORE_THR", "MODEL.SOLO.UPDATE_THR",
              "MODEL.SPARSE_INST.CLS_THRESHOLD"]:
        assert k in keys
    for k in ["MODEL.FCOS.INFERENCE_TH_TRAIN", "MODEL.FCOS.NMS_TH", "MODEL.ROI_HEADS.NMS_THRESH_TEST",
              "MODEL.SPARSE_INST.MASK_THRESHOLD", "MODEL.SOLO.MASK_THR", "MODEL.RPN.NMS_THRESH"]:
        assert k not in keys
    opts = all_detections_opts(cfg)
    assert opts[0::2] == keys and set(opts[1::2]) == {"0.0"}
    cfg2 = setup_cfg(os.path.join(CONFIGS, "quick", "mask_rcnn_shapes.yaml"), opts)
    assert cfg2.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 0.0 and cfg2.MODEL.SOLO.UPDATE_THR == 0.0


# ---------------------------------------------------------------- inputs and memory


def test_resize_record_scales_image_boxes_and_masks():
    inst = Instances((10, 20))
    inst.gt_boxes = Boxes(torch.tensor([[2.0, 1.0, 6.0, 5.0]]))
    masks = torch.zeros(1, 10, 20, dtype=torch.bool)
    masks[0, 1:5, 2:6] = True
    inst.gt_masks = BitMasks(masks)
    inst.gt_classes = torch.tensor([3])
    rec = {"image": torch.randint(0, 255, (3, 10, 20), dtype=torch.uint8), "instances": inst,
           "height": 10, "width": 20}
    out = resize_record(rec, (20, 60))  # x3 in width, x2 in height
    assert out["image"].shape == (3, 20, 60) and out["image"].dtype == torch.uint8
    assert (out["height"], out["width"]) == (20, 60)
    assert out["instances"].image_size == (20, 60)
    assert torch.allclose(out["instances"].gt_boxes.tensor, torch.tensor([[6.0, 2.0, 18.0, 10.0]]))
    m = out["instances"].gt_masks.tensor
    assert m.shape == (1, 20, 60) and int(m.sum()) == 4 * 2 * 4 * 3  # nearest: area x6
    assert out["instances"].gt_classes.tolist() == [3]
    assert rec["image"].shape == (3, 10, 20)  # the input record is not modified

    empty = Instances((10, 20))
    empty.gt_boxes = Boxes(torch.zeros(0, 4))
    empty.gt_masks = BitMasks(torch.zeros(0, 10, 20, dtype=torch.bool))
    out = resize_record({"image": rec["image"], "instances": empty}, (20, 60))
    assert len(out["instances"]) == 0 and out["instances"].gt_masks.tensor.shape == (0, 20, 60)


def test_peak_memory_sees_a_large_allocation():
    # In a fresh process, as tools/benchmark.py measures: in this one, memory that earlier
    # tests' threads and allocators give back while the phase runs would lower the RSS by as
    # much as the phase adds (seen once in a full-suite run).
    code = (
        "import torch\n"
        "from d2seg.benchmark.memory import PeakMemory\n"
        "mem = PeakMemory('cpu')\n"
        "mem.start()\n"
        "x = torch.ones(40 * 1024 * 1024 // 4)\n"  # 40 MiB, touched
        "x += 1\n"
        "del x\n"
        "print(mem.peak_mib(), mem.method)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    peak = float(out.stdout.split()[0])
    assert 35 < peak < 200, out.stdout


# ---------------------------------------------------------------- report


def _row(config, ms, output="instances", dets=100.0):
    res = {"ms": summarize([ms, ms]), "images_per_s": 1000.0 / ms, "detections": dets,
           "detections_min": dets, "detections_max": dets, "input_hw": [128, 128], "batch_size": 1,
           "peak_mib": 10.0, "threads": 1, "output": output}
    return {"config_file": config, "method": method_name(config), "infer": res, "train": dict(res)}


def test_report_orders_rows_and_computes_ratios():
    rows = [_row("configs/SOLO/solo_shapes.yaml", 50.0),
            _row("configs/quick/semantic_fpn_shapes.yaml", 10.0, output="sem_seg", dets=None),
            _row("configs/PointRend/pointrend_semantic_R18_shapes.yaml", 30.0, output="sem_seg", dets=None),
            _row(YARDSTICK, 200.0),
            {"config_file": "configs/X/x_shapes.yaml", "method": "X", "infer": {"error": "KeyError: boom"},
             "train": None}]
    rows = add_ratios(order_rows(rows))
    assert [r["config_file"] for r in rows] == [
        YARDSTICK, "configs/SOLO/solo_shapes.yaml", "configs/X/x_shapes.yaml",
        "configs/quick/semantic_fpn_shapes.yaml", "configs/PointRend/pointrend_semantic_R18_shapes.yaml"]
    assert rows[0]["ratio_infer"] == pytest.approx(1.0)
    assert rows[1]["ratio_infer"] == pytest.approx(0.25)  # SOLO vs Mask R-CNN
    assert rows[2]["ratio_infer"] is None
    assert rows[4]["ratio_train"] == pytest.approx(3.0)  # semantic vs Semantic FPN
    table = markdown_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |"
    assert all(line.count("|") == len(COLUMNS) + 1 for line in lines)
    assert "failed: KeyError: boom" in table and "not measured" in table
    assert "0.25×" in table and "– (semantic)" in table


def test_a_long_failure_keeps_its_start_and_end_in_the_table():
    """A config file deep in a temporary folder makes the message long: the cell keeps the
    exception's name and the unknown key, and the path in between gives way."""
    error = ("KeyError: ../../" + "very/deep/temporary/folder/" * 8 + "bad.yaml: unknown config key "
             "('Non-existent config key: MODEL.NOT_A_KEY') (see out/logs/bad.infer.log)")
    row = {"config_file": "bad.yaml", "method": "bad", "infer": {"error": error}, "train": {"error": "x|y"}}
    table = markdown_table(add_ratios([row]))
    cell = table.splitlines()[-1].split(" | ")[7]
    assert cell.startswith("failed: KeyError: ../../very") and " … " in cell
    assert cell.endswith("MODEL.NOT_A_KEY') (see out/logs/bad.infer.log)")
    assert len(cell) == 160 + len(" (see out/logs/bad.infer.log)")
    assert "failed: x/y" in table and table.splitlines()[-1].count("|") == len(COLUMNS) + 1


# ---------------------------------------------------------------- the tool


def test_tool_end_to_end_on_one_tiny_config_and_a_failing_one(tmp_path, python):
    bad = tmp_path / "bad_shapes.yaml"
    bad.write_text("MODEL:\n  NOT_A_KEY: 1\n")
    out = tmp_path / "bench"
    cmd = [python, BENCHMARK, "--config-file", os.path.join(CONFIGS, "quick", "mask_rcnn_shapes.yaml"),
           "--config-file", str(bad),
           "--warmup", "1", "--repeats", "2", "--train-warmup", "1", "--train-iters", "1",
           "--all-detections", "--input-size", "96", "80", "--output", str(out)]
    cmd += TINY_SHAPES + ["MODEL.RPN.POST_NMS_TOPK_TEST", "50"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    # exit status 1: the bad config failed, but the table was still written
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED" in proc.stderr and "bad_shapes.yaml" in proc.stderr
    md = (out / "benchmark.md").read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in md
    row = [line for line in md.splitlines() if line.startswith("| Mask R-CNN (yardstick)")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[3] == "1×96×80" and cells[10] == "2×96×80"  # inference batch 1, train batch 2
    assert cells[5] == "random init"
    assert cells[-2:] == ["1.00×", "1.00×"]
    bad_row = [line for line in md.splitlines() if line.startswith("| bad_shapes")]
    assert len(bad_row) == 1 and "failed: KeyError" in bad_row[0] and "NOT_A_KEY" in bad_row[0]
    assert "MODEL.ROI_HEADS.SCORE_THRESH_TEST" in md  # the switch names the keys it set
    assert (out / "benchmark.png").stat().st_size > 1000
    data = json.loads((out / "benchmark.json").read_text())
    infer, train = data["rows"][0]["infer"], data["rows"][0]["train"]
    assert infer["ms"]["n"] == 2 and infer["ms"]["median"] > 0 and infer["peak_mib"] > 0
    assert infer["input_hw"] == [96, 80] and infer["threads"] == 1
    # threshold 0: the detections are limited only by the 50 proposals x 5 classes and NMS
    assert 0 < infer["detections"] <= 100
    assert train["ms"]["n"] == 1 and train["peak_mib"] > 0 and train["loss_first"] > 0


def test_tool_rejects_a_missing_config(tmp_path, python):
    proc = subprocess.run([python, BENCHMARK, "--config-file", "configs/nope/missing_shapes.yaml",
                           "--output", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config file not found: configs/nope/missing_shapes.yaml" in proc.stderr
