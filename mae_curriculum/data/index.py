"""The shard index of one split: which tar files, how many samples each, and a global id per sample.

Sample ids are positions in the concatenation of the shards in ``_info.json`` order: shard k holds the ids
``offsets[k] .. offsets[k] + lengths[k] - 1``. The loader, the epoch plan and the pruning state all speak ids.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from mae_curriculum.data.tarsafe import compression_of, members

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class DataError(ValueError):
    """A data problem a user can fix (missing folder, no shards, unreadable index)."""


@dataclass(frozen=True)
class ShardIndex:
    root: Path
    filenames: tuple[str, ...]
    lengths: tuple[int, ...]
    num_classes: int = 0

    @property
    def num_samples(self) -> int:
        return int(sum(self.lengths))

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def path(self, k: int) -> Path:
        return self.root / self.filenames[k]

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.cumsum(self.lengths), ids, side="right")


MAX_SHARD_SAMPLES = 10_000_000  # per shard (a real one holds ~1e3-1e4); a sample takes >= 512 bytes of tar
MAX_CLASSES = 1_000_000
MAX_INFO_BYTES = 64 << 20  # _info.json of ImageNet: ~60 KB


def _safe_member(root: Path, name: str) -> Path:
    p = (root / name).resolve()
    if root.resolve() not in p.parents:
        raise DataError(f"{root}/_info.json names a shard outside the folder: {name!r}")
    return p


# --------------------------------------------------------------------------------------------------------------
# samples inside a shard (WebDataset's grouping: consecutive members sharing a key)
# --------------------------------------------------------------------------------------------------------------


def split_name(name: str) -> tuple[str, str] | None:
    """(sample key, lower-cased suffix) of a member name, or None: the key runs to the first dot of the file name
    (``a/b.seg.png`` -> ``("a/b", "seg.png")``), as in WebDataset."""
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


def shard_samples(f: BinaryIO, size: int) -> Iterator[list[tarfile.TarInfo]]:
    """The samples of an open local shard of ``size`` bytes, in file order, each as the list of its members
    (regular files only). The position in this sequence is the sample's position in the shard. Raises
    :class:`tarfile.TarError` where the rest of the shard cannot be read (truncated, a member that claims bytes
    past the end, a compressed file, ...), after yielding the samples before that point."""
    head = f.read(6)
    f.seek(0)
    kind = compression_of(head)
    if kind is not None:
        raise tarfile.ReadError(f"a {kind}-compressed file: shards must be plain (uncompressed) tars")
    key, group = None, []
    try:
        for m in members(f, 0, size):
            parts = split_name(m.name) if m.isreg() else None
            if parts is None:
                continue
            if parts[0] != key and group:
                yield group
                group = []
            key = parts[0]
            group.append(m)
    except tarfile.TarError:
        if group:
            yield group
        raise
    if group:
        yield group


def _count_samples(path: Path) -> int:
    n = 0
    try:
        with open(path, "rb") as f:
            for _ in shard_samples(f, os.fstat(f.fileno()).st_size):
                n += 1
    except (OSError, tarfile.TarError) as e:
        log.warning("shard %s: %s after %d samples: only those are counted", path, e, n)
    return n


# --------------------------------------------------------------------------------------------------------------
# _info.json
# --------------------------------------------------------------------------------------------------------------


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_info(info: object, root: Path, where: Path) -> tuple[tuple[str, ...], tuple[int, ...], int]:
    """(filenames, shard_lengths, num_classes) of an _info.json, every value checked: DataError names the key."""
    splits = info.get("splits") if isinstance(info, dict) else None
    if not isinstance(splits, dict) or not splits:
        raise DataError(f"{where}: no 'splits' object")
    split = next(iter(splits.values()))
    names, lengths = (split.get(k) if isinstance(split, dict) else None for k in ("filenames", "shard_lengths"))
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{where}: 'filenames' must be a list of file names")
    if not isinstance(lengths, list) or not all(_is_int(n) for n in lengths):
        raise DataError(f"{where}: 'shard_lengths' must be a list of integers")
    if len(names) != len(lengths):
        raise DataError(f"{where}: filenames and shard_lengths differ in length ({len(names)} vs {len(lengths)})")
    if len(set(names)) != len(names):
        raise DataError(f"{where}: 'filenames' lists a shard twice")
    for name, n in zip(names, lengths):
        _check_length(root, name, n, where)
    declared = split.get("num_samples", sum(lengths))
    if declared != sum(lengths):
        raise DataError(f"{where}: num_samples is {declared!r} but the shard_lengths add up to {sum(lengths)}")
    num_classes = info.get("num_classes", 0) or 0
    if not _is_int(num_classes) or not 0 <= num_classes <= MAX_CLASSES:
        raise DataError(f"{where}: num_classes must be an integer in [0, {MAX_CLASSES}], got {num_classes!r}")
    classes = info.get("classes")
    if isinstance(classes, list) and classes and len(classes) != num_classes:
        raise DataError(f"{where}: num_classes is {num_classes} but 'classes' lists {len(classes)} names")
    return tuple(names), tuple(lengths), num_classes


def _check_length(root: Path, name: str, n: int, where: Path) -> None:
    """A shard's declared sample count: in [0, MAX_SHARD_SAMPLES] and, if the file exists, possible for its size
    (a sample takes at least one 512-byte tar header)."""
    path = _safe_member(root, name)
    if not 0 <= n <= MAX_SHARD_SAMPLES:
        raise DataError(f"{where}: shard_lengths of {name} is {n}, outside [0, {MAX_SHARD_SAMPLES}]")
    size = path.stat().st_size if path.is_file() else None
    if size is not None and n * tarfile.BLOCKSIZE > size:
        raise DataError(f"{where}: shard_lengths of {name} is {n} but the file has {size} bytes, room for at "
                        f"most {size // tarfile.BLOCKSIZE} samples (a wrong _info.json, or a truncated shard)")


def _read_info(info_path: Path, root: Path) -> tuple[tuple[str, ...], tuple[int, ...], int]:
    if info_path.stat().st_size > MAX_INFO_BYTES:
        raise DataError(f"{info_path}: over {MAX_INFO_BYTES >> 20} MiB: not a shard index")
    try:
        info = json.loads(info_path.read_text())
    except (ValueError, RecursionError) as e:
        raise DataError(f"{info_path}: unreadable shard index ({type(e).__name__}: {e})") from None
    return _parse_info(info, root, info_path)


def load_index(folder: str | Path) -> ShardIndex:
    """Read ``folder/_info.json`` (timm ReaderWds format, as written by write_shards); without one, scan the tars.

    Every value of _info.json is checked (types, ranges, agreement, room in each shard file): a bad one raises
    :class:`DataError` naming the key and the shard."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"shard folder not found: {root}")
    info_path = root / "_info.json"
    if info_path.is_file():
        filenames, lengths, num_classes = _read_info(info_path, root)
    else:
        shards = sorted(p.name for p in root.glob("*.tar"))
        if not shards:
            raise DataError(f"no .tar shards in {root}")
        log.warning("%s has no _info.json: counting samples by scanning %d shards", root, len(shards))
        filenames = tuple(shards)
        lengths = tuple(_count_samples(root / s) for s in shards)
        num_classes = 0
    if sum(lengths) == 0:
        raise DataError(f"{root}: the shards hold no samples")
    missing = [f for f in filenames if not (root / f).is_file()]
    if len(missing) == len(filenames):
        raise DataError(f"{root}: none of the {len(filenames)} shards listed in _info.json exist")
    for f in missing:
        log.warning("shard %s is missing: its samples will be replaced by others (counted as corrupt)", root / f)
    return ShardIndex(root, filenames, lengths, num_classes)
