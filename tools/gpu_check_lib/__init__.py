"""The parts of tools/gpu_check.py (`make test-gpu`), one module per job:

  process      subprocesses with deadlines (Job), the run's time budget, logging, paths
  preflight    can the CUDA build be checked here? (torch.cuda, d2seg._C.has_cuda())
  environment  collect_env, nvidia-smi, the git commit
  op_tests     the op checks and gradcheck: tests/test_gpu_ops.py and the suite's CUDA-only
               tests under pytest, read back from JUnit XML
  training     AMP training steps of every shapes config, evaluated, read from metrics.json
  benchmarks   the op benchmark (compiled vs composite) and the model benchmark
  report       the verdict, the Markdown and JSON report

Each stage function returns a JSON-able dict with at least "status" ("pass", "fail",
"skipped" or "not run"); tools/gpu_check.py runs them in order and writes the report.
"""
