#!/usr/bin/env bash
# The GPU check on a machine without network, over that machine's own PyTorch (docs/gpu.md):
#
#   bash tools/gpu_offline.sh [REPORT_DIR] [-- GPU_CHECK_ARGS...]     # or: make test-gpu-offline
#
# Run from a checkout with the bundle of `make gpu-bundle` beside it (./gpu_bundle, or
# $GPU_BUNDLE). Steps, each timed:
#   1. install  `pip install --no-index --no-deps --target $D2SEG_TARGET` of the bundle's wheels
#               (no venv, nothing downloaded; Detectron2's wheel is skipped where
#               `import detectron2` already works), then that folder first on PYTHONPATH;
#   2. check    tools/gpu_bundle.py check: Python version, every requirement met (named if not);
#   3. build    d2seg and its extension d2seg._C into the same folder, with the machine's nvcc
#               for its GPU's architecture (TORCH_CUDA_ARCH_LIST from
#               torch.cuda.get_device_capability()); CPU-only where PyTorch sees no GPU;
#   4. run      tools/gpu_check.py with the time that is left of $GPU_OFFLINE_BUDGET_S (default
#               540 s for the whole script), report into REPORT_DIR.
# REPORT_DIR (default: $OUT where set, else output/gpu_offline) receives gpu_check.md and
# gpu_check.json (the report), offline.json (steps, times, versions), offline.log (install and
# build output) and gpu_check_logs.tar.gz (every stage's log). Exit status: gpu_check's (0 pass,
# 1 failed, 2 refused: no CUDA), or 3 when a step before it failed.
# Environment: PYTHON (default python3: the machine's Python with its PyTorch), GPU_BUNDLE,
# D2SEG_TARGET (default /tmp/d2seg-offline), GPU_OFFLINE_BUDGET_S, GPU_OFFLINE_BUILD_TIMEOUT_S
# (default 420), MAX_JOBS (default: every core).
set -uo pipefail
START=$SECONDS
PY=${PYTHON:-python3}
# paths given by the caller are relative to where it runs; the defaults to the checkout
REPO=$(realpath -m "$(dirname "$0")/..")
BUNDLE=$(realpath -m "${GPU_BUNDLE:-$REPO/gpu_bundle}")
TARGET=$(realpath -m "${D2SEG_TARGET:-/tmp/d2seg-offline}")
BUDGET=${GPU_OFFLINE_BUDGET_S:-540}
REPORT_DIR=${OUT:-$REPO/output/gpu_offline}
if [ $# -gt 0 ] && [ "$1" != "--" ]; then REPORT_DIR=$1; shift; fi
[ "${1:-}" = "--" ] && shift
REPORT_DIR=$(realpath -m "$REPORT_DIR")
cd "$REPO"
mkdir -p "$REPORT_DIR"
LOG="$REPORT_DIR/offline.log"
: >"$LOG"
declare -A STEP_S

say() { printf '[gpu_offline %03ds] %s\n' $((SECONDS - START)) "$*" | tee -a "$LOG"; }
fail() { say "FAILED: $*"; write_json "failed: $*"; exit 3; }
write_json() {  # offline.json: what ran, how long, on what
  "$PY" - "$REPORT_DIR/offline.json" "$1" "${TORCH_OK:-0}" "$BUNDLE" "$TARGET" "${ARCH:-}" "${FORCE_CUDA:-}" \
    "install=${STEP_S[install]:-}" "check=${STEP_S[check]:-}" "build=${STEP_S[build]:-}" "run=${STEP_S[run]:-}" \
    "total=$((SECONDS - START))" <<'EOF'
import json, platform, sys
path, status, torch_ok, bundle, target, arch, force_cuda, *steps = sys.argv[1:]
torch_info = {"torch": None}
if torch_ok == "1":
    import torch
    torch_info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0)
                  if torch.cuda.is_available() else None}
try:
    with open(f"{bundle}/bundle.json") as f:
        manifest = json.load(f)
    manifest = {k: manifest.get(k) for k in ("python", "built_utc", "built_at_commit", "bytes")} | {
        "wheels": [w["file"] for w in manifest["wheels"]]}
except (OSError, KeyError, ValueError) as e:
    manifest = {"error": str(e)}
json.dump({"status": status, "python": platform.python_version(), **torch_info, "bundle": bundle,
           "bundle_manifest": manifest, "target": target, "torch_cuda_arch_list": arch or None,
           "cuda_kernels_built": force_cuda == "1",
           "steps_s": {k: int(v) for k, v in (s.split("=") for s in steps) if v}}, open(path, "w"), indent=1)
