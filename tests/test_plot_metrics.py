"""tools/plot_metrics.py on the metrics.json of a real tiny training (FCOS, with validation
at TEST.EVAL_PERIOD), drawn as two runs: one PNG, the curves drawn are the logged values,
runs labelled apart, clear errors."""
import json
import os

import pytest

from conftest import CONFIGS, load_script, tiny_opts

plot_metrics = load_script("tools/plot_metrics.py")

FCOS = os.path.join(CONFIGS, "FCOS", "fcos_R18_shapes.yaml")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A real 3-iteration FCOS training in a/fcos, evaluated at iterations 1 and 3 (AP and
    validation loss), and a second run b/fcos with the same metrics.json (one training
    less to wait for; the runs are drawn and checked each on its own)."""
    import shutil

    from d2seg.engine import Trainer, setup_cfg

    root = tmp_path_factory.mktemp("runs")
    out = root / "a" / "fcos"
    cfg = setup_cfg(FCOS, tiny_opts(out, max_iter=3) + [
        "TEST.EVAL_PERIOD", "2", "MODEL.FCOS.INFERENCE_TH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "10",
        "SOLVER.CHECKPOINT_PERIOD", "1000"])
    Trainer(cfg).train()
    (root / "b" / "fcos").mkdir(parents=True)
    shutil.copy(out / "metrics.json", root / "b" / "fcos" / "metrics.json")
    return [str(out), str(root / "b" / "fcos")]


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def test_one_png_with_the_logged_curves(two_runs, tmp_path):
    from PIL import Image

    png = tmp_path / "both.png"
    assert plot_metrics.main(two_runs + ["-o", str(png)]) == str(png)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1300, 850)

    labels = plot_metrics.run_labels(two_runs)
    assert labels == ["a/fcos", "b/fcos"]  # the folder names are equal: one parent more
    fig = plot_metrics.plot_runs({label: plot_metrics.load_metrics(d) for label, d in zip(labels, two_runs)})
    ax_loss, ax_terms, ax_lr, ax_eval = fig.axes
    for label, run_dir in zip(labels, two_runs):
        recs = records(run_dir)

        def line(ax, name):
            (found,) = [ln for ln in ax.lines if ln.get_label() == f"{label}: {name}" or ln.get_label() == name]
            return list(found.get_xdata()), list(found.get_ydata())

        train = [(r["iteration"], r["total_loss"]) for r in recs if "total_loss" in r]
        assert line(ax_loss, "training") == ([i for i, _ in train], [v for _, v in train])
        val = [(r["iteration"], r["validation_loss"]) for r in recs if "validation_loss" in r]
        assert [i for i, _ in val] == [1, 3]
        assert line(ax_loss, "validation") == ([i for i, _ in val], [v for _, v in val])
        ap = [(r["iteration"], r["bbox/AP"]) for r in recs if "bbox/AP" in r]
        assert line(ax_eval, "bbox/AP") == ([i for i, _ in ap], [v for _, v in ap])
        for term in ("loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"):
            assert line(ax_terms, term)[1] == [r[term] for r in recs if term in r]
        (lr,) = [ln for ln in ax_lr.lines if ln.get_label() == label]
        assert list(lr.get_ydata()) == [r["lr"] for r in recs if "lr" in r]

    # one run: the picture goes into its folder
    assert plot_metrics.main([two_runs[0]]) == os.path.join(two_runs[0], "metrics.png")
    assert os.path.isfile(os.path.join(two_runs[0], "metrics.png"))


def test_resumed_run_keeps_the_last_value_of_an_iteration(tmp_path):
    """A resumed run appends to metrics.json from its checkpoint on: the repeated
    iterations are drawn once, with their last values."""
    lines = [{"iteration": 19, "total_loss": 3.0, "lr": 0.01}, {"iteration": 39, "total_loss": 2.5, "lr": 0.01},
             {"iteration": 39, "total_loss": 2.4, "lr": 0.01}, {"iteration": 59, "total_loss": 2.0, "lr": 0.01},
             {"iteration": 39, "bbox/AP": float("nan")}, {"iteration": 59, "bbox/AP": 12.5}]
    (tmp_path / "metrics.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    series = plot_metrics.load_metrics(str(tmp_path))
    assert series["total_loss"] == ([19, 39, 59], [3.0, 2.4, 2.0])
    fig = plot_metrics.plot_runs({"r": series})
    (ap,) = fig.axes[3].lines
    assert list(ap.get_xdata()) == [59] and list(ap.get_ydata()) == [12.5]  # NaN (no detections) left out
    assert [t.get_text() for t in fig.axes[0].texts] == []


def test_errors_name_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        plot_metrics.main([str(tmp_path / "nothing_here")])
    assert e.value.code == 2
    assert f"{tmp_path / 'nothing_here' / 'metrics.json'}: not found" in capsys.readouterr().err
    (tmp_path / "metrics.json").write_text('{"iteration": 1, "total_loss": 1.0}\nnot json\n')
    with pytest.raises(SystemExit):
        plot_metrics.main([str(tmp_path)])
    assert f"{tmp_path / 'metrics.json'}, line 2: not a metrics record" in capsys.readouterr().err
