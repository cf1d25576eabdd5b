"""How far a learning-test fit (tests/fitting.py) moves under another CPU's rounding.

A fit is deterministic on one machine, but a few tens of iterations on four images amplify
the last-bit differences between CPUs (another summation order in the convolutions). This
tool stands in for another CPU: it multiplies every initial weight by (1 + e * N(0, 1)) for
each given e (e = 0: the fit itself), fits with the config's plan (or ``--iters``) and
evaluates as tests/test_learning.py does, one line per e. A plan is robust when the spread
stays well above its bar (tests/test_learning.py: bars are about 70 % of the lowest value).

    OMP_NUM_THREADS=1 .venv/bin/python dev/diagnose/fit_spread.py SparseInst/sparse_inst_r18_giam_shapes.yaml \\
        --eps 0 1e-7 2e-7 3e-7
"""
import argparse
import dataclasses
import os
import sys
import tempfile
import time

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tests")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a shapes config, relative to configs/ (as in tests/fitting.py)")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.0, 1e-7, 2e-7, 3e-7],
                        help="relative perturbations of the initial weights (0: none)")
    parser.add_argument("--iters", type=int, default=None, help="iterations (default: the config's plan)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    os.environ.setdefault("DETECTRON2_DATASETS", tempfile.mkdtemp(prefix="d2seg-fit-spread-"))
    sys.path.insert(0, TESTS)
    import torch

    torch.set_num_threads(args.threads)
    import d2seg  # noqa: F401
    import fitting

    if args.config not in fitting.SHAPES_CONFIGS:
        parser.error(f"{args.config}: not a shapes config of configs/ ({', '.join(fitting.SHAPES_CONFIGS)})")
    plan = fitting.plan_for(args.config)
    if args.iters:
        plan = dataclasses.replace(plan, iters=args.iters)
    for k, eps in enumerate(args.eps):
        cfg, model, batch = fitting._setup(args.config)
        if eps > 0:
            g = torch.Generator().manual_seed(k + 1)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1 + eps * torch.randn(p.shape, generator=g))
        start = time.perf_counter()
        losses = fitting._train(cfg, model, batch, plan)
        seconds = time.perf_counter() - start
        model.eval()
        results = fitting.evaluate(fitting.Fit(cfg, model, batch, seconds, losses))
        values = {t: round(r.get("AP", r.get("mIoU", float("nan"))), 1) for t, r in results.items()}
        print(f"{args.config} e={eps:g} iters={plan.iters}: {values}  loss {losses[0]:.3f} -> "
              f"{sum(losses[-5:]) / 5:.3f}  fit {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
