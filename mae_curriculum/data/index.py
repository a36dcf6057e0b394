"""The shard index of one split: which tar files, how many samples each, and a global id per sample.

Sample ids are positions in the concatenation of the shards in ``_info.json`` order: shard k holds the ids
``offsets[k] .. offsets[k] + lengths[k] - 1``. The loader, the epoch plan and the pruning state all speak ids.
"""

from __future__ import annotations

import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


def _safe_member(root: Path, name: str) -> Path:
    p = (root / name).resolve()
    if root.resolve() not in p.parents:
        raise DataError(f"{root}/_info.json names a shard outside the folder: {name!r}")
    return p


def _count_samples(path: Path) -> int:
    keys = set()
    with tarfile.open(path, "r|*") as tf:
        for m in tf:
            if m.isfile() and "." in Path(m.name).name:
                keys.add(m.name.split(".", 1)[0])
    return len(keys)


def load_index(folder: str | Path) -> ShardIndex:
    """Read ``folder/_info.json`` (timm ReaderWds format, as written by write_shards); without one, scan the tars."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"shard folder not found: {root}")
    info_path = root / "_info.json"
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
            split = next(iter(info["splits"].values()))
            filenames = tuple(split["filenames"])
            lengths = tuple(int(n) for n in split["shard_lengths"])
        except (ValueError, KeyError, StopIteration, TypeError) as e:
            raise DataError(f"{info_path}: unreadable shard index ({type(e).__name__}: {e})") from None
        if len(filenames) != len(lengths):
            raise DataError(f"{info_path}: filenames and shard_lengths differ in length")
        for name in filenames:
            _safe_member(root, name)
        num_classes = int(info.get("num_classes", 0) or 0)
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
