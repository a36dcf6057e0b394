"""Streaming, deterministic, resumable loader over WebDataset tar shards.

The epoch plan
--------------
For epoch e, the shards are put in a random order drawn from (seed, e); the sample ids of the kept samples
(see pruning) are listed in that shard order. Each rank takes a contiguous chunk of ``steps * batch`` ids and
each of its workers a contiguous sub-chunk of ``steps / num_workers`` batches, so

* every rank runs exactly the same number of steps (no hang at epoch end, whatever the shard sizes),
* no sample appears twice within an epoch, across ranks or workers,
* each worker reads few shards, sequentially, and shuffles through a seeded buffer,
* the order is a pure function of (seed, epoch, rank, worker): a run resumes mid-epoch by skipping the
  consumed batches *before* decoding (raw bytes are skipped, nothing is decoded twice).

Augmentations are seeded per sample from (seed, epoch, sample id). A sample that fails to decode is counted
and replaced by the worker's previous good sample (so batch sizes and step counts stay equal on every rank);
a missing or truncated shard is logged and its samples are treated the same way.

Decode: ``StreamSpec.decode = "cpu"`` (default) decodes and augments in the workers; ``"gpu"`` makes the
workers ship raw JPEG bytes + crop params (drawn from the header with the same per-sample seeds) and decodes
each batch in the main process with nvJPEG (see :mod:`~mae_curriculum.data.gpu_decode`).

Nothing is unpickled: only image members and ``.cls`` / ``.json`` are read; URLs and ``pipe:`` are refused
(``config.validate_data``), shards are plain local files.
"""

from __future__ import annotations

import json
import logging
import math
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from mae_curriculum.data.gpu_decode import BatchDecoder, check_decode, encode_sample, make_collate
from mae_curriculum.data.index import IMAGE_EXTS, ShardIndex
from mae_curriculum.data.transforms import AugmentConfig, SampleTransform, seed_sample

log = logging.getLogger(__name__)

ALLOWED_SUFFIXES = set(IMAGE_EXTS) | {"cls", "json"}


# --------------------------------------------------------------------------------------------------------------
# the plan: pure functions of (index, seed, epoch, keep mask, world, rank, workers, batch)
# --------------------------------------------------------------------------------------------------------------


