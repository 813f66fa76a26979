"""Training subprocesses for grids and studies: each run is ``python -m lit.cli --config <file>``
(the ``fwpkm train`` of that config), so a crash or a kill takes down one run, not the runner."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Union

from ablations import PROJECT_ROOT

LOG_FILE = "train.log"
CONFIG_FILE = "grid_config.yaml"


class ProcessGroup:
    """The training processes a runner has started, to stop them all on an interrupt."""

    def __init__(self):
        self._procs: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def add(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs[proc.pid] = proc

    def discard(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.pop(proc.pid, None)

    def stop_all(self) -> None:
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            stop(proc)


def child_env(threads: Optional[int] = None, **extra: str) -> dict:
    """The environment of a child: this project importable, MLflow synchronous, not inside the parent's run."""
    env = dict(os.environ)
    root = str(PROJECT_ROOT)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    env.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    env.pop("MLFLOW_RUN_ID", None)  # never log into the runner's own run
    if threads and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra)
    return env


def run_training(config_path: Path, log_path: Path, env: dict, timeout: Optional[float] = None,
                 group: Optional[ProcessGroup] = None) -> tuple[Union[int, str], str]:
    """Train ``config_path`` with output appended to ``log_path``; returns (exit code or "timeout",
    this attempt's part of the log, at most its last 6,000 characters)."""
    cmd = [sys.executable, "-m", "lit.cli", "--config", str(config_path)]
    with open(log_path, "a") as log:
        offset = log.tell()
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                                preexec_fn=functools.partial(die_with_parent, os.getpid()))
        if group is not None:
            group.add(proc)
        try:
            rc: Union[int, str] = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            rc = "timeout"
        except BaseException:
            stop(proc)
            raise
        finally:
            if group is not None:
                group.discard(proc)
    with open(log_path, errors="replace") as log:
        log.seek(offset)
        tail = log.read()[-6000:]
    return rc, tail


def die_with_parent(parent_pid: int) -> None:
    """In a child between fork and exec (Linux): the kernel sends it SIGKILL when the thread that started
    it ends, so a runner killed with SIGKILL never leaves a training running untracked (the training's
    checkpoints are atomic and its run folder lock dies with it; the next runner resumes it)."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def error_line(text: str) -> str:
    """The most telling line of a log: the last ``error: ...`` line or Python exception line, else
    the last line mentioning an error, else the last non-empty line."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    pattern = re.compile(r"(^|\s)error:|^[\w.]*(Error|Exception|Interrupt)\b.*:|^[\w.]*(Error|Exception)$")
    for line in reversed(lines):
        if pattern.search(line) and not line.startswith("- "):
            return line[:500]
    for line in reversed(lines):
        if "error" in line.lower() or "exception" in line.lower():
            return line[:500]
    return lines[-1][:500] if lines else "(no output)"


def failure_text(reason: str, log_tail: str) -> str:
    """A failure for the ``fwpkm.error`` tag: the reason and the telling line first, then the log's end."""
    return f"{reason}: {error_line(log_tail)}\n--- end of train.log ---\n{log_tail[-3500:]}"
