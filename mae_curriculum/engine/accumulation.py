"""Gradient accumulation, with EfficientTrain++'s bigger micro-batches at low resolution: one mechanism for both
engines (pre-training's ``curriculum.grow_micro_batch``, off by default; fine-tuning's, on by default).

With growth, a stage at B < final size merges ``merge`` loader batches into one micro-batch and runs
``grad_accum / merge`` micro-steps per optimizer step: the global batch stays the same and a micro-batch costs
about what it costs at the final size. ``merge`` changes only between optimizer steps (:meth:`Accumulation.groups`
decides it at each window's first loader batch, from the stage at that moment) and DeepSpeed is told the new
micro-batch and accumulation (:meth:`Accumulation.apply`). Without ``grad_accum`` > 1 there is nothing to grow.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


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

    def groups(self, batches: Iterable[T], size_now: Callable[[], int],
               apply: Callable[[int], None]) -> Iterator[list[T]]:
        """The loader ``batches`` in groups of ``merge``, one group per micro-batch. At the first loader batch of
        an accumulation window the merge factor is set for ``size_now()`` (the stage's B at that moment) through
        ``apply(merge)`` (the engine: :meth:`apply` with its DeepSpeed engine)."""
        pending: list[T] = []
        for batch in batches:
            if self.window == 0 and not pending:
                apply(self.merge_for(size_now()))
            pending.append(batch)
            if len(pending) == self.merge:
                yield pending
                pending = []

    def apply(self, merge: int, engine, micro_batch: int, global_batch: int) -> None:
        """Set ``merge``; tell DeepSpeed: micro-batch ``micro_batch`` x merge, accumulation / merge, the global batch
        unchanged."""
        if merge != self.merge:
            self.merge = merge
            engine.set_train_micro_batch_size(micro_batch * merge)
            engine.set_train_batch_size(global_batch)
