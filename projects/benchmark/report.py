"""The benchmark's outputs: a Markdown table and a PNG bar chart of the per-config results.

A row (one config) is a dict with keys: config_file, method, infer (the inference
result of d2seg.benchmark.measure.measure_inference, or {"error": ...}), train (the same
for measure_training, or None when training was not measured).
"""
import os

from .configs import SEMANTIC_YARDSTICK, YARDSTICK

__all__ = ["COLUMNS", "order_rows", "add_ratios", "markdown_table", "write_markdown", "write_chart"]

COLUMNS = [
    "method",
    "config",
    "output",
    "input (B×H×W)",
    "threads",
    "weights",
    "detections / image",
    "inference ms: median (p10–p90)",
    "images/s",
    "inference peak MiB",
    "train input (B×H×W)",
    "train ms/iter: median (p10–p90)",
    "train peak MiB",
    "inference × yardstick",
    "train × yardstick",
]


def _ok(result):
    return bool(result) and "error" not in result


def _kind(row):
    infer = row.get("infer")
    if _ok(infer):
        return "semantic" if infer.get("output") == "sem_seg" else "instance"
    return "semantic" if "semantic" in os.path.basename(row["config_file"]) else "instance"


def _same(path_a, path_b):
    return os.path.normpath(path_a) == os.path.normpath(path_b)


def order_rows(rows):
    """Instance rows first (the yardstick first), then semantic rows (the semantic
    yardstick first); otherwise in the given order."""
    def key(item):
        i, row = item
        kind = _kind(row)
        ref = YARDSTICK if kind == "instance" else SEMANTIC_YARDSTICK
        return (kind != "instance", not _same(row["config_file"], ref), i)

    return [row for _, row in sorted(enumerate(rows), key=key)]


def add_ratios(rows):
    """Set row["ratio_infer"] / row["ratio_train"]: the row's median time over its
    yardstick's median time measured in the same run (Mask R-CNN for instance rows,
    Semantic FPN for semantic rows), or None when either is missing."""
    refs = {}
    for row in rows:
        for kind, ref in (("instance", YARDSTICK), ("semantic", SEMANTIC_YARDSTICK)):
            if _same(row["config_file"], ref):
                refs[kind] = row
    for row in rows:
        ref = refs.get(_kind(row))
        for phase in ("infer", "train"):
            mine = row.get(phase)
            theirs = ref.get(phase) if ref else None
            ratio = None
            if _ok(mine) and _ok(theirs):
                ratio = mine["ms"]["median"] / theirs["ms"]["median"]
            row[f"ratio_{phase}"] = ratio
    return rows


def _fmt_ms(ms):
    med = ms["median"]
    digits = 1 if med < 100 else 0
    return f"{med:.{digits}f} ({ms['p10']:.{digits}f}–{ms['p90']:.{digits}f})"


def _fmt_input(result):
    h, w = result["input_hw"]
    return f"{result['batch_size']}×{h}×{w}"


def _fmt_det(infer):
    if infer.get("detections") is None:
        return "– (semantic)" if infer.get("output") == "sem_seg" else "–"
    lo, hi = infer["detections_min"], infer["detections_max"]
    text = f"{infer['detections']:.1f}"
    if lo != hi:
        text += f" ({lo:g}–{hi:g})"
    return text


def _failed(error, width=160):
    """A table cell for a failure: its message shortened in the middle when longer than
    ``width`` (the start names the exception, the end usually the key or the value; a long
    file path in between is what gives way), then the log it points to, whole."""
    error, log = str(error), ""
    if error.endswith(")") and " (see " in error:
        error, log = error.rsplit(" (see ", 1)
        log = " (see " + log
    text = f"failed: {error}"
    if len(text) > width:
        head = width // 3
        text = text[:head] + " … " + text[-(width - head - 3):]
    return (text + log).replace("|", "/")


def _cells(row):
    infer, train = row.get("infer"), row.get("train")
    cells = [row["method"], f"`{row['config_file']}`"]
    if _ok(infer):
        cells += [
            "semantic" if infer.get("output") == "sem_seg" else "instances",
            _fmt_input(infer),
            str(infer["threads"]),
            "trained" if infer.get("weights") else "random init",
            _fmt_det(infer),
            _fmt_ms(infer["ms"]),
            f"{infer['images_per_s']:.2f}",
            f"{infer['peak_mib']:.0f}",
        ]
    else:
        err = (infer or {}).get("error", "not run")
        cells += ["–", "–", "–", "–", "–", _failed(err), "–", "–"]
    if train is None:
        cells += ["–", "not measured", "–"]
    elif _ok(train):
        cells += [_fmt_input(train), _fmt_ms(train["ms"]), f"{train['peak_mib']:.0f}"]
    else:
        cells += ["–", _failed(train.get('error', '?')), "–"]
    for phase in ("infer", "train"):
        r = row.get(f"ratio_{phase}")
        cells.append("–" if r is None else f"{r:.2f}×")
    return cells


def markdown_table(rows):
    """The results as a GitHub Markdown table (one row per config, COLUMNS)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cells(row)) + " |")
    return "\n".join(lines)


def write_markdown(path, rows, header_lines=(), footer_lines=()):
    """Write ``header_lines``, the table and ``footer_lines`` to ``path``."""
    text = "\n".join(list(header_lines) + ["", markdown_table(rows), ""] + list(footer_lines)) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def write_chart(path, rows, title=""):
    """A PNG with two horizontal bar panels: inference and training median ms, whiskers
    from p10 to p90; the yardsticks in grey. Returns False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = []
    for row in rows:
        infer = row.get("infer")
        det = infer.get("detections") if _ok(infer) else None
        labels.append(row["method"] + (f"\n{det:.0f} detections/image" if det is not None else ""))
    is_ref = [_same(r["config_file"], YARDSTICK) or _same(r["config_file"], SEMANTIC_YARDSTICK) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.55 * len(rows) + 1.8), sharey=True)
    for ax, phase, xlabel in (
        (axes[0], "infer", "inference ms / image batch (median, p10–p90)"),
        (axes[1], "train", "training ms / iteration (median, p10–p90)"),
    ):
        med, lo, hi = [], [], []
        for row in rows:
            res = row.get(phase)
            if _ok(res):
                m = res["ms"]
                med.append(m["median"])
                lo.append(m["median"] - m["p10"])
                hi.append(m["p90"] - m["median"])
            else:
                med.append(0.0)
                lo.append(0.0)
                hi.append(0.0)
        ys = list(range(len(rows)))
        colors = ["#888888" if ref else "#3b75af" for ref in is_ref]
        ax.barh(ys, med, xerr=[lo, hi], color=colors, capsize=3)
        for y, m, h, row in zip(ys, med, hi, rows):
            if not _ok(row.get(phase)):
                ax.text(0, y, " not measured" if row.get(phase) is None else " failed", va="center", fontsize=8)
            else:
                ax.text(m + h, y, f"  {m:.0f}", va="center", fontsize=8)
        ax.margins(x=0.12)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(list(range(len(rows))))
    axes[0].set_yticklabels(labels)
    axes[0].invert_yaxis()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
