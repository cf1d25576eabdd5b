#!/usr/bin/env bash
# d2seg set-up: one command from a fresh machine to an installed, compiled d2seg.
#
#   bash tools/setup.sh            # creates ./.venv (or uses $VIRTUAL_ENV / $D2SEG_PYTHON)
#
# Steps: torch 2.14.1 + torchvision 0.29.1; Detectron2 only if `import detectron2` fails
# (upstream source install first, then the registry wheel's Python files); pinned runtime
# needs; d2seg in editable mode, compiling csrc/ (with the CUDA sources when nvcc is found
# or FORCE_CUDA=1).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
log() { printf '\n[d2seg setup] %s\n' "$*"; }

# 1. The Python environment.
if [ -n "${D2SEG_PYTHON:-}" ]; then
  PY="$D2SEG_PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
else
  if [ ! -x "$ROOT/.venv/bin/python" ]; then
    log "creating virtual environment $ROOT/.venv"
    python3 -m venv "$ROOT/.venv"
  fi
  PY="$ROOT/.venv/bin/python"
fi
log "using Python: $PY ($("$PY" --version 2>&1))"
PIP=("$PY" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip wheel

if [ "${SKIP_DEPS:-0}" != "1" ]; then
# 2. PyTorch (the pair verified on these machines; keep a compatible one a user already has).
if "$PY" -c "import torch, torchvision" 2>/dev/null; then
  log "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed, keeping it"
else
  log "installing torch==2.14.1 torchvision==0.29.1"
  "${PIP[@]}" install torch==2.14.1 torchvision==0.29.1
fi

# 3. Runtime needs, pinned (see README "Why the pins").
log "installing runtime and test requirements"
"${PIP[@]}" install -r requirements.txt

# 4. Detectron2, only if it is not importable already.
if "$PY" -c "import detectron2" 2>/dev/null; then
  log "detectron2 already importable, keeping it: $("$PY" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))')"
else
  log "detectron2 not found: trying the upstream source install"
  if timeout 600 "${PIP[@]}" install --no-build-isolation \
      'git+https://github.com/facebookresearch/detectron2.git' 2>/dev/null; then
    log "detectron2 installed from source"
  else
    log "source install unavailable; installing the Python files of the registry wheel sal-detectron2==0.7.2"
    TMP=$(mktemp -d)
    "${PIP[@]}" install -q --no-deps --only-binary=:all: --python-version 3.10 \
      --target "$TMP" sal-detectron2==0.7.2
    SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    rm -rf "$SITE/detectron2"
    cp -r "$TMP/detectron2" "$SITE/detectron2"
    # Its _C binary is built for CPython 3.10 and cannot load here; remove it so that
    # Detectron2 takes its documented pure-Python fallbacks.
    find "$SITE/detectron2" -maxdepth 1 -name '_C*.so' -delete
    rm -rf "$TMP"
  fi
fi
"$PY" -c "import detectron2.modeling" || { echo "detectron2 does not import" >&2; exit 1; }
fi  # SKIP_DEPS

# 5. d2seg itself, editable, compiling csrc/.
if [ -z "${FORCE_CUDA:-}" ] && command -v nvcc >/dev/null 2>&1; then
  export FORCE_CUDA=1
fi
if [ "${FORCE_CUDA:-0}" = "1" ]; then
  NVCC=$(command -v nvcc || true)
  if [ -z "${CUDA_HOME:-}" ]; then
    if [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda
    elif [ -n "$NVCC" ]; then export CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")"); fi
  fi
  SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for inc in "$SITE"/nvidia/cu*/include; do
    [ -d "$inc" ] && export CPATH="$inc${CPATH:+:$CPATH}"
  done
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
  log "building d2seg with CUDA sources (CUDA_HOME=$CUDA_HOME, arch $TORCH_CUDA_ARCH_LIST)"
else
  log "no nvcc found: building d2seg CPU-only"
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
"${PIP[@]}" install --no-build-isolation --no-deps -e .
"$PY" -m d2seg.collect_env
log "done. Run the tests with: make test"
