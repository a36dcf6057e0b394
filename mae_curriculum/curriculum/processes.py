"""Training runs as child processes: the proxy runs of the curriculum search and the cells of
``benchmarks/time_to_accuracy.py``. Each child runs in its own session (a Ctrl-C at the terminal reaches it only
through its parent's signal handler, which forwards SIGTERM so that the run saves a checkpoint and exits 75)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


def child_env(threads: int = 0) -> dict[str, str]:
    """This process's environment for a training run of its own: unbuffered output, no inherited rank variables
    (the child is a one-process run or launches its own ranks), ``OMP_NUM_THREADS=threads`` when > 0."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


@dataclass
class Children:
    """The running children of one parent, and whether it was asked to stop."""

    stop: threading.Event = field(default_factory=threading.Event)
    live: set = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def terminate(self) -> None:
        """Start nothing new; SIGTERM to every running child (they save a checkpoint and exit 75)."""
        self.stop.set()
        with self.lock:
            for p in self.live:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def run(self, cmd: list[str], log_file: Path, env: dict[str, str], cwd: Path | None = None,
            on_start: Callable[[subprocess.Popen], None] | None = None) -> tuple[int, float, float]:
        """Run ``cmd`` with its output appended to ``log_file`` (after a ``$ cmd`` line). Returns the exit status,
        the wall seconds and the CPU seconds (user + system, its own children included: ``wait4``)."""
        t0 = time.time()
        with open(log_file, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                    start_new_session=True)
            if on_start is not None:
                on_start(proc)
            with self.lock:
                self.live.add(proc)
            if self.stop.is_set():  # a stop between the caller's check and the start
                proc.send_signal(signal.SIGTERM)
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            finally:
                with self.lock:
                    self.live.discard(proc)
        proc.returncode = os.waitstatus_to_exitcode(status)
        return proc.returncode, time.time() - t0, usage.ru_utime + usage.ru_stime
