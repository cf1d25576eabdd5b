"""Summary statistics of repeated timings.

Percentiles use linear interpolation between order statistics (numpy's default
"linear" method): the q-th percentile of sorted values x[0..n-1] is read at the
fractional index q/100 * (n - 1).
"""
import math

__all__ = ["percentile", "summarize"]


def percentile(values, q):
    """The q-th percentile (0 <= q <= 100) of a non-empty sequence of numbers."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile: q must be in [0, 100], got {q}")
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("percentile: no values")
    pos = q / 100.0 * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values):
    """Median and spread of repeated measurements.

    Args:
        values: a non-empty sequence of numbers (e.g. milliseconds per run).

    Returns:
        dict with n, median, p10, p90, q1 (25th), q3 (75th), iqr (q3 - q1), mean,
        min and max.
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("summarize: no values (did every timed run fail?)")
    q1, q3 = percentile(xs, 25), percentile(xs, 75)
    return {
        "n": len(xs),
        "median": percentile(xs, 50),
        "p10": percentile(xs, 10),
        "p90": percentile(xs, 90),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "mean": sum(xs) / len(xs),
        "min": min(xs),
        "max": max(xs),
    }
