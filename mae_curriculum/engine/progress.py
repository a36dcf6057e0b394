"""Training progress: the fraction of the budget spent, which drives the LR and the curriculum stage.

A budget is ``epochs`` epochs at the final size, counted in images (``accounting: epochs``) or in training
FLOPs (``accounting: compute``, EfficientTrain++: an image at a low resolution B costs less, so low-resolution
stages see more images for the same compute). A pruned epoch still counts as one epoch of progress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from mae_curriculum.curriculum.schedule import Schedule
from mae_curriculum.engine.state import Counters


@dataclass
class Budget:
    schedule: Schedule
    final_size: int
    cost: Callable[[int], float]  # training cost of one image at a size (FLOPs, or any unit proportional to them)
    epochs: float
    epoch_images: int  # images in one unpruned epoch, all ranks
    # training FLOPs of one image at a size, for the ``flops`` counters; None: ``cost`` (pre-training, whose cost
    # is its FLOP count). Fine-tuning's cost is a progress unit (1 per image, or B^2), not FLOPs.
    flops: Callable[[int], float] | None = None

    @property
    def total_units(self) -> float:
        return self.epochs * self.epoch_images * self._unit(self.final_size)

    def _unit(self, size: int) -> float:
        return self.cost(size) if self.schedule.accounting == "compute" else 1.0

    def consume(self, c: Counters, size: int, images: int, epoch_scale: float = 1.0) -> None:
        """Account for ``images`` (all ranks) consumed at ``size``; ``epoch_scale`` = unpruned / pruned epoch
        length, so that a pruned epoch spends one epoch of progress."""
        c.samples += images
        c.progress += self.progress_of(size, images, epoch_scale)
        flops = self.flops or self.cost
        c.flops += flops(size) * images
        c.full_flops += flops(self.final_size) * images * epoch_scale

    def progress_of(self, size: int, images: int, epoch_scale: float = 1.0) -> float:
        """The progress ``images`` (all ranks) at ``size`` add (what :meth:`consume` adds, to the last bit)."""
        return self._unit(size) * images / self.total_units * epoch_scale

    def epoch_progress(self, size: int) -> float:
        """The progress one full epoch adds at ``size`` (a pruned epoch counts as a full one)."""
        return self._unit(size) * self.epoch_images / self.total_units

    def done(self, c: Counters, max_steps: int = 0) -> bool:
        return c.progress >= 1.0 - 1e-12 or bool(max_steps and c.step >= max_steps)

    def estimate_steps(self, global_batch: int, max_steps: int = 0) -> int:
        """Optimizer steps for the whole budget (for the progress bar), walking the stages."""
        images = sum((st.end - st.start) * self.total_units / self._unit(st.size) for st in self.schedule.stages)
        steps = int(math.ceil(images / global_batch))
        return min(steps, max_steps) if max_steps else steps


def step_sizes(budget: Budget, progress: float, steps: int, start: int, loader_images: int, epoch_scale: float,
               grad_accum: int, merge_for: Callable[[int], int] = lambda size: 1, exact: bool = False) -> list[int]:
    """The curriculum size B of every loader step of an epoch, known at its start: progress advances by
    ``budget.progress_of(B, images)`` per micro-step whatever happens to the step, so the stage of each step is a
    pure function of the progress at ``start`` (the step in epoch to resume from, at an accumulation boundary).

    ``steps``: loader steps in the epoch; ``loader_images``: images of one loader batch, all ranks; a window of
    ``grad_accum`` loader steps is one optimizer step, its micro-steps merge ``merge_for(B)`` loader batches
    (B at the window's start; 1 without ``grow_micro_batch``), as :class:`~mae_curriculum.engine.accumulation.
    Accumulation` does. Every loader step of a window gets the window's largest B, so the loader's size never
    changes inside an accumulation window (merged batches share a size). Entries before ``start`` are 0; steps
    after the budget is spent keep the last stage's size.

    ``exact``: every loader step gets the B of the micro-step it belongs to instead (merged batches share one;
    the size may change inside a window): for ``curriculum.lowpass: lanczos``, whose batches arrive at B."""
    out = [0] * steps
    p = progress
    k = start
    while k < steps:
        merge = merge_for(budget.schedule.stage_at(p).size)
        window: list[int] = []
        for _ in range(max(1, grad_accum // merge)):
            b = budget.schedule.stage_at(p).size
            window += [b] * merge
            if p < 1.0 - 1e-12:
                p += budget.progress_of(b, loader_images * merge, epoch_scale)
        for j in range(k, min(steps, k + grad_accum)):
            out[j] = window[min(j - k, len(window) - 1)] if exact else max(window)
        k += grad_accum
    return out


def step_stages(budget: Budget, progress: float, steps: int, start: int, loader_images: int, epoch_scale: float,
                grad_accum: int, merge_for: Callable[[int], int] = lambda size: 1) -> list[int]:
    """The curriculum stage index of every loader step of an epoch, known at its start (the walk of
    :func:`step_sizes`): each loader step gets the stage its micro-step runs in (merged loader batches share one),
    so a stage that begins mid-epoch begins at the exact loader step where the engine will see it. Entries before
    ``start`` are -1; steps after the budget is spent keep the last stage. For the RandAugment magnitude, which the
    loader's workers apply per step."""
    out = [-1] * steps
    p = progress
    k = start
    while k < steps:
        merge = merge_for(budget.schedule.stage_at(p).size)
        for _ in range(max(1, grad_accum // merge)):
            stage = budget.schedule.stage_at(p)
            for j in range(k, min(steps, k + merge)):
                out[j] = stage.index
            k += merge
            if p < 1.0 - 1e-12:
                p += budget.progress_of(stage.size, loader_images * merge, epoch_scale)
    return out


def step_replays(budget: Budget, replay: list[int], progress: float, steps: int, start: int, loader_images: int,
                 epoch_scale: float, grad_accum: int, merge_for: Callable[[int], int] = lambda size: 1
                 ) -> list[int] | None:
    """The replay factor (``curriculum.replay``, one per stage) of every loader step of an epoch, from the stage
    each step runs in (:func:`step_stages`); 0 before ``start``. None when no stage replays."""
    if not replay or max(replay) <= 1:
        return None
    idx = step_stages(budget, progress, steps, start, loader_images, epoch_scale, grad_accum, merge_for)
    return [replay[i] if i >= 0 else 0 for i in idx]
