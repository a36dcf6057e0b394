"""How a batch travels from a loader worker to the main process.

A tensor that a DataLoader worker sends is moved to shared memory and, under torch's default ``file_descriptor``
sharing strategy, its file descriptor is fetched by the main process over a socket from a server thread of the
worker (``multiprocessing.resource_sharer``): one connection per tensor per batch, and a thread that takes the
worker's GIL each time. For the per-row fields of a batch (labels, ids, crop boxes: a few hundred bytes) that costs
far more than the data: with the device-crop path at replay 8 (32 rows, 8 tensors a batch), handing the small
fields over as numpy arrays (pickled inline, through the worker's result pipe) raised the images per second per
worker at B = 96 from 2,386 / 2,306 to 3,301 / 3,162 with 2 workers (``benchmarks/data_capacity.py``, two runs;
docs/benchmarks.md, issue 14).

* worker side: :func:`shared_empty` allocates a batch's pixel tensor in shared memory from the start (as
  ``default_collate`` does: nothing is copied when it is sent); :func:`inline_small` turns every small tensor of a
  batch into a numpy array (an :class:`InlineBatch`).
* main process: with ``pin_memory=True`` the DataLoader's pin-memory thread calls :meth:`InlineBatch.pin_memory`,
  which turns every field back into a tensor and pins it (a non-blocking copy from pageable memory would wait for
  the device's stream); :func:`restore` turns what is left into tensors (``torch.from_numpy``, no copy).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import get_worker_info

INLINE_BYTES = 64 << 10  # tensors up to this size travel inline (pickled); larger ones through shared memory


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An uninitialised tensor of ``shape``; in a loader worker, in shared memory from the start."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape)


class InlineBatch(dict):
    """A batch as it leaves a worker, its small fields numpy arrays. torch's ``pin_memory`` calls an object's own
    ``pin_memory()`` before treating it as a mapping: here every field comes back as a pinned tensor."""

    def pin_memory(self, *_) -> dict:
        return {k: _as_tensor(v).pin_memory() if isinstance(v, (np.ndarray, torch.Tensor)) else v
                for k, v in self.items()}


def _as_tensor(v):
    return torch.from_numpy(v) if isinstance(v, np.ndarray) else v


def inline_small(batch: dict) -> InlineBatch:
    """Worker side: the CPU tensors of ``batch`` of at most :data:`INLINE_BYTES` as numpy arrays (other values
    unchanged)."""
    return InlineBatch({k: v.numpy() if isinstance(v, torch.Tensor) and v.device.type == "cpu" and not v.requires_grad
                        and v.nbytes <= INLINE_BYTES else v for k, v in batch.items()})


class InlineSmall:
    """A DataLoader ``collate_fn``: ``collate`` (a picklable callable), then :func:`inline_small`."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, rows: list) -> dict:
        return inline_small(self.collate(rows))


def collate_rows(rows: list[dict]) -> dict:
    """DataLoader ``collate_fn`` of rows ``{name: tensor or int}`` (every row the same keys, the tensors of a key the
    same shape): the tensors of a key stacked into one (in shared memory in a worker, as ``default_collate``
    stacks them), the ints into an int64 tensor."""
    out = {}
    for k, v in rows[0].items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.stack([r[k] for r in rows], out=shared_empty((len(rows), *v.shape), v.dtype))
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            out[k] = torch.tensor([int(r[k]) for r in rows], dtype=torch.int64)
        else:
            raise TypeError(f"collate_rows: field {k!r} is a {type(v).__name__}, not a tensor or an int")
    return out


def restore(batch: dict) -> dict:
    """Main-process side of :func:`inline_small`: numpy arrays back to tensors (sharing their memory)."""
    return {k: _as_tensor(v) for k, v in batch.items()}


__all__ = ["INLINE_BYTES", "InlineBatch", "InlineSmall", "collate_rows", "inline_small", "restore", "shared_empty"]
