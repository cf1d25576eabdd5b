"""Subprocesses with deadlines, the run's time budget, progress lines and repository paths."""
import math
import os
import shlex
import signal
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START = time.time()  # the run's start (this module is imported first)


def log(msg):
    """A progress line, stamped with the minutes and seconds since the start."""
    t = int(time.time() - START)
    print(f"[gpu_check {t // 60:02d}:{t % 60:02d}] {msg}", flush=True)


def rel(path):
    """A path relative to the repository root when it lies inside it."""
    if os.path.isabs(path) and os.path.commonpath([path, REPO]) == REPO:
        return os.path.relpath(path, REPO)
    return path


class Budget:
    """The whole run's time: a stage's own limit is cut to what is left of it, so that the
    run ends in time even when every stage runs to its limit."""

    def __init__(self, seconds, start=None):
        self.seconds = seconds
        self.end = (start if start is not None else time.time()) + seconds

    def left(self):
        return self.end - time.time()

    def limit(self, seconds, floor=10.0):
        """`seconds`, or less when less is left (at least `floor`)."""
        return max(floor, min(seconds, self.left()))


class Job:
    """A subprocess in its own session (so a timeout ends it and all its children), output
    to a log file, with a deadline."""

    def __init__(self, name, cmd, log_path, timeout, env=None):
        self.name, self.cmd, self.log_path, self.timeout = name, cmd, log_path, timeout
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        self._log = open(log_path, "w")
        self._log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n\n")
        self._log.flush()
        self.start = time.time()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self.rc, self.timed_out, self.wall_s = None, False, None

    def poll(self):
        """Finished (or just killed for its deadline)?"""
        if self.rc is not None:
            return True
        rc = self.proc.poll()
        if rc is None and time.time() - self.start > self.timeout:
            self.kill()
            self.timed_out = True
            rc = self.proc.wait()
        if rc is None:
            return False
        self.rc, self.wall_s = rc, time.time() - self.start
        self._log.close()
        return True

    def kill(self):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                continue

    def wait(self):
        while not self.poll():
            time.sleep(0.5)
        return self

    def result(self):
        return {"command": " ".join(shlex.quote(c) for c in self.cmd), "rc": self.rc, "timed_out": self.timed_out,
                "wall_s": round(self.wall_s or 0.0, 1), "log": rel(self.log_path)}


def limit_and_exit_problems(job):
    """The problems of a finished job's process itself: its time limit reached, a non-zero
    exit status (a job killed at its limit has both)."""
    problems = []
    if job.timed_out:
        problems.append(f"time limit of {job.timeout:.0f} s reached")
    if job.rc != 0:
        problems.append(f"exit status {job.rc}")
    return problems


def conclude(section, problems, job, tail_lines):
    """Set a report section's status ("fail" when there are problems, else "pass") and
    problems, and with problems the last `tail_lines` lines of the job's log. Returns it."""
    section["status"] = "fail" if problems else "pass"
    section["problems"] = problems
    if problems:
        section["log_tail"] = tail(job.log_path, tail_lines)
    return section


def tail(path, n=15):
    """The last `n` lines of a log file ("" if unreadable)."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def child_env(threads, **extra):
    """This process's environment with `threads` CPU threads and unbuffered Python output."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def fmt(x, digits=1):
    """A number for a table: "–" for none, "NaN" for NaN, floats with `digits` decimals."""
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        return f"{x:.{digits}f}"
    return str(x)
