"""Benchmark of the d2seg models: inference latency, images/s and peak memory, training
iteration time and peak memory, one fresh process per config and phase.

Entry point: ``tools/benchmark.py`` (see docs/benchmark.md). Parts:
:mod:`.stats` (median and spread), :mod:`.memory` (peak memory of a phase),
:mod:`.configs` (which configs, their names, the all-detections switch),
:mod:`.measure` (the measurements), :mod:`.worker` (one phase in a subprocess),
:mod:`.report` (Markdown table and PNG chart).
"""
from .configs import SEMANTIC_YARDSTICK, YARDSTICK, all_detections_opts, discover_shapes_configs, method_name
from .stats import percentile, summarize

__all__ = [
    "YARDSTICK",
    "SEMANTIC_YARDSTICK",
    "all_detections_opts",
    "discover_shapes_configs",
    "method_name",
    "percentile",
    "summarize",
]
