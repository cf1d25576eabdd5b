"""Peak memory of one measured phase (model build + the timed runs) of this process.

CPU: the Linux peak resident set size (VmHWM in /proc/self/status) after resetting it
with ``/proc/self/clear_refs`` at the start of the phase, minus the RSS at that start, so
the number is what the phase added on top of the imported libraries and loaded data
(weights, activations, gradients, optimizer state, allocator caches). Where the reset
is not allowed, the process-lifetime high-water mark ``ru_maxrss`` is used instead (an
upper bound if the imports peaked higher than the phase). Each phase runs in a fresh
process (see tools/benchmark.py), so phases never share a high-water mark.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors
only; the caching allocator's reserve and the CUDA context are not counted).
"""
import gc
import re
import resource

__all__ = ["PeakMemory"]

_MIB = 1024.0 * 1024.0


def _status_kib(field):
    """A ``kB`` field of /proc/self/status (e.g. VmRSS, VmHWM), or None."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak_rss():
    """Reset the kernel's peak RSS (VmHWM) of this process; True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


class PeakMemory:
    """``start()`` before building the model, ``peak_mib()`` after the timed runs."""

    def __init__(self, device="cpu"):
        self.device = str(device)
        self.method = None
        self._base_kib = 0

    def start(self):
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.method = "torch.cuda.max_memory_allocated"
            return
        # Free what earlier work left to the cycle collector now, not during the phase: a
        # collection inside it would lower the RSS and hide the phase's own peak.
        gc.collect()
        rss = _status_kib("VmRSS")
        if rss is not None and _reset_peak_rss():
            self._base_kib = _status_kib("VmRSS")
            self.method = "peak RSS (VmHWM, reset at start) - RSS at start"
        else:
            self._base_kib = rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "ru_maxrss (process lifetime) - RSS at start"

    def peak_mib(self):
        """Memory (MiB) the phase added at its peak."""
        if self.method is None:
            raise RuntimeError("PeakMemory.peak_mib() called before start()")
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / _MIB
        if self.method.startswith("peak RSS"):
            peak = _status_kib("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return max(0, peak - self._base_kib) * 1024.0 / _MIB

    @staticmethod
    def process_rss_mib():
        """Current RSS of this process in MiB (None where /proc is missing)."""
        rss = _status_kib("VmRSS")
        return None if rss is None else rss / 1024.0

