"""Extension points the engines call at fixed moments of a run; none are registered in the product.

Tests register fault-injection hooks here (``tests/fault_run.py``: kill -9 after a step or while saving, NaN
losses, a full disk) without any switch in the user's config. A hook is any object with some of the methods
below; the engines call every registered hook in order.
"""

from __future__ import annotations

import torch

_registered: list[object] = []


def register(hook: object) -> None:
    _registered.append(hook)


def clear() -> None:
    _registered.clear()


def on_loss(run, loss: torch.Tensor) -> torch.Tensor:
    """Called with each micro-step's loss before the ranks agree on it; returns the loss to use."""
    for h in _registered:
        if hasattr(h, "on_loss"):
            loss = h.on_loss(run, loss)
    return loss


def after_step(run) -> None:
    """Called after each optimizer step (``run.counters.step`` is the step just taken)."""
    for h in _registered:
        if hasattr(h, "after_step"):
            h.after_step(run)


def before_checkpoint_marker(step: int) -> None:
    """Called on every rank once a checkpoint's files are written, before it is marked complete."""
    for h in _registered:
        if hasattr(h, "before_checkpoint_marker"):
            h.before_checkpoint_marker(step)


def after_checkpoint(step: int) -> None:
    """Called on every rank once the checkpoint of ``step`` is complete."""
    for h in _registered:
        if hasattr(h, "after_checkpoint"):
            h.after_checkpoint(step)
