"""The run's checkpointer: decides when a checkpoint is due and writes / finds / reads them.

When: every ``every_steps`` optimizer steps, every ``every_minutes`` of wall time (each rank's clock, agreed
on in the step's one collective), at the end of every ``every_epochs`` epochs, on preemption, and at the end.
What: DeepSpeed's files plus our client state (counters, pruner, ...) through :mod:`engine.checkpoint`
(``complete.json`` marks a finished save), and ``run_state.json`` with what a resume must check first.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mae_curriculum.engine import checkpoint as ckpt
from mae_curriculum.engine import dist as D
from mae_curriculum.engine import hooks
from mae_curriculum.engine.errors import EXIT_USAGE, TrainingError


class Checkpointer:
    def __init__(self, cfg, ckpt_dir: Path):
        self.cfg = cfg  # a CheckpointConfig
        self.dir = ckpt_dir
        self._last = time.time()

    # ------------------------------------------------------------------ when
    def time_due(self) -> bool:
        """This rank's clock says a timed checkpoint is due (the ranks agree before acting on it)."""
        m = self.cfg.every_minutes
        return m > 0 and time.time() - self._last > 60 * m

    def due_after_step(self, step: int, time_due: bool) -> bool:
        every = self.cfg.every_steps
        return bool(every and step % every == 0) or time_due

    def due_at_epoch_end(self, epochs_done: int) -> bool:
        every = self.cfg.every_epochs
        return bool(every and epochs_done % every == 0)

    # ------------------------------------------------------------------ write
    def save(self, engine, step: int, client_state: dict, run_state: dict, epoch_end: int | None = None) -> Path:
        """On every rank. ``run_state`` (JSON) lands in ``run_state.json`` beside DeepSpeed's files."""
        try:
            path = ckpt.save(engine, self.dir, step, client_state,
                             before_marker=lambda: hooks.before_checkpoint_marker(step))
        except ckpt.CheckpointError as e:
            raise TrainingError(str(e)) from None
        if D.is_main():
            (path / "run_state.json").write_text(json.dumps(run_state, indent=1))
            if epoch_end is not None:
                ckpt.mark_epoch_end(path, epoch_end)
            ckpt.apply_retention(self.dir, self.cfg.keep_last, self.cfg.keep_every_epochs)
        D.barrier()
        self._last = time.time()
        hooks.after_checkpoint(step)
        return path

    # ------------------------------------------------------------------ read
    def newest(self) -> Path | None:
        return ckpt.find_resume(self.dir)

    def resume_path(self, arg: str) -> Path | None:
        """The checkpoint ``--resume`` names: ``auto`` (newest complete one here, if any), ``none`` (refuse to
        start over an existing run), or a checkpoint folder / a folder holding complete checkpoints."""
        existing = self.newest()
        if arg == "none":
            if existing is not None:
                raise TrainingError(f"{self.dir} already holds checkpoints: use --resume auto to continue that "
                                    f"run, or choose a new output_dir", EXIT_USAGE)
            return None
        if arg == "auto":
            return existing
        path = Path(arg)
        if not path.is_dir():
            raise TrainingError(f"--resume {arg}: no such checkpoint folder", EXIT_USAGE)
        if not (path / ckpt.MARKER).is_file():
            found = ckpt.find_resume(path) or ckpt.find_resume(path / "checkpoints")
            if found is None:
                raise TrainingError(f"--resume {arg}: no complete checkpoint there", EXIT_USAGE)
            path = found
        return path

    @staticmethod
    def run_state(path: Path) -> dict:
        f = path / "run_state.json"
        try:
            return json.loads(f.read_text()) if f.is_file() else {}
        except (OSError, ValueError) as e:
            raise TrainingError(f"checkpoint {path}: unreadable run_state.json ({e})", EXIT_USAGE) from None

    def load(self, engine, path: Path) -> dict:
        """Model, optimizer and this rank's RNG; returns our client state."""
        try:
            return ckpt.load(engine, path)
        except ckpt.CheckpointError as e:
            raise TrainingError(str(e), EXIT_USAGE) from None
