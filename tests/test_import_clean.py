"""``import d2seg`` in a fresh process is quiet and local: it prints nothing (not even the
FutureWarning that fvcore's torch.jit.script calls raise under PyTorch 2.14), opens no
network connection, writes no file (data sets, caches and downloads are made on first use,
not on import), leaves no warning filter of its own (and keeps those PyTorch installs
when d2seg's import is the first to import it), and does not import
scipy.optimize (SparseInst's matcher imports it when it first matches)."""
import os
import subprocess
import sys

CHILD = r"""
import json, socket, sys, warnings

def no_network(*args, **kwargs):
    raise AssertionError(f"network use while importing d2seg: {args!r}")

socket.socket.connect = socket.socket.connect_ex = no_network
socket.create_connection = socket.getaddrinfo = no_network
import d2seg
# d2seg's own filter for fvcore's warning is gone; the filters PyTorch installs when it is
# first imported (under d2seg's import) are kept
assert not [f for f in warnings.filters if f[1] is not None and "jit" in f[1].pattern and f[2] is FutureWarning]
assert any(f[2].__name__ == "TracerWarning" for f in warnings.filters)
json.dump({"scipy.optimize": "scipy.optimize" in sys.modules}, open(sys.argv[1], "w"))
"""


def test_import_d2seg_prints_nothing_and_writes_nothing(tmp_path):
    home, work, cache = tmp_path / "home", tmp_path / "cwd", tmp_path / "cache"
    for d in (home, work, cache):
        d.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "PYTHONDONTWRITEBYTECODE")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(cache), D2SEG_CACHE=str(cache / "d2seg"),
               FVCORE_CACHE=str(cache / "fvcore"), DETECTRON2_DATASETS=str(cache / "datasets"),
               OMP_NUM_THREADS="1")
    result = tmp_path / "result.json"
    out = subprocess.run([sys.executable, "-c", CHILD, str(result)], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == "" and out.stderr == "", (out.stdout + out.stderr)[-3000:]
    assert result.read_text() == '{"scipy.optimize": false}'
    written = sorted(str(p.relative_to(tmp_path)) for d in (home, work, cache) for p in d.rglob("*"))
    assert written == []
