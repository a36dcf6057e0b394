"""What a run does about non-finite losses; the same policy for pre-training and fine-tuning.

* A micro-step whose loss is non-finite on any rank is skipped on every rank (no backward, no optimizer step;
  its data counts as consumed) and counted.
* ``limit`` such micro-steps in a row: roll back to the newest complete checkpoint and go on from there with
  nothing changed (same LR, same data order): a transient fault passes, a systematic one comes back.
* The same again after rolling back to that same checkpoint, or with no checkpoint to go back to: stop with
  exit status 3 (diverged) and one line saying what to try.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from mae_curriculum.engine.errors import EXIT_DIVERGED, TrainingError

log = logging.getLogger(__name__)

ADVICE = "lower optim.blr, enable optim.gradient_clipping, or check the data"


class NonFinitePolicy:
    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self.rolled_back_to: str | None = None

    def observe(self, nonfinite: bool, micro_step: int) -> Literal["ok", "skip", "rollback"]:
        if not nonfinite:
            self.in_a_row = 0
            return "ok"
        self.in_a_row += 1
        log.warning("non-finite loss at micro-step %d: step skipped (%d in a row)", micro_step, self.in_a_row)
        return "rollback" if self.in_a_row >= self.limit else "skip"

    def rollback_target(self, newest_checkpoint: Path | None) -> Path:
        """The checkpoint to roll back to; raises (exit 3) when there is none or it was tried already."""
        bad, self.in_a_row = self.in_a_row, 0
        if newest_checkpoint is None:
            raise TrainingError(f"{bad} consecutive non-finite losses and no checkpoint to roll back to: stopping "
                                f"({ADVICE})", EXIT_DIVERGED)
        if self.rolled_back_to == str(newest_checkpoint):
            raise TrainingError(f"{bad} consecutive non-finite losses again after rolling back to "
                                f"{newest_checkpoint}: stopping ({ADVICE})", EXIT_DIVERGED)
        log.error("%d consecutive non-finite losses: rolling back to %s (nothing is changed: same LR, same data)",
                  bad, newest_checkpoint)
        self.rolled_back_to = str(newest_checkpoint)
        return newest_checkpoint
