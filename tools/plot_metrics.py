#!/usr/bin/env python
"""Training curves of one or several runs as one PNG, from their metrics.json.

    python tools/plot_metrics.py output/condinst                       # -> output/condinst/metrics.png
    python tools/plot_metrics.py output/seed42 output/seed43 -o seeds.png   # runs overlaid

Four panels: the training loss (``total_loss``) with the validation loss
(``validation_loss``, dashed, at TEST.EVAL_PERIOD); each training loss term (``loss_*``);
the learning rate; and the evaluation (``bbox/AP``, ``segm/AP``, ``sem_seg/mIoU``, or the
keys given with ``--metrics``). One colour per run, labelled by its folder's name (with as
much of the path as tells the runs apart). Detectron2's metrics.json has one JSON object
per line and per iteration; a resumed run appends to it, and the last value logged for an
iteration is the one drawn. Drawn with matplotlib's Agg canvas: no display needed, and no
global matplotlib state changed.
"""
import argparse
import json
import math
import os
import re
import sys

__all__ = ["load_metrics", "plot_runs", "run_labels"]

# evaluation keys drawn by default: AP / mIoU of each task, with an optional data-set prefix
DEFAULT_METRICS = re.compile(r"(^|/)(bbox|segm|sem_seg)/(AP|mIoU)$")


def load_metrics(path):
    """{key: ([iteration, ...], [value, ...])} from a metrics.json (or the folder holding
    one), sorted by iteration; for an iteration logged twice (a resumed run) the last value."""
    file = path if path.endswith(".json") else os.path.join(path, "metrics.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: not found (is {path} the OUTPUT_DIR of a training?)")
    series = {}
    with open(file) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                iteration = int(record["iteration"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{file}, line {n}: not a metrics record ({e})") from e
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    series.setdefault(key, {})[iteration] = float(value)
    return {k: (sorted(v), [v[i] for i in sorted(v)]) for k, v in series.items()}


def run_labels(paths):
    """Short labels telling the runs apart: each folder's name, with as many parent
    folders as needed when two runs share a name."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    parts = [p[:-1] if p[-1] == "metrics.json" else p for p in parts]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label} ({i})" for i, label in enumerate(labels)]


def _finite(xs, ys):
    pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_runs(runs, metrics=None):
    """A matplotlib Figure of ``runs`` ({label: load_metrics(...)}); ``metrics`` are the
    evaluation keys to draw (default: every AP / mIoU key found)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 8.5), layout="constrained")
    ax_loss, ax_terms, ax_lr, ax_eval = fig.subplots(2, 2).ravel()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    styles = ["-", "--", ":", "-."]
    for (label, series), colour in zip(runs.items(), colours):
        if "total_loss" in series:
            ax_loss.plot(*series["total_loss"], color=colour, label=f"{label}: training")
        if "validation_loss" in series:
            ax_loss.plot(*_finite(*series["validation_loss"]), "o--", color=colour, label=f"{label}: validation")
        terms = sorted(k for k in series if k.startswith("loss_"))
        for i, key in enumerate(terms):
            if len(runs) == 1:  # one colour per term
                ax_terms.plot(*series[key], color=f"C{i % 10}", label=f"{label}: {key}")
            else:  # one colour per run, one line style per term
                ax_terms.plot(*series[key], styles[i % len(styles)], color=colour, alpha=0.85,
                              marker=None if i < len(styles) else ".", markevery=0.1, label=f"{label}: {key}")
        if "lr" in series:
            ax_lr.plot(*series["lr"], color=colour, label=label)
        keys = metrics if metrics is not None else sorted(k for k in series if DEFAULT_METRICS.search(k))
        for i, key in enumerate(k for k in keys if k in series):
            ax_eval.plot(*_finite(*series[key]), "o" + styles[i % len(styles)], color=colour,
                         label=f"{label}: {key}")
    panels = [(ax_loss, "loss (training; validation dashed)", "loss"),
              (ax_terms, "training loss terms", "loss"),
              (ax_lr, "learning rate", "lr"),
              (ax_eval, "evaluation", "AP / mIoU")]
    for ax, title, ylabel in panels:
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle(", ".join(runs))
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("runs", nargs="+", metavar="OUTPUT_DIR",
                        help="training output folders (or metrics.json files)")
    parser.add_argument("-o", "--output", help="PNG to write (default: OUTPUT_DIR/metrics.png for one run, "
                                               "metrics.png in the current folder for several)")
    parser.add_argument("--labels", nargs="+", help="one label per run instead of the folder names")
    parser.add_argument("--metrics", nargs="+", help="evaluation keys to draw (default: bbox/AP, segm/AP, "
                                                     "sem_seg/mIoU, with any data-set prefix)")
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args(argv)
    labels = args.labels or run_labels(args.runs)
    if len(labels) != len(args.runs):
        parser.error(f"--labels: {len(labels)} label(s) for {len(args.runs)} run(s)")
    try:
        runs = {label: load_metrics(path) for label, path in zip(labels, args.runs)}
    except (OSError, ValueError) as e:
        parser.exit(2, f"plot_metrics.py: error: {e}\n")
    output = args.output
    if output is None:
        single = os.path.dirname(args.runs[0]) if args.runs[0].endswith(".json") else args.runs[0]
        output = os.path.join(single, "metrics.png") if len(args.runs) == 1 else "metrics.png"
    fig = plot_runs(runs, args.metrics)
    fig.savefig(output, dpi=args.dpi)
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
