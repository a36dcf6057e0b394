"""The shard index of one split: which tar files, how many samples each, and a global id per sample.

Sample ids are positions in the concatenation of the shards in ``_info.json`` order: shard k holds the ids
``offsets[k] .. offsets[k] + lengths[k] - 1``. The loader, the epoch plan and the pruning state all speak ids.

A split is a local folder or a remote one (``s3://``, ``gs://``, ``http(s)://``; see
:mod:`~mae_curriculum.data.remote`). A remote split must have its ``_info.json`` (the shards are not scanned over
the network); its shards' sizes come from one listing (a HEAD per shard on HTTP), with the same checks as local.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

from mae_curriculum.data import remote
from mae_curriculum.data.tarsafe import compression_of, members

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class DataError(ValueError):
    """A data problem a user can fix (missing folder, no shards, unreadable index)."""


@dataclass(frozen=True)
class ShardIndex:
    root: Path | str  # a local folder, or a remote location (str URL)
    filenames: tuple[str, ...]
    lengths: tuple[int, ...]
    num_classes: int = 0
    cache_dir: str = ""  # remote shards: the local read-through cache folder ("" = none)

    @property
    def num_samples(self) -> int:
        return int(sum(self.lengths))

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def path(self, k: int) -> Path | str:
        if isinstance(self.root, str):
            return remote.join(self.root, self.filenames[k])
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


SizesOf = Callable[[list[str]], dict[str, int]]  # {name: bytes} of the listed shards that exist


def _parse_info(info: object, sizes_of: SizesOf, where: Path | str
                ) -> tuple[tuple[str, ...], tuple[int, ...], int, dict[str, int]]:
    """(filenames, shard_lengths, num_classes, {existing shard: size}) of an _info.json, every value checked:
    DataError names the key."""
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
    found = sizes_of(names)
    for name, n in zip(names, lengths):
        _check_length(name, n, found.get(name), where)
    declared = split.get("num_samples", sum(lengths))
    if declared != sum(lengths):
        raise DataError(f"{where}: num_samples is {declared!r} but the shard_lengths add up to {sum(lengths)}")
    num_classes = info.get("num_classes", 0) or 0
    if not _is_int(num_classes) or not 0 <= num_classes <= MAX_CLASSES:
        raise DataError(f"{where}: num_classes must be an integer in [0, {MAX_CLASSES}], got {num_classes!r}")
    classes = info.get("classes")
    if isinstance(classes, list) and classes and len(classes) != num_classes:
        raise DataError(f"{where}: num_classes is {num_classes} but 'classes' lists {len(classes)} names")
    return tuple(names), tuple(lengths), num_classes, found


def _check_length(name: str, n: int, size: int | None, where: Path | str) -> None:
    """A shard's declared sample count: in [0, MAX_SHARD_SAMPLES] and, if the file exists (``size`` not None),
    possible for its size (a sample takes at least one 512-byte tar header)."""
    if not 0 <= n <= MAX_SHARD_SAMPLES:
        raise DataError(f"{where}: shard_lengths of {name} is {n}, outside [0, {MAX_SHARD_SAMPLES}]")
    if size is not None and n * tarfile.BLOCKSIZE > size:
        raise DataError(f"{where}: shard_lengths of {name} is {n} but the file has {size} bytes, room for at "
                        f"most {size // tarfile.BLOCKSIZE} samples (a wrong _info.json, or a truncated shard)")


def _local_sizes(root: Path) -> SizesOf:
    def sizes_of(names: list[str]) -> dict[str, int]:
        paths = {n: _safe_member(root, n) for n in names}
        return {n: p.stat().st_size for n, p in paths.items() if p.is_file()}
    return sizes_of


def _remote_sizes(root: str, where: str) -> SizesOf:
    def sizes_of(names: list[str]) -> dict[str, int]:
        for n in names:
            try:
                remote.join(root, n)
            except ValueError:
                raise DataError(f"{where} names a shard that is not a plain object name: {n!r}") from None
        return remote.sizes(root, names)
    return sizes_of


def _parse_json(text: str, where: Path | str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{where}: unreadable shard index ({type(e).__name__}: {e})") from None


def _read_info(info_path: Path, root: Path) -> tuple[tuple[str, ...], tuple[int, ...], int, dict[str, int]]:
    if info_path.stat().st_size > MAX_INFO_BYTES:
        raise DataError(f"{info_path}: over {MAX_INFO_BYTES >> 20} MiB: not a shard index")
    return _parse_info(_parse_json(info_path.read_text(), info_path), _local_sizes(root), info_path)


def _load_remote(root: str, cache_dir: str) -> ShardIndex:
    """:func:`load_index` of a remote split: its _info.json is required (shards are never scanned remotely)."""
    info_url = remote.join(root, "_info.json")
    try:
        text = remote.read_text(info_url, MAX_INFO_BYTES)
    except FileNotFoundError:
        raise DataError(f"{info_url} not found: a remote shard folder needs the _info.json that "
                        f"mae_curriculum.data.write_shards writes") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{info_url}: {e}") from None
    filenames, lengths, num_classes, found = _parse_info(_parse_json(text, info_url),
                                                         _remote_sizes(root, info_url), info_url)
    return _checked(ShardIndex(root, filenames, lengths, num_classes, cache_dir), found)


def _checked(index: ShardIndex, found: dict[str, int]) -> ShardIndex:
    """``index``, refused when it holds no sample or none of its shards exists; missing shards are logged."""
    if sum(index.lengths) == 0:
        raise DataError(f"{index.root}: the shards hold no samples")
    missing = [k for k, f in enumerate(index.filenames) if f not in found]
    if len(missing) == len(index.filenames):
        raise DataError(f"{index.root}: none of the {len(index.filenames)} shards listed in _info.json exist")
    for k in missing:
        log.warning("shard %s is missing: its samples will be replaced by others (counted as corrupt)", index.path(k))
    return index


def load_index(folder: str | Path, cache_dir: str = "") -> ShardIndex:
    """Read ``folder/_info.json`` (timm ReaderWds format, as written by write_shards); without one, scan the tars.
    ``folder`` may be remote (``s3://...``; see :mod:`~mae_curriculum.data.remote`), its shards then read through
    the local cache folder ``cache_dir`` if given.

    Every value of _info.json is checked (types, ranges, agreement, room in each shard file): a bad one raises
    :class:`DataError` naming the key and the shard."""
    if remote.is_remote(folder):
        return _load_remote(str(folder).rstrip("/"), cache_dir)
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"shard folder not found: {root}")
    info_path = root / "_info.json"
    if info_path.is_file():
        filenames, lengths, num_classes, found = _read_info(info_path, root)
    else:
        shards = sorted(p.name for p in root.glob("*.tar"))
        if not shards:
            raise DataError(f"no .tar shards in {root}")
        log.warning("%s has no _info.json: counting samples by scanning %d shards", root, len(shards))
        filenames = tuple(shards)
        lengths = tuple(_count_samples(root / s) for s in shards)
        num_classes = 0
        found = _local_sizes(root)(list(filenames))
    return _checked(ShardIndex(root, filenames, lengths, num_classes), found)
