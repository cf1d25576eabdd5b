"""The report: the verdict (judge), each stage's one-line summary, and the Markdown and
strict-JSON files (default docs/gpu_check.md and docs/gpu_check.json)."""
import json
import math
import os

from .process import fmt


STAGE_TITLES = {"environment": "Environment", "tests": "GPU op tests", "train": "Training on CUDA",
                "bench_ops": "Op benchmark", "bench": "Model benchmark"}


def _log_tail(section):
    if not section.get("log_tail"):
        return []
    return ["", f"End of `{section.get('log', 'the log')}`:", "", "```", section["log_tail"].rstrip(), "```"]


def _md_environment(env):
    """The collect_env output and nvidia-smi."""
    L = []
    if env and env["status"] != "skipped":
        L += ["## Environment", "", "```", env.get("collect_env", ""), "```", ""]
        if env.get("nvidia_smi"):
            L += ["<details><summary>nvidia-smi</summary>", "", "```", env["nvidia_smi"], "```", "", "</details>", ""]
    return L


def _md_tests(t):
    """Counts, failures and skips of the op tests."""
    L = []
    if t:
        L += ["## GPU op tests", "", f"Status: **{t['status']}**."]
        if t["status"] != "skipped":
            c = t.get("counts") or {}
            L += [f"`{t['command']}` (log `{t['log']}`)", "",
                  f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('errors', 0)} errors, "
                  f"{c.get('skipped', 0)} skipped of {c.get('tests', 0)}, in {t['wall_s']:.0f} s."]
            for p in t.get("problems", []):
                L.append(f"- problem: {p}")
            if t.get("failures"):
                L += ["", "Failures (first 30):", ""]
                L += [f"- `{f['test']}`: {f['message']}" for f in t["failures"][:30]]
            if t.get("skipped"):
                L += ["", "Skipped:", ""] + [f"- {x['count']} x {x['reason']}" for x in t["skipped"]]
            L += _log_tail(t)
        L.append("")
    return L


