"""Gradient accumulation, with EfficientTrain++'s bigger micro-batches at low resolution.

With ``curriculum.grow_micro_batch`` a stage at B < final size merges ``merge`` loader batches into one
micro-batch and runs ``grad_accum / merge`` micro-steps per optimizer step: the global batch stays the same and
a micro-batch costs about what it costs at the final size. ``merge`` changes only between optimizer steps.
"""

from __future__ import annotations


class Accumulation:
    def __init__(self, grad_accum: int, final_size: int, grow: bool):
        self.grad_accum, self.final_size, self.grow = grad_accum, final_size, grow
        self.merge = 1  # loader batches per micro-batch
        self.window = 0  # micro-steps since the last optimizer step

    def merge_for(self, size: int) -> int:
        """The largest divisor of ``grad_accum`` not above (final/size)^2 (1 without growth)."""
        if not self.grow:
            return 1
        ratio = (self.final_size / size) ** 2
        return max(d for d in range(1, self.grad_accum + 1) if self.grad_accum % d == 0 and d <= ratio + 1e-9)

    @property
    def micro_steps(self) -> int:
        return self.grad_accum // self.merge

    def boundary_next(self) -> bool:
        """The next micro-step completes an optimizer step (DeepSpeed is told explicitly: robust to skips)."""
        return self.window + 1 == self.micro_steps

    def completed(self) -> bool:
        """Count one successful micro-step; True when it completed an optimizer step."""
        self.window += 1
        if self.window < self.micro_steps:
            return False
        self.window = 0
        return True

    def reset(self) -> None:
        self.window = 0
