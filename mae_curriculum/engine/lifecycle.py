"""One run lifecycle for pre-training and fine-tuning: output folder, seeding, resume, checkpoints, the stop
signal, the per-step agreement between ranks, status files and exit statuses.

An engine subclasses :class:`RunLifecycle` and supplies what is its own: ``client_state()`` / ``run_state()``
(what a checkpoint holds besides DeepSpeed's files) and ``restore(path)`` (load a checkpoint into the run).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from mae_curriculum.config import to_dict
from mae_curriculum.engine import dist as D
from mae_curriculum.engine.checkpointer import Checkpointer
from mae_curriculum.engine.errors import (
    EXIT_DIVERGED,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    TrainingError,
)
from mae_curriculum.engine.nonfinite import NonFinitePolicy
from mae_curriculum.engine.state import Counters

log = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (a scheduler's preemption or time limit); the ranks agree on it each step."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True


def check_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"output_dir {path} is not writable: {e.strerror or e}", EXIT_USAGE) from None


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


@dataclass
class Agreement:
    """What all ranks decided together after a micro-step."""

    nonfinite: bool  # the loss was not finite on some rank: every rank skips the step
    stop: bool  # some rank received a stop signal: every rank checkpoints and exits 75
    save_due: bool  # some rank's clock says a timed checkpoint is due


class RunLifecycle:
    def __init__(self, cfg, resume: str = "auto"):
        self.cfg = cfg
        self.resume_arg = resume
        self.out = Path(cfg.output_dir)
        self.counters = Counters()
        self.stop = StopFlag()
        self.checkpointer = Checkpointer(cfg.checkpoint, self.out / "checkpoints")
        self.nonfinite = NonFinitePolicy(cfg.train.nan_skip_limit)
        self.resumed_from: str | None = None
        self.engine = None
        self.loaders: list = []  # closed at the end, whatever happens
        self.tb = None
        self.dev, self.world, self.rank = D.device(), D.world_size(), D.rank()

    # ------------------------------------------------------------------ start
    def begin(self) -> None:
        """Before the model is built: output folder and seeds."""
        check_output_dir(self.out)
        seed_everything(self.cfg.train.seed, self.cfg.train.deterministic)

    def resume(self) -> None:
        path = self.checkpointer.resume_path(self.resume_arg)
        if path is None:
            return
        self.restore(path)
        self.resumed_from = str(path)
        c = self.counters
        log.info("resumed from %s at step %d (epoch %d, batch %d of the epoch, progress %.4f)", path, c.step,
                 c.epoch, c.step_in_epoch, c.progress)

    def record_start(self, **info) -> None:
        """Resolved config, one ``run_info.jsonl`` line per start, status "running"; then listen for signals."""
        if D.is_main():
            (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            info = {"git_commit": git_commit(), "world_size": self.world, "started": time.time(),
                    "resumed_from": self.resumed_from, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                    "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"), **info}
            with open(self.out / "run_info.jsonl", "a") as f:
                f.write(json.dumps(info) + "\n")
        self.write_status("running")
        self.stop.install()

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        """Epochs until the budget is spent (the engine's ``run_epoch`` says why each one stopped), then the
        final outputs; exit status 0, or 75 after a preemption checkpoint."""
        c = self.counters
        while not self.budget.done(c, self.cfg.train.max_steps):
            why = self.run_epoch()
            if why == "preempted":
                self.metrics.close()
                return self.preempted()
            if why == "epoch_end":
                self.end_epoch()
        self.metrics.close()
        self.write_outputs()
        return self.finished()

    # ------------------------------------------------------------------ during
    def handle_nonfinite(self, nonfinite: bool) -> str:
        """Apply the non-finite policy to a micro-step the ranks agreed on: "ok", "skip" (counted) or "rollback"
        (done: the run is back at the newest complete checkpoint)."""
        c = self.counters
        verdict = self.nonfinite.observe(nonfinite, c.micro_step)
        if verdict == "skip":
            c.nonfinite_skips += 1
            self.tb.add({"faults/nonfinite_skips": c.nonfinite_skips}, c.step)
        elif verdict == "rollback":
            self.rollback()
        return verdict

    def agree(self, loss: torch.Tensor) -> Agreement:
        """The one collective (and host sync) of a micro-step: non-finite loss, stop signal, timed save."""
        flags = torch.stack([(~torch.isfinite(loss.detach())).float().reshape(()),
                             torch.full((), float(self.stop.requested), device=self.dev),
                             torch.full((), float(self.checkpointer.time_due()), device=self.dev)])
        nonfinite, stop, save_due = (bool(v) for v in D.all_reduce_flags(flags).tolist())
        return Agreement(nonfinite, stop, save_due)

    def save(self, epoch_end: int | None = None) -> Path:
        path = self.checkpointer.save(self.engine, self.counters.step, self.client_state(), self.run_state(),
                                      epoch_end)
        if self.tb is not None:
            self.tb.add({"checkpoint/step": self.counters.step}, self.counters.step)
        return path

    def rollback(self) -> None:
        """Back to the newest complete checkpoint (the non-finite policy decided so); fault counters kept."""
        path = self.nonfinite.rollback_target(self.checkpointer.newest())
        skips, rollbacks = self.counters.nonfinite_skips, self.counters.rollbacks
        self.restore(path)
        self.counters.nonfinite_skips, self.counters.rollbacks = skips, rollbacks + 1
        if self.tb is not None:
            self.tb.add({"faults/rollbacks": self.counters.rollbacks}, self.counters.step)

    # ------------------------------------------------------------------ end
    def preempted(self) -> int:
        log.warning("preemption signal received: saving a checkpoint at step %d and exiting (%d)",
                    self.counters.step, EXIT_PREEMPTED)
        self.save()
        self.write_status("preempted")
        return EXIT_PREEMPTED

    def finished(self) -> int:
        self.write_status("finished")
        return EXIT_OK

    def write_status(self, status: str, **extra) -> None:
        """Every rank records how it ended (``ranks/rank<r>.json``); rank 0 also writes ``status.json``, which
        launch scripts read (a signalled ``deepspeed`` launcher exits 1 whatever its ranks returned)."""
        c = self.counters
        rec = {"status": status, "step": c.step, "samples": c.samples, "epoch": c.epoch,
               "step_in_epoch": c.step_in_epoch, "rank": self.rank, "world_size": self.world,
               **self.status_extra(), **extra}
        (self.out / "ranks").mkdir(exist_ok=True)
        (self.out / "ranks" / f"rank{self.rank}.json").write_text(json.dumps(rec))
        if D.is_main():
            tmp = self.out / "status.json.tmp"
            tmp.write_text(json.dumps(rec))
            os.replace(tmp, self.out / "status.json")

    def close(self) -> None:
        """Release loader workers and writers; called whatever happened (see :func:`run_to_end`)."""
        for loader in self.loaders:
            close = getattr(loader, "close", None)
            if close is not None:
                close()
        self.loaders = []
        if self.tb is not None:
            self.tb.close()

    # ------------------------------------------------------------------ the engine's part
    def client_state(self) -> dict:
        raise NotImplementedError

    def run_state(self) -> dict:
        raise NotImplementedError

    def restore(self, path: Path) -> None:
        raise NotImplementedError

    def run_epoch(self) -> str:
        """Train to the end of the epoch; returns epoch_end, finished, rollback or preempted."""
        raise NotImplementedError

    def end_epoch(self) -> None:
        raise NotImplementedError

    def write_outputs(self) -> None:
        raise NotImplementedError

    def status_extra(self) -> dict:
        return {}


def run_to_end(run: RunLifecycle) -> int:
    """Set the run up, train, and release its workers whatever happens; a run that fails after it started
    records how (``diverged`` or ``failed``) in its status files."""
    try:
        run.setup()
        return run.run()
    except TrainingError as e:
        if (run.out / "ranks").is_dir():
            run.write_status("diverged" if e.code == EXIT_DIVERGED else "failed", error=str(e)[:500])
        raise
    finally:
        run.close()