def _md_train(tr, smoke):
    """One row per trained config, then each failed run's problems."""
    L = []
    if tr:
        L += ["## Training on CUDA" if not smoke else "## Training (CPU smoke)", "", f"Status: **{tr['status']}**."]
        if tr["status"] != "skipped":
            L += [f"Overrides: `{' '.join(tr.get('overrides', []))}`; {tr.get('jobs')} runs at a time; "
                  "each run is evaluated on its DATASETS.TEST at the end. After so few iterations from scratch "
                  "the AP / mIoU only shows that inference and evaluation ran (NaN: no detections). ms/iter "
                  "(Detectron2's median iteration time) is with the other runs and the tests sharing the device.", "",
                  "| config | status | exit | iterations | final total_loss | losses finite | box AP | mask AP | mIoU "
                  "| ms/iter | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in tr["configs"]:
                L.append(f"| `{r['config']}` | {r['status']} | {fmt(r.get('rc'))} | {fmt(r.get('iterations'))} "
                         f"| {fmt((r.get('final_losses') or {}).get('total_loss'), 3)} | {fmt(r.get('losses_finite'))} "
                         f"| {fmt(r.get('box_AP'))} | {fmt(r.get('mask_AP'))} | {fmt(r.get('mIoU'))} "
                         f"| {fmt(r.get('ms_per_iter'), 0)} | {fmt(r.get('wall_s'), 0)} |")
            for r in tr["configs"]:
                if r.get("problems"):
                    L += ["", f"`{r['config']}`: {'; '.join(r['problems'])}" + (f" (log `{r['log']}`)" if r.get("log") else "")]
                    if r.get("log_tail"):
                        L += ["```", r["log_tail"].rstrip(), "```"]
        L.append("")
    return L


def _md_bench_ops(b):
    """One row per op, dtype and pass: compiled vs composite."""
    L = []
    if b:
        L += ["## Op benchmark", "", f"Status: **{b['status']}**."]
        if b["status"] != "skipped":
            L += [f"`{b['command']}`" + (f" — {b['setup']}" if b.get("setup") else ""), ""]
            if b["rows"]:
                L += ["Speed-up = composite / compiled (> 1: the compiled op is faster); memory ratio = compiled "
                      "peak / composite peak.", "",
                      "| op | dtype | pass | compiled ms | composite ms | speed-up | peak MiB compiled / composite "
                      "| memory ratio |", "|---|---|---|---|---|---|---|---|"]
            for r in b["rows"]:
                L.append(f"| {r['op']} | {r['dtype']} | {r['mode']} | {r['compiled_ms']:.2f} | {r['composite_ms']:.2f} "
                         f"| {r['speedup']:.2f}x | {r['compiled_peak_mib']:.1f} / {r['composite_peak_mib']:.1f} "
                         f"| {r['memory_ratio']:.3f} |")
            if b.get("slower_than_composite"):
                L += ["", "Slower than the composite: " + "; ".join(b["slower_than_composite"])]
            for p in b.get("problems", []):
                L.append(f"- problem: {p}")
            L += _log_tail(b)
        L.append("")
    return L


def _md_bench(m):
    """The model benchmark's own table."""
    L = []
    if m:
        L += ["## Model benchmark", "", f"Status: **{m['status']}**."]
        if m["status"] not in ("skipped", "not run"):
            L += [f"`{m['command']}` (log `{m['log']}`" + (f", chart `{m['chart']}`" if m.get("chart") else "") + ")", ""]
            table = "\n".join(l for l in m.get("table", "").splitlines() if not l.startswith("![")
                              and not l.startswith("# "))
            L.append(table.strip())
            for p in m.get("problems", []):
                L.append(f"- problem: {p}")
            L += _log_tail(m)
        L.append("")
    return L


def markdown(report):
    """The report as Markdown: verdict, warnings, the stage table, then one part per stage."""
    s = report["sections"]
    smoke = report["mode"] == "cpu-smoke"
    L = ["# d2seg GPU check" + (" — CPU SMOKE RUN (plumbing only, says nothing about CUDA)" if smoke else ""), ""]
    L.append(f"**Verdict: {report['verdict'].upper()}**"
             + (f" — failed: {', '.join(report['failed_sections'])}" if report["failed_sections"] else ""))
    L.append("")
    for w in report["warnings"]:
        L.append(f"- warning: {w}")
    if report["warnings"]:
        L.append("")
    git = s.get("environment", {}).get("git", {})
    L += [f"- Command: `{report['command']}` (from the repository root)",
          f"- Started {report['started_utc']} UTC; wall time {report['wall_s'] / 60:.1f} min",
          f"- Commit: `{git.get('commit', '?')}`" + (f" with {git['modified_files']} modified tracked file(s)"
                                                     if git.get("modified_files") else ""),
          "", "| stage | status | time s | summary |", "|---|---|---|---|"]
    for key, title in STAGE_TITLES.items():
        sec = s.get(key)
        if sec:
            L.append(f"| {title} | {sec['status']} | {fmt(sec.get('wall_s'), 0)} | {sec.get('summary', '')} |")
    L.append("")

    L += _md_environment(s.get("environment"))
    L += _md_tests(s.get("tests"))
    L += _md_train(s.get("train"), smoke)
    L += _md_bench_ops(s.get("bench_ops"))
    L += _md_bench(s.get("bench"))
    return "\n".join(L).rstrip() + "\n"


def summarize(sections):
    t = sections.get("tests")
    if t and t["status"] != "skipped":
        c = t.get("counts") or {}
        t["summary"] = (f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('errors', 0)} errors, "
                        f"{c.get('skipped', 0)} skipped")
    tr = sections.get("train")
    if tr and tr["status"] != "skipped":
        ok = sum(r["status"] == "pass" for r in tr["configs"])
        tr["summary"] = f"{ok} of {len(tr['configs'])} configs trained and evaluated, {tr['jobs']} at a time"
    b = sections.get("bench_ops")
    if b and b["status"] != "skipped":
        sp = [r["speedup"] for r in b["rows"]]
        b["summary"] = (f"{len(sp)} rows, speed-up {min(sp):.2f}x–{max(sp):.2f}x" if sp else "no rows") + (
            f", {len(b['slower_than_composite'])} slower than the composite" if b.get("slower_than_composite") else "")
    m = sections.get("bench")
    if m and m["status"] not in ("skipped", "not run"):
        m["summary"] = f"{len(m['rows'])} configs measured" + (
            f", {len(m['not_measured'])} not reached in time" if m.get("not_measured") else "")
    e = sections.get("environment")
    if e and e["status"] != "skipped":
        e["summary"] = "collect_env, nvidia-smi, git commit"


def _strict_json(x):
    """NaN / infinity as the strings "NaN" / "Infinity" / "-Infinity" (strict JSON has no such numbers)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, dict):
        return {k: _strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict_json(v) for v in x]
    return x


def write_report(prefix, report):
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(_strict_json(report), f, indent=1, default=str, allow_nan=False)
    with open(prefix + ".md", "w") as f:
        f.write(markdown(report))


def judge(sections):
    """(verdict, failed sections, warnings): "fail" if any section failed. Skipped or
    not-run sections, compiled ops slower than their composites and configs the model
    benchmark did not reach are warnings."""
    failed = [k for k, v in sections.items() if v["status"] == "fail"]
    warnings = []
    for k, v in sections.items():
        if v["status"] == "skipped":
            warnings.append(f"{STAGE_TITLES.get(k, k)} skipped (by a --skip switch)")
        elif v["status"] == "not run":
            warnings.append(f"{STAGE_TITLES.get(k, k)} not run: the time budget was spent")
    for row in sections.get("bench_ops", {}).get("slower_than_composite", []):
        warnings.append(f"compiled op slower than its composite: {row}")
    if sections.get("bench", {}).get("not_measured"):
        warnings.append(f"model benchmark: {len(sections['bench']['not_measured'])} run(s) not reached in time")
    return ("fail" if failed else "pass"), failed, warnings