EOF
}

# 0. What is here.
[ -f "$BUNDLE/bundle.json" ] || fail "no bundle at $BUNDLE (make it with \`make gpu-bundle\` on a machine with PyPI, and put it beside the checkout or set GPU_BUNDLE)"
"$PY" -c "import torch" 2>>"$LOG" || fail "$PY cannot import torch: this route installs over the machine's own PyTorch"
TORCH_OK=1
say "python $("$PY" -c 'import platform; print(platform.python_version())'), torch $("$PY" -c 'import torch; print(torch.__version__)'), bundle $BUNDLE, install folder $TARGET"

# 1. install
T=$SECONDS
WHEELS=("$BUNDLE"/*.whl)
SKIPPED=()  # bundled distributions left out of the install, not checked in step 2
if "$PY" -c "import detectron2" 2>/dev/null; then
  say "detectron2 is importable already: keeping it, not installing the bundle's"
  WHEELS=($(printf '%s\n' "${WHEELS[@]}" | grep -v '/sal_detectron2-'))
  SKIPPED=(--skipped sal-detectron2)
fi
rm -rf "$TARGET" && mkdir -p "$TARGET"
say "install: ${#WHEELS[@]} wheels (pip --no-index --no-deps --target)"
"$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-cache-dir --target "$TARGET" \
  "${WHEELS[@]}" >>"$LOG" 2>&1 || fail "pip install of the bundle (see $LOG)"
export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
STEP_S[install]=$((SECONDS - T))

# 2. check
T=$SECONDS
"$PY" tools/gpu_bundle.py check --bundle "$BUNDLE" --target "$TARGET" ${SKIPPED[@]+"${SKIPPED[@]}"} >>"$LOG" 2>&1 \
  || { grep 'gpu_bundle check:' "$LOG"; fail "the bundle's requirements are not met here (see $LOG)"; }
STEP_S[check]=$((SECONDS - T))

# 3. build d2seg and d2seg._C
T=$SECONDS
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  NVCC=$(command -v nvcc || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; } || true)
  [ -n "$NVCC" ] || fail "PyTorch sees a GPU but there is no nvcc (neither on PATH nor /usr/local/cuda/bin) to build d2seg._C's CUDA kernels"
  export FORCE_CUDA=1 PATH="$(dirname "$NVCC"):$PATH"
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST="$ARCH"
  say "build: d2seg._C with CUDA kernels for arch $ARCH ($("$NVCC" --version | tail -1))"
else
  export FORCE_CUDA=0
  say "build: PyTorch sees no GPU: d2seg._C CPU-only (gpu_check will refuse unless run as its CPU smoke test)"
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
timeout "${GPU_OFFLINE_BUILD_TIMEOUT_S:-420}" "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-build-isolation \
  --use-pep517 --no-cache-dir --target "$TARGET" . >>"$LOG" 2>&1 || fail "building d2seg (see $LOG)"
"$PY" - "$TARGET" >>"$LOG" 2>&1 <<'EOF' || fail "d2seg or d2seg._C does not import from $TARGET after the build (see $LOG)"
import os, sys
import d2seg, d2seg._C as C
print("d2seg", d2seg.__file__, "- d2seg._C", C.__file__, "- CUDA kernels:", C.has_cuda())
sys.exit(0 if os.path.realpath(C.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep) else 1)
EOF
STEP_S[build]=$((SECONDS - T))

# 4. run
LEFT=$((BUDGET - (SECONDS - START) - 15))
say "run: tools/gpu_check.py with ${LEFT} s left of the ${BUDGET} s budget"
T=$SECONDS
WORK="$(realpath -m output/gpu_offline_work)"
"$PY" tools/gpu_check.py --out "$REPORT_DIR/gpu_check" --work-dir "$WORK" --budget-s "$LEFT" "$@" 2>&1 | tee -a "$LOG"
RC=${PIPESTATUS[0]}
STEP_S[run]=$((SECONDS - T))
if [ -d "$WORK" ]; then
  (cd "$WORK" && find . -type f \( -name '*.log' -o -name '*.json' -o -name '*.xml' -o -name '*.md' \) -print0 \
    | tar czf "$REPORT_DIR/gpu_check_logs.tar.gz" --null -T -)
fi
write_json "gpu_check exit status $RC"
say "done: exit status $RC; report in $REPORT_DIR (gpu_check.md, gpu_check.json, offline.json, offline.log, gpu_check_logs.tar.gz)"
exit "$RC"
