"""Distributed evaluation loader: every sample of a split is seen exactly once over all ranks.

The split's ids ``0..N-1`` are cut into ``world`` contiguous chunks of ``ceil(N / world)`` (the last ones may be
shorter or empty); every rank runs the same number of batches, ``ceil(ceil(N / world) / batch)``, all of full
size: entries past the end of a rank's chunk are padding (zero image, label -1, ``valid`` 0). A sample whose
image cannot be decoded, or whose label is missing, unparsable or outside ``[0, num_classes)``, is also returned
with ``valid`` 0 and label -1 and counted in ``unreadable``, never replaced by another sample (that would count it
twice), never scored as a miss. Equal batch counts keep collective-using models (ZeRO-3) in step.

Batches are dicts ``{image uint8 (B,3,S,S), label int64, id int64, valid bool, unreadable int64}``, made inside
the workers (the DataLoader's ``batch_size=None``); each worker reads a contiguous run of batches, so every shard
is read once, sequentially. Images are centre crops (``SampleTransform(train=False)``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mae_curriculum.data.index import ShardIndex
from mae_curriculum.data.loader import (MAX_MEMBER_BYTES, ClosableLoader, decode_label, exit_if_orphaned, image_bytes,
                                        read_raw, worker_init_fn)
from mae_curriculum.data.transforms import AugmentConfig, SampleTransform
from mae_curriculum.data.transport import inline_small, restore, shared_empty


def rank_chunk(num_samples: int, world: int, rank: int) -> np.ndarray:
    """The contiguous ids evaluated by ``rank`` (chunks of ceil(N / world); together exactly 0..N-1)."""
    per = math.ceil(num_samples / world)
    return np.arange(min(rank * per, num_samples), min((rank + 1) * per, num_samples), dtype=np.int64)


def eval_steps(num_samples: int, world: int, batch: int) -> int:
    """Batches every rank runs (the same on all ranks)."""
    return math.ceil(math.ceil(num_samples / world) / batch)


class EvalStream(IterableDataset):
    def __init__(self, index: ShardIndex, batch: int, world: int, rank: int, size: int, num_classes: int = 0,
                 max_pixels: int = 0, max_member_bytes: int = MAX_MEMBER_BYTES):
        self.index, self.batch, self.world, self.rank, self.size = index, batch, world, rank, size
        self.num_classes, self.max_pixels, self.max_member_bytes = num_classes, max_pixels, max_member_bytes

    def __iter__(self):
        info = get_worker_info()
        nw, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        ids = rank_chunk(self.index.num_samples, self.world, self.rank)
        steps = eval_steps(self.index.num_samples, self.world, self.batch)
        # worker w makes a contiguous run of batches, so each shard is read once, sequentially
        first, last = steps * worker // nw, steps * (worker + 1) // nw
        transform = SampleTransform(AugmentConfig(size=self.size, train=False), self.max_pixels)
        raw = read_raw(self.index, ids[first * self.batch: last * self.batch], lambda e: None, self.max_member_bytes)
        for _ in range(first, last):
            images = shared_empty((self.batch, 3, self.size, self.size)).zero_()
            labels = torch.full((self.batch,), -1, dtype=torch.int64)
            sids = torch.full((self.batch,), -1, dtype=torch.int64)
            valid = torch.zeros(self.batch, dtype=torch.bool)
            unreadable = 0
            for j in range(self.batch):
                item = next(raw, None)
                if item is None:
                    break  # padding: past the end of this rank's chunk
                sids[j], sample = item
                exit_if_orphaned()
                data = image_bytes(sample)
                try:
                    if data is None:
                        raise ValueError("no image")
                    label = decode_label(sample, self.num_classes)
                    images[j] = transform(data)
                    labels[j] = label
                    valid[j] = True
                except Exception:
                    unreadable += 1
            # (the per-row fields travel inline, not one shared-memory file per tensor: data/transport.py)
            yield inline_small({"image": images, "label": labels, "id": sids, "valid": valid,
                                "unreadable": torch.tensor(unreadable)})


class EvalLoader(ClosableLoader):
    """Iterate over this rank's share of a split (see the module docstring); re-iterable. ``num_classes``: labels
    must lie in ``[0, num_classes)`` (None: the index's ``num_classes``; 0: any label >= 0); ``max_pixels`` and
    ``max_member_bytes`` as in :class:`~mae_curriculum.data.loader.StreamSpec`. ``close()`` ends the workers
    (also done on an error while iterating, at garbage collection and at exit)."""

    def __init__(self, index: ShardIndex, batch: int, world: int, rank: int, size: int, num_workers: int = 0, *,
                 num_classes: int | None = None, max_pixels: int = 0, max_member_bytes: int = MAX_MEMBER_BYTES):
        self.index = index
        self.steps = eval_steps(index.num_samples, world, batch)
        workers = max(0, min(num_workers, self.steps))
        kw = dict(persistent_workers=True, worker_init_fn=worker_init_fn()) if workers > 0 else {}
        classes = index.num_classes if num_classes is None else num_classes
        stream = EvalStream(index, batch, world, rank, size, classes, max_pixels, max_member_bytes)
        self.loader = DataLoader(stream, batch_size=None, num_workers=workers, **kw)
        self._track()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        try:
            for batch in self.loader:
                yield restore(batch)
        except Exception:  # e.g. re-raised from a worker: no worker outlives it
            self.close()
            raise


__all__ = ["EvalLoader", "EvalStream", "rank_chunk", "eval_steps"]
