"""One run lifecycle for pre-training and fine-tuning: output folder, seeding, resume, checkpoints, the stop
signal, the per-step agreement between ranks, status files and exit statuses.

A lost rank or node (a collective that fails or outlasts ``train.dist_timeout_s``) ends the surviving ranks with
status 75, as a pre-emption does, but without a checkpoint (the peers needed to write one are gone): the relaunch
resumes from the newest complete checkpoint (:func:`run_to_end`).

An engine subclasses :class:`RunLifecycle` and supplies what is its own: ``client_state()`` / ``run_state()``
(what a checkpoint holds besides DeepSpeed's files) and ``restore(path)`` (load a checkpoint into the run).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
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
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PEER_LOST,
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
        self.started_at = time.time()

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
        groups = D.apply_timeout(self.cfg.train.dist_timeout_s)  # the engine's groups exist by now
        log.debug("collective timeout %.0f s on %d process groups", self.cfg.train.dist_timeout_s, groups)
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
               **self.placement(), **self.status_extra(), **extra}
        (self.out / "ranks").mkdir(exist_ok=True)
        (self.out / "ranks" / f"rank{self.rank}.json").write_text(json.dumps(rec))
        if D.is_main():
            tmp = self.out / "status.json.tmp"
            tmp.write_text(json.dumps(rec))
            os.replace(tmp, self.out / "status.json")

    def placement(self) -> dict:
        """Where this rank runs: local rank, node rank (the launcher's), host, and the ranks as DeepSpeed's engine
        sees them."""
        env = os.environ
        node = env.get("CROSS_RANK") or env.get("SLURM_NODEID") or env.get("GROUP_RANK")  # deepspeed / srun / torchrun
        rec = {"local_rank": int(env.get("LOCAL_RANK", "0")), "node_rank": int(node) if node else None,
               "host": socket.gethostname(), "pid": os.getpid()}
        e = self.engine
        if e is not None and hasattr(e, "global_rank"):
            rec["deepspeed"] = {"global_rank": e.global_rank, "local_rank": getattr(e, "local_rank", None),
                                "world_size": e.world_size, "dp_world_size": getattr(e, "dp_world_size", None)}
        return rec

    def failed_peer(self, tries: int = 3, wait_s: float = 0.5) -> tuple[int, str] | None:
        """(rank, error) of another rank that recorded ``failed`` or ``diverged`` since this process started: a
        rank that stops on an error records it before its connections close (read a few times, for a shared
        file system's caching)."""
        for attempt in range(tries):
            for f in sorted((self.out / "ranks").glob("rank*.json")):
                try:
                    if f.stat().st_mtime < self.started_at - 5:
                        continue  # from an earlier start
                    rec = json.loads(f.read_text())
                except (OSError, ValueError):
                    continue
                if rec.get("rank") != self.rank and rec.get("status") in ("failed", "diverged"):
                    return int(rec.get("rank", -1)), str(rec.get("error", ""))
            if attempt + 1 < tries:
                time.sleep(wait_s)
        return None

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
    records how (``diverged``, ``failed`` or ``peer_lost``) in its status files.

    A collective that fails or times out (another rank or node is gone) ends this rank with status 75 (requeue)
    and one line; nothing more is sent to the peers (:func:`dist.mark_broken`), and the relaunch resumes from the
    newest complete checkpoint."""
    try:
        run.setup()
        return run.run()
    except TrainingError as e:
        if (run.out / "ranks").is_dir():
            run.write_status("diverged" if e.code == EXIT_DIVERGED else "failed", error=str(e)[:500])
        raise
    except Exception as e:
        started = (run.out / "ranks").is_dir()
        if run.world == 1 or not D.is_comm_failure(e):
            if started:  # a bug: recorded, so that the peers that lose contact with this rank do not requeue
                run.write_status("failed", error=f"{type(e).__name__}: {e}"[:500])
            raise
        D.mark_broken()
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        failed = run.failed_peer() if started else None
        if failed is not None:  # the peer stopped on an error of its own: requeueing would only repeat it
            msg = f"rank {failed[0]} failed ({failed[1][:300]}); this rank stops too"
            run.write_status("failed", error=msg[:500])
            raise TrainingError(msg, EXIT_FAILED) from None
        msg = (f"lost contact with another rank at step {run.counters.step} ({cause}): exiting {EXIT_PEER_LOST} to "
               f"be requeued; the relaunch resumes from the newest complete checkpoint")
        if started:
            run.write_status("peer_lost", error=msg[:500])
        raise TrainingError(msg, EXIT_PEER_LOST) from None
    finally:
        run.close()