def epoch_order(index: ShardIndex, seed: int, epoch: int, keep: np.ndarray | None = None) -> np.ndarray:
    """All kept sample ids of the split in this epoch's shard order (ids within a shard stay in file order)."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    perm = rng.permutation(len(index.lengths))
    offsets = index.offsets
    ids = np.concatenate([np.arange(offsets[k], offsets[k] + index.lengths[k], dtype=np.int64) for k in perm])
    if keep is not None:
        ids = ids[keep[ids]]
    return ids


def steps_per_epoch(num_ids: int, world: int, batch: int, num_workers: int, multiple: int = 1) -> int:
    """Steps every rank runs: a multiple of the worker count (each worker yields the same number of batches)
    and of ``multiple`` (e.g. the gradient-accumulation steps, so an epoch ends on an optimizer step)."""
    w = math.lcm(max(1, num_workers), max(1, multiple))
    return (num_ids // (world * batch)) // w * w


def worker_ids(order: np.ndarray, world: int, rank: int, batch: int, num_workers: int, worker: int,
               multiple: int = 1) -> np.ndarray:
    steps = steps_per_epoch(len(order), world, batch, num_workers, multiple)
    per_rank = steps * batch
    rank_ids = order[rank * per_rank: (rank + 1) * per_rank]
    per_worker = per_rank // max(1, num_workers)
    return rank_ids[worker * per_worker: (worker + 1) * per_worker]


def consumed_by_worker(steps_done: int, num_workers: int, worker: int) -> int:
    """Batches of ``worker`` already consumed after ``steps_done`` steps (the DataLoader is round-robin)."""
    w = max(1, num_workers)
    return (steps_done - worker + w - 1) // w if steps_done > worker else 0


# --------------------------------------------------------------------------------------------------------------
# reading raw samples
# --------------------------------------------------------------------------------------------------------------


def _select_member(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return "." in base and base.split(".", 1)[1].lower() in ALLOWED_SUFFIXES


def read_raw(index: ShardIndex, ids: np.ndarray, on_error: Callable[[str], None]) -> Iterator[tuple[int, dict]]:
    """Yield (id, {suffix: bytes}) for ``ids`` (must be in shard order, ascending within a shard); ids whose
    sample cannot be read come out with an empty dict. Only allowed suffixes are ever read into memory."""
    if len(ids) == 0:
        return
    shard_of = index.shard_of(ids)
    offsets = index.offsets
    start = 0
    while start < len(ids):
        k = int(shard_of[start])
        end = start
        while end < len(ids) and shard_of[end] == k:
            end += 1
        wanted = {int(i - offsets[k]): int(i) for i in ids[start:end]}
        last = max(wanted)  # (once: max() per sample cost ~10 us/sample with 1000-sample shards)
        got: dict[int, dict] = {}
        try:
            with open(index.path(k), "rb") as f:
                url = str(index.path(k))
                stream = ({**m, "__url__": url} for m in tar_file_iterator(f, select_files=_select_member))
                for pos, sample in enumerate(group_by_keys(stream)):
                    if pos in wanted:
                        got[pos] = {s: v for s, v in sample.items() if s in ALLOWED_SUFFIXES}
                    if pos >= last:
                        break
            if len(got) < len(wanted):  # tarfile ends a truncated archive silently
                on_error(f"shard {index.path(k)}: ended before {len(wanted) - len(got)} of the {len(wanted)} "
                         f"samples read from it (truncated, or shorter than _info.json says)")
        except (OSError, tarfile.TarError, ValueError) as e:
            on_error(f"shard {index.path(k)}: {type(e).__name__}: {e}")
        # yield in the requested order (ids ascend within a shard)
        for i in ids[start:end]:
            yield int(i), got.get(int(i - offsets[k]), {})
        start = end


def seeded_shuffle(items: Iterator, bufsize: int, rng: np.random.Generator) -> Iterator:
    """Shuffle a stream through a buffer of ``bufsize`` with a seeded RNG (deterministic for a given stream)."""
    buf: list = []
    for x in items:
        if len(buf) < bufsize:
            buf.append(x)
            continue
        j = int(rng.integers(len(buf)))
        buf[j], x = x, buf[j]
        yield x
    rng.shuffle(buf)
    yield from buf


def decode_label(sample: dict) -> int:
    raw = sample.get("cls")
    if raw is None:
        return -1
    return int(raw.decode("ascii").strip()) if isinstance(raw, bytes) else int(raw)


def image_bytes(sample: dict) -> bytes | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    return None


# --------------------------------------------------------------------------------------------------------------
# the iterable dataset (runs inside DataLoader workers)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamSpec:
    index: ShardIndex
    batch_size: int
    world: int
    rank: int
    num_workers: int
    seed: int
    shuffle_buffer: int
    augment: AugmentConfig
    steps_multiple: int = 1
    decode: str = "cpu"  # "cpu": workers decode; "gpu": workers ship JPEG bytes + crop params (gpu_decode)


class ShardStream(IterableDataset):
    """Yields single samples {image uint8 CHW, label, id, corrupt} for this worker's slice of the epoch.

    The epoch, resume position, RandAugment magnitude and keep mask live in shared-memory tensors, so
    persistent workers see what the main process sets before each ``iter(loader)``.
    """

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        n = spec.index.num_samples
        # [epoch, steps already consumed in this epoch, randaug magnitude * 1000 (or -1000 = off)]
        self.control = torch.zeros(3, dtype=torch.int64).share_memory_()
        self.control[2] = int(round(spec.augment.randaug_magnitude * 1000))
        self.keep = torch.ones(n, dtype=torch.bool).share_memory_()
        self._transform: SampleTransform | None = None
        self._magnitude_key: int | None = None

    def _get_transform(self) -> SampleTransform:
        m = int(self.control[2])
        if self._transform is None or m != self._magnitude_key:
            aug = self.spec.augment
            self._transform = SampleTransform(AugmentConfig(
                size=aug.size, scale=aug.scale, ratio=aug.ratio, hflip=aug.hflip,
                randaug_magnitude=m / 1000.0 if m >= 0 else -1.0, randaug_mstd=aug.randaug_mstd, train=aug.train))
            self._magnitude_key = m
        return self._transform

    def __iter__(self):
        s = self.spec
        info = get_worker_info()
        nw = s.num_workers if info is not None else 1
        epoch, steps_done = int(self.control[0]), int(self.control[1])
        # The DataLoader polls workers round-robin starting at worker 0 on every new iterator, so after
        # resuming at step k, DataLoader worker j plays the role of plan worker (j + k) mod nw.
        worker = ((info.id if info is not None else 0) + steps_done) % nw
        order = epoch_order(s.index, s.seed, epoch, self.keep.numpy())
        ids = worker_ids(order, s.world, s.rank, s.batch_size, nw, worker, s.steps_multiple)
        skip = consumed_by_worker(steps_done, nw, worker) * s.batch_size
        transform = self._get_transform()
        gpu = s.decode == "gpu"
        errors: list[str] = []
        rng = np.random.default_rng([s.seed, epoch, s.rank, worker, 0xB0F])
        raw = seeded_shuffle(read_raw(s.index, ids, errors.append), s.shuffle_buffer, rng)
        last_good = None
        pending = 0
        for pos, (sid, sample) in enumerate(raw):
            if pos < skip:
                continue  # already consumed before the resume: skipped undecoded
            for e in errors:
                log.warning("%s", e)
            errors.clear()
            img = None  # {"image": tensor} or, on the GPU path, possibly {"jpeg": bytes, "params": ...}
            data = image_bytes(sample)
            if data is not None:
                try:
                    seed_sample(s.seed, epoch, sid)
                    img = encode_sample(data, transform) if gpu else {"image": transform(data)}
                    label = decode_label(sample)
                except Exception as e:  # a corrupt sample must never stop training
                    log.debug("corrupt sample %d: %s", sid, e)
                    img = None
            if img is None:
                if last_good is None:
                    pending += 1
                    continue
                yield {**last_good, "corrupt": 1}
                continue
            last_good = {**img, "label": label, "id": sid, "corrupt": 0}
            while pending:
                pending -= 1
                yield {**last_good, "corrupt": 1}
            yield last_good
        if pending:
            raise RuntimeError(f"rank {s.rank} worker {worker}: none of its {pending} samples could be decoded")


# --------------------------------------------------------------------------------------------------------------
# the loader the trainer uses
# --------------------------------------------------------------------------------------------------------------


def _worker_init(_: int) -> None:
    """Workers ignore preemption signals: the main process decides, checkpoints and shuts them down.
    (``deepspeed``'s launcher and ``scancel --signal`` signal every process of the tree, workers included.)"""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ShardLoader:
    """Wraps a DataLoader over a ShardStream. Call ``start_epoch`` before iterating each epoch.

    With ``spec.decode == "gpu"`` the batches are decoded in this process on ``decode_device`` (default: the
    current CUDA device; ``"cpu"`` runs the same code on the CPU, for tests) and ``batch["image"]`` is already
    there; ``decoder`` holds the fallback / corrupt counts of that path."""

    def __init__(self, spec: StreamSpec, pin_memory: bool = False, decode_device: str | torch.device | None = None):
        self.spec = spec
        self.dataset = ShardStream(spec)
        self.decoder: BatchDecoder | None = None
        kw = {}
        if spec.num_workers > 0:
            kw = dict(persistent_workers=True, prefetch_factor=4, worker_init_fn=_worker_init)
        if check_decode(spec.decode) == "gpu":
            self.decoder = BatchDecoder(spec.augment.size, decode_device)
            kw["collate_fn"] = make_collate(spec.augment.size)
        self.loader = DataLoader(self.dataset, batch_size=spec.batch_size, num_workers=spec.num_workers,
                                 pin_memory=pin_memory, drop_last=False, **kw)
        self.epoch = 0
        self.step_in_epoch = 0

    def steps_in_epoch(self, keep: np.ndarray | None = None) -> int:
        n = int(keep.sum()) if keep is not None else self.spec.index.num_samples
        return steps_per_epoch(n, self.spec.world, self.spec.batch_size, self.spec.num_workers,
                               self.spec.steps_multiple)

    def start_epoch(self, epoch: int, step_in_epoch: int = 0, keep: np.ndarray | None = None,
                    magnitude: float | None = None) -> int:
        """Set the epoch plan; returns the number of steps this epoch will run (from ``step_in_epoch``)."""
        self.epoch, self.step_in_epoch = epoch, step_in_epoch
        self.dataset.control[0] = epoch
        self.dataset.control[1] = step_in_epoch
        if magnitude is not None:
            self.dataset.control[2] = int(round(magnitude * 1000)) if magnitude >= 0 else -1000
        if keep is not None:
            self.dataset.keep.copy_(torch.from_numpy(np.asarray(keep, dtype=bool)))
        else:
            self.dataset.keep.fill_(True)
        steps = self.steps_in_epoch(self.dataset.keep.numpy())
        if steps == 0:
            raise ValueError(
                f"an epoch of {int(self.dataset.keep.sum())} samples is too small for {self.spec.world} rank(s) x "
                f"{max(1, self.spec.num_workers)} worker(s) x batch {self.spec.batch_size}")
        return steps - step_in_epoch

    def __iter__(self):
        for batch in self.loader:
            if self.decoder is not None:
                batch = self.decoder(batch)
            self.step_in_epoch += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}


def read_eval_samples(index: ShardIndex, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` samples of a split, centre-cropped to ``size`` (uint8), for fixed visualisations."""
    t = SampleTransform(AugmentConfig(size=size, train=False))
    imgs, labels = [], []
    for _, sample in read_raw(index, np.arange(min(n * 2, index.num_samples)), lambda e: None):
        data = image_bytes(sample)
        if data is None:
            continue
        try:
            imgs.append(t(data))
            labels.append(decode_label(sample))
        except Exception:
            continue
        if len(imgs) == n:
            break
    if not imgs:
        raise ValueError(f"no readable images in {index.root}")
    return torch.stack(imgs), torch.tensor(labels)


def read_class_names(folder) -> list[str]:
    p = folder / "class_index.json"
    return json.loads(p.read_text()) if p.is_file() else []


__all__ = ["ShardLoader", "StreamSpec", "epoch_order", "steps_per_epoch", "worker_ids", "consumed_by_worker",
           "read_eval_samples"]
