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

Stage-sized decode: :meth:`ShardLoader.start_epoch` may take ``sizes``, the output size S of every step of the
epoch (a pure function of progress, computed by the engine: :func:`~mae_curriculum.engine.progress.step_sizes`).
The plan sits in a shared-memory tensor the workers read; a sample's step is known from its position (plan
worker w's b-th batch is step ``b * num_workers + w``), so each sample is cropped straight to its step's S (the
same crop box and flip as at the final size: the box is drawn from the header only), with JPEG DCT scaling
(PIL ``draft``) whenever the crop still covers S pixels at 1/2, 1/4 or 1/8 scale. The trainer's Fourier crop
then takes S -> B. :func:`stage_crop_size` is the rule for S; 0 in the plan means the final size. With
``decode="gpu"`` the main process crops each batch to its step's S on the device (full-size nvJPEG decode).
With ``out_sizes`` as well (``curriculum.lowpass: lanczos``, EfficientTrain++'s released code), each sample is
cropped to its S (or the final size), flipped and RandAugmented, then PIL-Lanczos-resized in the worker to its
step's B: the batch arrives at B and the device does no Fourier crop (CPU decode only).

Replay (``curriculum.replay``): :meth:`ShardLoader.start_epoch` may take ``replays``, a factor r per step (from the
step's stage, like the sizes). At r > 1, rows 0, r, 2r, ... of each batch decode their sample once into r crops
(:meth:`~mae_curriculum.data.transforms.SampleTransform.views`: r boxes, flips and RandAugments drawn in turn from
the sample's seed; one decode, DCT-scaled for the smallest box) and the r - 1 rows after each take the other crops;
the samples the plan put in those rows are dropped undecoded. Positions and seeds are those of the plan, so replay
stays deterministic and a mid-epoch resume (at a step boundary) is exact. Each row's ``fresh`` flag is 1 when it
was decoded from its own sample, so the trainer counts images decoded beside images seen.

Device crops (``StreamSpec.crop = "device"``, config ``data.crop: device``): the workers decode as above but ship,
instead of the r crops of a group, one canvas (the union of its r boxes at the decoded resolution) and the boxes; the
main process crops every row of the batch on ``decode_device`` with one ``roi_align``
(:mod:`~mae_curriculum.data.device_crop`). Same rows, boxes, flips and plans as the worker path.

Decode: ``StreamSpec.decode = "cpu"`` (default) decodes and augments in the workers; ``"gpu"`` makes the
workers ship raw JPEG bytes + crop params (drawn from the header with the same per-sample seeds) and decodes
each batch in the main process with nvJPEG (see :mod:`~mae_curriculum.data.gpu_decode`).

Nothing is unpickled: only image members and ``.cls`` are read; ``pipe:`` is refused (``config.validate_data``).
Shards are plain tars, local or remote (``s3://``, ``gs://``, ``http(s)://``): a remote shard is one sequential
stream with retries, optionally through a local cache (:mod:`~mae_curriculum.data.remote`); one that stays
unreachable is logged and its samples replaced, like a missing local one.

Hostile shards (see :mod:`~mae_curriculum.data.tarsafe`): shards are read in tarfile's seekable mode, a member
that claims bytes past the end of its file ends that shard (the samples before it are kept), a member over
``StreamSpec.max_member_bytes`` is not read (its sample counts as corrupt), compressed shards are refused, an
image whose header declares more than ``max_pixels`` pixels is not decoded, the shuffle buffer holds at most
``SHUFFLE_MAX_BYTES``. Labels: with ``require_labels`` (fine-tuning) a sample whose ``.cls`` is missing,
unparsable or outside ``[0, num_classes)`` counts as corrupt; without it (pre-training) such a label becomes -1
and never costs the image.

Workers: they ignore SIGTERM / SIGUSR1 / SIGINT (the main process decides), die with their parent (Linux
``PR_SET_PDEATHSIG``, plus a parent check per sample elsewhere), and :meth:`ShardLoader.close` (also called on
an error while iterating, at garbage collection and at interpreter exit) ends them with SIGKILL.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import logging
import math
import multiprocessing.util  # noqa: F401 - its exit hook must be registered before ours (atexit is LIFO)
import os
import re
import signal
import sys
import tarfile
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils import signal_handling as _torch_signal_handling

from mae_curriculum.data.device_crop import DeviceCropper, check_crop, collate_regions
from mae_curriculum.data.gpu_decode import BatchDecoder, check_decode, encode_sample, make_collate
from mae_curriculum.data.index import IMAGE_EXTS, ShardIndex, shard_samples, split_name
from mae_curriculum.data.remote import open_shard
from mae_curriculum.data.transforms import AugmentConfig, SampleTransform, auto_max_pixels, seed_sample
from mae_curriculum.data.transport import InlineSmall, collate_rows, restore

log = logging.getLogger(__name__)

READ_SUFFIXES = frozenset(IMAGE_EXTS) | {"cls"}  # the only members ever read into memory
MAX_MEMBER_BYTES = 32 << 20  # default bound on one member's bytes (real images: well under 10 MB)
SHUFFLE_MAX_BYTES = 256 << 20  # raw bytes the shuffle buffer of one worker may hold
MAGNITUDE_UNSET = -(2**62)  # a step without its own RandAugment magnitude: the epoch's (ShardLoader.start_epoch)
# S >= STAGE_SIZE_RATIO * B: the smallest ratio whose B x B input stays >= 40 dB PSNR from the exact path (final-size
# crop -> Fourier crop to B) on real ImageNet-style JPEGs (imagewoof, short side 320, B = 96, final 224: S = 144
# 33.5 dB, 160 37.7 dB, 176 41.0 dB, 192 45.1 dB mean; worst image 25.2 / 32.7 / 36.0 / 40.2 dB).
STAGE_SIZE_RATIO = 2.0


def stage_crop_size(size: int, final_size: int, patch_size: int, ratio: float = STAGE_SIZE_RATIO) -> int:
    """The size S the workers crop to at curriculum size B = ``size``: the smallest multiple of the patch
    >= ``ratio`` * B, at most the final size (B itself if B >= the final size)."""
    if size >= final_size:
        return final_size
    return min(final_size, max(size, math.ceil(ratio * size / patch_size) * patch_size))


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


def read_raw(index: ShardIndex, ids: np.ndarray, on_error: Callable[[str], None],
             max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[tuple[int, dict]]:
    """Yield (id, {suffix: bytes}) for ``ids`` (must be in shard order, ascending within a shard); ids whose
    sample cannot be read come out with an empty dict. Only image members and ``.cls`` are ever read, each at
    most ``max_member_bytes``; the samples of a shard not asked for are skipped unread (headers only)."""
    if len(ids) == 0:
        return
    cuts = np.flatnonzero(np.diff(index.shard_of(ids))) + 1  # where the shard changes
    for chunk in np.split(ids, cuts):
        yield from _read_shard(index, int(index.shard_of(chunk[:1])[0]), chunk, on_error, max_member_bytes)


def _read_shard(index: ShardIndex, k: int, ids: np.ndarray, on_error: Callable[[str], None],
                max_member_bytes: int) -> Iterator[tuple[int, dict]]:
    """:func:`read_raw` for ``ids`` (ascending) of shard ``k``."""
    path = index.path(k)

    def report(message: str) -> None:
        on_error(f"shard {path}: {message}")

    wanted = (ids - index.offsets[k]).tolist()
    done = 0
    try:
        f, size = open_shard(path, index.cache_dir)  # local, cached, or one sequential remote stream
        with f:
            for pos, group in enumerate(shard_samples(f, size)):
                exit_if_orphaned()
                if pos > wanted[-1]:
                    if pos >= index.lengths[k]:
                        report(f"holds more samples than the {index.lengths[k]} _info.json declares; the extra "
                               f"ones are never used")
                    break
                if pos == wanted[done]:
                    yield int(ids[done]), _read_members(f, group, max_member_bytes, report)
                    done += 1
    except (OSError, tarfile.TarError) as e:
        report(f"{type(e).__name__}: {e}")
    if done < len(ids):
        report(f"ended before {len(ids) - done} of the {len(ids)} samples read from it (truncated, or shorter "
               f"than _info.json says)")
    for i in ids[done:]:
        yield int(i), {}


def _read_members(f, group: list[tarfile.TarInfo], limit: int, on_error: Callable[[str], None]) -> dict:
    """{suffix: bytes} of the members of one sample the loader uses (the first of each suffix); a member over
    ``limit`` bytes is left out unread (the sample then counts as corrupt if it was the image)."""
    out: dict[str, bytes] = {}
    for m in group:
        suffix = split_name(m.name)[1]
        if suffix not in READ_SUFFIXES or suffix in out:
            continue
        if m.size > limit:
            on_error(f"member {m.name} has {m.size} bytes, over the {limit}-byte limit: not read")
            continue
        f.seek(m.offset_data)
        data = f.read(m.size)
        if len(data) == m.size:
            out[suffix] = data
    return out


def _raw_bytes(item: tuple[int, dict]) -> int:
    return sum(len(v) for v in item[1].values())


def seeded_shuffle(items: Iterator, bufsize: int, rng: np.random.Generator, max_bytes: int | None = None,
                   nbytes: Callable[[object], int] = _raw_bytes) -> Iterator:
    """Shuffle a stream through a buffer of ``bufsize`` items with a seeded RNG (deterministic for a given stream).
    ``bufsize <= 0``: no shuffling. With ``max_bytes``, items leave early while the buffer holds more than that
    (``nbytes`` per item); below it the order is the plain buffer's."""
    if bufsize <= 0:
        yield from items
        return
    buf: list = []
    held = 0
    for x in items:
        if len(buf) < bufsize:
            buf.append(x)
            held += nbytes(x) if max_bytes is not None else 0
        else:
            j = int(rng.integers(len(buf)))
            buf[j], x = x, buf[j]
            held += nbytes(buf[j]) - nbytes(x) if max_bytes is not None else 0
            yield x
        while max_bytes is not None and held > max_bytes and len(buf) > 1:
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            held -= nbytes(buf[-1])
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


_LABEL_RE = re.compile(r"-?[0-9]{1,18}")


def decode_label(sample: dict, num_classes: int = 0) -> int:
    """The sample's ``.cls`` as an int in ``[0, num_classes)`` (any int >= 0 when ``num_classes`` is 0).
    Raises ValueError when it is missing, not a decimal integer, or out of range."""
    raw = sample.get("cls")
    if raw is None:
        raise ValueError("no .cls label")
    text = raw.decode("ascii").strip() if isinstance(raw, bytes) else str(raw)
    if not _LABEL_RE.fullmatch(text):
        raise ValueError(f"label {text[:20]!r} is not an integer")
    label = int(text)
    if label < 0 or (num_classes > 0 and label >= num_classes):
        raise ValueError(f"label {label} outside [0, {num_classes or 'inf'})")
    return label


def optional_label(sample: dict, num_classes: int = 0) -> int:
    """:func:`decode_label`, or -1 where it raises (pre-training: labels are never needed)."""
    try:
        return decode_label(sample, num_classes)
    except ValueError:
        return -1


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
    shuffle_buffer: int  # samples; <= 0: no shuffle buffer (shards still come in a seeded order)
    augment: AugmentConfig
    steps_multiple: int = 1
    decode: str = "cpu"  # "cpu": workers decode; "gpu": workers ship JPEG bytes + crop params (gpu_decode)
    num_classes: int = 0  # labels must lie in [0, num_classes); 0: any label >= 0
    require_labels: bool = False  # True (fine-tuning): a bad / missing label makes the sample corrupt; else -1
    max_pixels: int = 0  # decompression-bomb bound (w*h from the header); 0: auto from augment.size
    max_member_bytes: int = MAX_MEMBER_BYTES  # a larger tar member is not read (its sample counts as corrupt)
    # "workers": the workers crop and resize (uint8 S x S rows); "device": they ship each decoded image's canvas
    # (the union of its crop boxes) and the main process crops on the device (device_crop); CPU decode only
    crop: str = "workers"


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
        # output size of every step of the epoch (0 = the final size, augment.size): the stage-sized decode plan
        max_steps = steps_per_epoch(n, spec.world, spec.batch_size, spec.num_workers, spec.steps_multiple)
        self.sizes = torch.zeros(max(1, max_steps), dtype=torch.int32).share_memory_()
        # the Lanczos output size of every step (0 = none: the batch comes out at its crop size)
        self.out_sizes = torch.zeros(max(1, max_steps), dtype=torch.int32).share_memory_()
        # RandAugment magnitude x 1000 of every step (-1000 = off; MAGNITUDE_UNSET = control[2], the epoch's):
        # a curriculum stage that starts mid-epoch changes the magnitude at its first step
        self.magnitudes = torch.full((max(1, max_steps),), MAGNITUDE_UNSET, dtype=torch.int64).share_memory_()
        # replay factor r of every step (0 or 1 = none): each group of r consecutive rows of the step's batch holds
        # r crops of one decoded image (curriculum.replay)
        self.replays = torch.zeros(max(1, max_steps), dtype=torch.int32).share_memory_()
        self._transforms: dict[int, SampleTransform] = {}
        self._magnitude_key: int | None = None

    def _get_transform(self, size: int = 0, magnitude: int | None = None, out: int = 0) -> SampleTransform:
        """The transform at crop ``size`` (0: the final size), RandAugment ``magnitude`` (x 1000; default: the
        current one) and Lanczos output size ``out`` (0: none). The decompression-bomb bound stays the final
        size's whatever the output size."""
        m = int(self.control[2]) if magnitude is None else magnitude
        if m != self._magnitude_key:
            self._transforms.clear()
            self._magnitude_key = m
        aug = self.spec.augment
        size = size or aug.size
        key = (size, out if 0 < out < size else 0)
        if key not in self._transforms:
            self._transforms[key] = SampleTransform(AugmentConfig(
                size=size, scale=aug.scale, ratio=aug.ratio, hflip=aug.hflip,
                randaug_magnitude=m / 1000.0 if m >= 0 else -1.0, randaug_mstd=aug.randaug_mstd, train=aug.train,
                lowpass_size=key[1]), max_pixels=self.spec.max_pixels or auto_max_pixels(aug.size))
        return self._transforms[key]

    def _label(self, sample: dict) -> int:
        s = self.spec
        return decode_label(sample, s.num_classes) if s.require_labels else optional_label(sample, s.num_classes)

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
        gpu = s.decode == "gpu"
        device_crop = s.crop == "device"
        plan = self.sizes.numpy().copy()  # GPU path: only CPU-decoded samples use it here, the crop boxes do not
        out_plan = self.out_sizes.numpy().copy()
        magnitude = int(self.control[2])  # read once per epoch iterator, as the plan is
        mag_plan = self.magnitudes.numpy().copy()
        rep_plan = self.replays.numpy().copy()
        transform = self._get_transform(0, magnitude)
        errors: list[str] = []
        rng = np.random.default_rng([s.seed, epoch, s.rank, worker, 0xB0F])
        raw = seeded_shuffle(read_raw(s.index, ids, errors.append, s.max_member_bytes), s.shuffle_buffer, rng,
                             SHUFFLE_MAX_BYTES)
        last_good = None
        last_src: tuple[bytes, int] | None = None  # the last good sample's bytes and id (to redo it at another S)
        pending: list[SampleTransform] = []  # the transforms of corrupt samples seen before the first good one
        replicas: list[dict] = []  # replay: the other crops of the current group's decoded image, in row order

        def at_transform(good: dict, t: SampleTransform) -> dict:
            """``good`` (a stand-in for a corrupt sample) at the output size of ``t`` (its step's S)."""
            if "image" not in good or good["image"].shape[-1] == t.out_size or last_src is None:
                return good  # (a JPEG for the GPU path is cropped to its batch's size when decoded)
            seed_sample(s.seed, epoch, last_src[1])
            return {**good, "image": t(last_src[0])}

        for pos, (sid, sample) in enumerate(raw):
            if pos < skip:
                continue  # already consumed before the resume: skipped undecoded
            step = (pos // s.batch_size) * nw + worker
            for e in errors:
                log.warning("%s", e)
            errors.clear()
            # replay r: rows 0, r, 2r, ... of the batch (the group anchors) are decoded once into r crops; the rows
            # between take the anchor's other crops and their own samples are dropped undecoded
            r = max(1, int(rep_plan[step])) if step < len(rep_plan) else 1
            replica = r > 1 and (pos % s.batch_size) % r != 0
            if replica and replicas:
                yield replicas.pop(0)
                continue
            m_step = int(mag_plan[step]) if step < len(mag_plan) and mag_plan[step] != MAGNITUDE_UNSET else magnitude
            transform = (self._get_transform(int(plan[step]), m_step, int(out_plan[step])) if step < len(plan)
                         else self._get_transform(0, m_step))
            img = None  # {"image": tensor} or, on the GPU path, possibly {"jpeg": bytes, "params": ...}
            data = None if replica else image_bytes(sample)  # a replica without its anchor's crops: a stand-in
            if data is not None:
                try:
                    label = self._label(sample)
                    seed_sample(s.seed, epoch, sid)
                    if gpu:
                        img = encode_sample(data, transform)
                    elif device_crop:  # one canvas for the r rows of the group; the first row carries it
                        canvas, boxes, flips = transform.regions(data, r)
                        img = {"canvas": canvas, "box": boxes[0], "flip": flips[0]}
                        replicas = [{"canvas": None, "box": b, "flip": f, "label": label, "id": sid, "corrupt": 0,
                                     "fresh": 0} for b, f in zip(boxes[1:], flips[1:])]
                    elif r > 1:
                        views = transform.views(data, r)
                        img = {"image": views[0]}
                        replicas = [{"image": v, "label": label, "id": sid, "corrupt": 0, "fresh": 0}
                                    for v in views[1:]]
                    else:
                        img = {"image": transform(data)}
                except Exception as e:  # a corrupt sample must never stop training
                    log.debug("corrupt sample %d: %s", sid, e)
                    img = None
            if img is None:
                replicas = []
                if last_good is None:
                    pending.append(transform)
                    continue
                last_good = at_transform(last_good, transform)
                yield {**last_good, "corrupt": 1, "fresh": 0}
                continue
            last_good = {**img, "label": label, "id": sid, "corrupt": 0, "fresh": 1}
            last_src = (data, sid)
            for t in pending:
                yield {**at_transform(last_good, t), "corrupt": 1, "fresh": 0}
            pending.clear()
            last_good = at_transform(last_good, transform)
            yield last_good
        if pending:
            raise RuntimeError(f"rank {s.rank} worker {worker}: none of its {len(pending)} samples could be decoded")


# --------------------------------------------------------------------------------------------------------------
# worker processes: signals, dying with the parent, ending them
# --------------------------------------------------------------------------------------------------------------

_PARENT_PID: int | None = None  # in a loader worker: the process that started it
PR_SET_PDEATHSIG = 1


def worker_init(_: int, parent: int) -> None:
    """DataLoader ``worker_init_fn`` (bind ``parent=os.getpid()``). Workers ignore preemption signals: the main
    process decides, checkpoints and shuts them down (``deepspeed``'s launcher and ``scancel --signal`` signal
    every process of the tree, workers included). They die with their parent, whatever they are doing."""
    global _PARENT_PID
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _PARENT_PID = parent
    if sys.platform.startswith("linux"):  # the kernel SIGKILLs us when the parent (thread) exits
        try:
            if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                if os.getppid() != parent:  # the parent died before prctl
                    os._exit(1)
                _PARENT_PID = None  # the kernel watches: exit_if_orphaned() (a syscall per sample) has nothing to do
        except (OSError, AttributeError):  # no prctl in this libc: exit_if_orphaned() remains
            pass
    exit_if_orphaned()  # the parent may have died before prctl


def exit_if_orphaned() -> None:
    """In a loader worker whose parent is gone: exit now (the fallback where PR_SET_PDEATHSIG is missing)."""
    if _PARENT_PID is not None and os.getppid() != _PARENT_PID:
        os._exit(1)


def worker_init_fn():
    """The ``worker_init_fn`` for a DataLoader made in this process."""
    return functools.partial(worker_init, parent=os.getpid())


def stop_workers(loader: DataLoader, timeout: float = 5.0) -> None:
    """End the worker processes of ``loader``'s (persistent) iterator now: SIGKILL, as they ignore SIGTERM and hold
    no state, then torch's own clean-up of its queues and threads. Safe to call again; a later ``iter(loader)``
    starts new workers. (Uses DataLoader internals: ``tests/test_hostile_data.py`` checks them.)"""
    it = getattr(loader, "_iterator", None)
    workers = list(getattr(it, "_workers", ()))
    if not workers:
        return
    loader._iterator = None
    if getattr(it, "_worker_pids_set", False):  # else torch's SIGCHLD handler reports the kill as a crash
        _torch_signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False
    for w in workers:
        if w.is_alive():
            w.kill()
    for w in workers:
        w.join(timeout)
    it._shutdown_workers()


_OPEN_LOADERS: "weakref.WeakSet" = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    """At exit, before torch's and multiprocessing's own hooks (registered earlier; atexit runs LIFO):
    multiprocessing would SIGTERM the workers, which ignore it, then wait for them forever."""
    for loader in list(_OPEN_LOADERS):
        loader.close()


class ClosableLoader:
    """close() / __del__ / exit handling of a loader that holds a DataLoader in ``self.loader``."""

    loader: DataLoader

    def _track(self) -> None:
        _OPEN_LOADERS.add(self)

    def close(self) -> None:
        """End the worker processes now (SIGKILL if needed); safe to call twice."""
        if getattr(self, "loader", None) is not None:
            stop_workers(self.loader)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser (e.g. at interpreter exit)
            pass


# --------------------------------------------------------------------------------------------------------------
# the loader the trainer uses
# --------------------------------------------------------------------------------------------------------------


class ShardLoader(ClosableLoader):
    """Wraps a DataLoader over a ShardStream. Call ``start_epoch`` before iterating each epoch, ``close()`` at the
    end (also done on an error while iterating, at garbage collection and at exit).

    With ``spec.decode == "gpu"`` the batches are decoded in this process on ``decode_device`` (default: the
    current CUDA device; ``"cpu"`` runs the same code on the CPU, for tests) and ``batch["image"]`` is already
    there; ``decoder`` holds the fallback / corrupt counts of that path. With ``spec.crop == "device"`` the workers
    ship canvases and the batch is cropped in this process on ``decode_device`` (default: the current CUDA device,
    else the CPU) by ``cropper`` (:mod:`~mae_curriculum.data.device_crop`)."""

    def __init__(self, spec: StreamSpec, pin_memory: bool = False, decode_device: str | torch.device | None = None):
        self.spec = spec
        self.dataset = ShardStream(spec)
        self.decoder: BatchDecoder | None = None
        kw = {}
        if spec.num_workers > 0:
            kw = dict(persistent_workers=True, prefetch_factor=4, worker_init_fn=worker_init_fn())
        self.cropper: DeviceCropper | None = None
        collate = collate_rows
        if check_decode(spec.decode) == "gpu":
            self.decoder = BatchDecoder(spec.augment.size, decode_device)
            collate = make_collate(spec.augment.size)
        if check_crop(spec.crop) == "device":
            if spec.decode != "cpu" or spec.augment.randaug_magnitude >= 0 or not spec.augment.train:
                raise ValueError("device crops (data.crop: device) need data.decode: cpu, training crops and no "
                                 "RandAugment (pre-training)")
            self.cropper = DeviceCropper(spec.augment.size, decode_device)
            collate = collate_regions
        # the per-row fields travel inline, not one shared-memory file per tensor (data/transport.py); __iter__
        # turns them back into tensors
        self.loader = DataLoader(self.dataset, batch_size=spec.batch_size, num_workers=spec.num_workers,
                                 pin_memory=pin_memory, drop_last=False, collate_fn=InlineSmall(collate), **kw)
        self.epoch = 0
        self.step_in_epoch = 0
        self._track()

    def steps_in_epoch(self, keep: np.ndarray | None = None) -> int:
        n = int(keep.sum()) if keep is not None else self.spec.index.num_samples
        return steps_per_epoch(n, self.spec.world, self.spec.batch_size, self.spec.num_workers,
                               self.spec.steps_multiple)

    def start_epoch(self, epoch: int, step_in_epoch: int = 0, keep: np.ndarray | None = None,
                    magnitude: float | None = None, sizes=None, out_sizes=None, magnitudes=None,
                    replays=None) -> int:
        """Set the epoch plan; returns the number of steps this epoch will run (from ``step_in_epoch``).

        ``sizes``: the output size of each step of the epoch (indexed by step in epoch; entries before
        ``step_in_epoch`` are not used; 0 or a missing entry = the final size), each between 1 and the final
        size; None: every step at the final size. With ``decode == "gpu"`` the batch is decoded on the device and
        cropped to its step's size there (nvJPEG has no DCT scaling: only the resize follows the plan).

        ``magnitudes`` (same indexing): the RandAugment magnitude of each step (< 0: off; a missing entry: the
        epoch's ``magnitude``), so a curriculum stage that begins mid-epoch gets its magnitude at its first step.

        ``out_sizes`` (same indexing; 0 = none): after the crop to ``sizes`` (and RandAugment) the worker
        Lanczos-resizes each sample to this size (``curriculum.lowpass: lanczos``); at most the step's crop size.
        CPU decode only.

        ``replays`` (same indexing; 0 or 1 = none): replay factor r of each step (``curriculum.replay``): the batch
        holds batch / r images decoded once each, every one as r consecutive rows of independently drawn crops
        (box, flip, RandAugment; the trainer draws each row its own mask); the samples of the other rows of the
        plan are skipped undecoded. r must divide the batch size. CPU decode only. ``batch["fresh"]`` marks the
        rows decoded from their own sample (not a replica, not a corrupt sample's stand-in)."""
        self.epoch, self.step_in_epoch = epoch, step_in_epoch
        self.dataset.control[0] = epoch
        self.dataset.control[1] = step_in_epoch
        if self.cropper is not None and ((magnitude is not None and magnitude >= 0) or out_sizes is not None or (
                magnitudes is not None and np.nanmax(np.asarray(magnitudes, dtype=np.float64), initial=-1.0) >= 0)):
            raise ValueError("device crops (data.crop: device) take no RandAugment and no Lanczos output sizes")
        if magnitude is not None:
            self.dataset.control[2] = int(round(magnitude * 1000)) if magnitude >= 0 else -1000
        self.dataset.magnitudes.fill_(MAGNITUDE_UNSET)
        if magnitudes is not None:
            mags = np.asarray(magnitudes, dtype=np.float64).reshape(-1)[: len(self.dataset.magnitudes)]
            if mags.size and not np.isfinite(mags).all():
                raise ValueError("step magnitudes must be finite")
            coded = np.where(mags >= 0, np.round(mags * 1000), -1000).astype(np.int64)
            self.dataset.magnitudes[: coded.size] = torch.from_numpy(coded)
        if keep is not None:
            self.dataset.keep.copy_(torch.from_numpy(np.asarray(keep, dtype=bool)))
        else:
            self.dataset.keep.fill_(True)
        self.dataset.sizes.zero_()
        if sizes is not None:
            plan = np.asarray(sizes, dtype=np.int64).reshape(-1)[: len(self.dataset.sizes)]
            if plan.size and (plan.min() < 0 or plan.max() > self.spec.augment.size):
                raise ValueError(f"step sizes must lie in [0, {self.spec.augment.size}]; got {plan.min()}..{plan.max()}")
            self.dataset.sizes[: plan.size] = torch.from_numpy(plan.astype(np.int32))
        self.dataset.out_sizes.zero_()
        if out_sizes is not None:
            if self.spec.decode != "cpu":
                raise ValueError("Lanczos output sizes (curriculum.lowpass: lanczos) need data.decode: cpu")
            out = np.asarray(out_sizes, dtype=np.int64).reshape(-1)[: len(self.dataset.out_sizes)]
            crop = self.dataset.sizes.numpy()[: out.size].astype(np.int64)
            crop = np.where(crop == 0, self.spec.augment.size, crop)
            if out.size and (out.min() < 0 or (out > crop).any()):
                raise ValueError(f"Lanczos output sizes must lie in [0, the step's crop size]; got "
                                 f"{out.min()}..{out.max()}")
            self.dataset.out_sizes[: out.size] = torch.from_numpy(out.astype(np.int32))
        self.dataset.replays.zero_()
        if replays is not None:
            reps = np.asarray(replays, dtype=np.int64).reshape(-1)[: len(self.dataset.replays)]
            if reps.size and reps.max() > 1:
                if self.spec.decode != "cpu":
                    raise ValueError("replay (curriculum.replay) needs data.decode: cpu")
                bad = [int(r) for r in np.unique(reps) if r > 1 and self.spec.batch_size % r]
                if reps.min() < 0 or bad:
                    raise ValueError(f"replay factors must be >= 0 and divide the batch size "
                                     f"{self.spec.batch_size}; got {bad or int(reps.min())}")
            self.dataset.replays[: reps.size] = torch.from_numpy(reps.astype(np.int32))
        steps = self.steps_in_epoch(self.dataset.keep.numpy())
        if steps == 0:
            raise ValueError(
                f"an epoch of {int(self.dataset.keep.sum())} samples is too small for {self.spec.world} rank(s) x "
                f"{max(1, self.spec.num_workers)} worker(s) x batch {self.spec.batch_size}")
        return steps - step_in_epoch

    def __iter__(self):
        try:
            for batch in self.loader:
                batch = restore(batch)
                if self.decoder is not None or self.cropper is not None:
                    k = self.step_in_epoch
                    size = int(self.dataset.sizes[k]) if k < len(self.dataset.sizes) else 0
                    batch = (self.decoder or self.cropper)(batch, size)
                self.step_in_epoch += 1
                yield batch
        except Exception:  # e.g. re-raised from a worker: no worker outlives it
            self.close()
            raise


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
            labels.append(optional_label(sample, index.num_classes))
        except Exception:
            continue
        if len(imgs) == n:
            break
    if not imgs:
        raise ValueError(f"no readable images in {index.root}")
    return torch.stack(imgs), torch.tensor(labels)


__all__ = ["ShardLoader", "StreamSpec", "stage_crop_size", "STAGE_SIZE_RATIO", "epoch_order", "steps_per_epoch", "worker_ids", "consumed_by_worker",
           "read_eval_samples", "read_raw", "decode_label", "optional_label", "stop_workers", "MAX_MEMBER_BYTES"]
