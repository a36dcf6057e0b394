"""Write an image dataset as WebDataset tar shards (+ timm ``_info.json``), as a library and a CLI.

    python -m mae_curriculum.data.write_shards SRC OUT_DIR [--split train] [--samples-per-shard 1000]
        [--workers N] [--max-size S] [--max-pixels N] [--shuffle --seed 0] [--class-index FILE]
        [--val-labels FILE] [--tar-subdir PATH] [--format auto|imagefolder|imagenet-train-tar|imagenet-val|tar]
        [--max-file-bytes N] [--max-inflight-bytes N] [--follow-external-links]

Output (one split per OUT_DIR):

* ``{split}-000000.tar, {split}-000001.tar, ...``: per sample ``<key>.<jpg|png|webp>``, ``<key>.cls`` (ASCII
  decimal) and ``<key>.json`` (``{"path", "class", "size": [w, h]}``), in that order. Keys are
  ``{split}_{n:08d}`` in output order. Tar headers carry no time or owner: the same input and options give
  byte-identical shards, whatever ``--workers``. Each shard is written as ``.{name}.partial`` and renamed
  when complete, so an interrupted run never leaves a truncated shard under a final name.
* ``_info.json`` in timm's ReaderWds format, ``class_index.json`` (class names in index order; pass it to
  ``--class-index`` for the other splits so that labels agree) and ``_report.json`` (skipped files and why).

OUT_DIR may be an object-store location (``s3://bucket/prefix/train``, ``gs://...``; see
:mod:`~mae_curriculum.data.remote` for credentials and ``AWS_ENDPOINT_URL``): each shard is written in a local
temporary folder, uploaded whole once complete (an object appears complete or not at all) and removed locally;
``_info.json`` is uploaded last. ``http(s)://`` locations are read-only.

Input layouts, their detection and the image rules are described in :mod:`~mae_curriculum.data.sources` and
:mod:`~mae_curriculum.data.imageio`. A bad file never stops the writer: it is listed in ``_report.json``.
Bytes read before validation are bounded: only regular files of at most ``--max-file-bytes`` are read, and the
raw bytes read but not yet validated stay under ``--max-inflight-bytes`` (plus one file). Symbolic links that
lead outside SRC are skipped unless ``--follow-external-links``.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import re
import sys
import tarfile
import tempfile
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from tqdm import tqdm

from mae_curriculum.data import remote
from mae_curriculum.data.imageio import DEFAULT_MAX_PIXELS, BadImage, Prepared, prepare_image
from mae_curriculum.data.sources import (FORMATS, MAX_FILE_BYTES, SPLIT_NAMES, TAR_SUFFIXES, Source, SourceError,
                                         open_source)

IMAGE_EXTS = ("jpg", "png", "webp")
INFO_FILE, CLASS_INDEX_FILE, REPORT_FILE = "_info.json", "class_index.json", "_report.json"
_KEY_RE = re.compile(r"[A-Za-z0-9_\-+=@,~]{1,200}")
_SPLIT_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")
BATCH = 32  # images per task sent to a worker process
MAX_INFLIGHT_BYTES = 256 << 20  # raw bytes read and not yet validated, over all worker tasks


@dataclass
class Sample:
    """One sample to write. ``key`` must be unique and contain no dots, slashes or spaces."""

    key: str
    image: bytes
    ext: str
    cls: int
    meta: dict | None = None


# --------------------------------------------------------------------------------------------------------------
# writing shards
# --------------------------------------------------------------------------------------------------------------


def sanitize_key(text: str) -> str:
    """``text`` with every character not allowed in a key replaced by ``_`` (may create duplicates)."""
    return re.sub(r"[^A-Za-z0-9_\-+=@,~]", "_", text)[:200] or "_"


def check_sample(s: Sample) -> None:
    """Raise ValueError for a key, extension or label a reader would mis-parse."""
    if not _KEY_RE.fullmatch(s.key):
        raise ValueError(f"invalid sample key {s.key!r}: use letters, digits and _-+=@,~ only (see sanitize_key)")
    if s.ext not in IMAGE_EXTS:
        raise ValueError(f"sample {s.key}: image extension must be one of {IMAGE_EXTS}, got {s.ext!r}")
    if isinstance(s.cls, bool) or not isinstance(s.cls, int):
        raise ValueError(f"sample {s.key}: cls must be an int, got {type(s.cls).__name__}")


def check_split(split: str, samples_per_shard: int) -> None:
    """Raise ValueError for a split name unfit for file names or a shard size below 1."""
    if not _SPLIT_RE.fullmatch(split):
        raise ValueError(f"invalid split name {split!r}: letters, digits, _ and - only")
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


class Output:
    """Where a split goes: a local folder, or a remote one (``s3://``, ``gs://``) staged through a local temporary
    folder, each file uploaded whole by :meth:`publish` and then removed locally."""

    def __init__(self, out_dir: str | Path) -> None:
        self.url = str(out_dir).rstrip("/") if remote.is_remote(out_dir) else None
        self._tmp = None
        if self.url is not None:
            if remote.scheme_of(self.url) in ("http", "https"):
                raise ValueError(f"{self.url}: http(s) locations are read-only; write shards to s3:// or gs://")
            self._tmp = tempfile.TemporaryDirectory(prefix="write_shards-")
            self.dir = Path(self._tmp.name)
        else:
            self.dir = Path(out_dir)
            self.dir.mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return self.url or str(self.dir)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1] if self.url else self.dir.resolve().name

    def publish(self, name: str) -> None:
        """A completed local file ``dir/name``: uploaded (then removed here) for a remote output."""
        if self.url is not None:
            remote.upload(self.dir / name, remote.join(self.url, name))
            (self.dir / name).unlink()

    def write_json(self, name: str, obj: object) -> None:
        _write_json(self.dir / name, obj)
        self.publish(name)

    def remove_stale(self, split: str, keep: Sequence[str]) -> None:
        """Delete shards of this split left by an earlier run that wrote more shards, and stale partials."""
        pattern = re.compile(rf"\.?{re.escape(split)}-\d{{6,}}\.tar(\.partial)?")
        if self.url is None:
            names = [p.name for p in self.dir.iterdir()]
        else:
            names = remote.listdir(self.url)
        for n in names:
            if not pattern.fullmatch(n) or n in keep:
                continue
            if self.url is None:
                (self.dir / n).unlink()
            else:
                remote.remove(remote.join(self.url, n))

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


class ShardWriter:
    """Fills ``{split}-NNNNNN.tar`` shards of ``samples_per_shard`` samples, each renamed when complete (and then
    handed to ``publish``)."""

    def __init__(self, out_dir: Path, split: str, samples_per_shard: int,
                 publish: Callable[[str], None] | None = None) -> None:
        self.out_dir, self.split, self.per_shard = out_dir, split, samples_per_shard
        self.publish = publish
        self.filenames: list[str] = []
        self.lengths: list[int] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def _partial(self, name: str) -> Path:
        return self.out_dir / f".{name}.partial"

    def add(self, s: Sample) -> None:
        if self._tar is None:
            self.filenames.append(shard_name(self.split, len(self.filenames)))
            self._tar = tarfile.open(self._partial(self.filenames[-1]), "w", format=tarfile.PAX_FORMAT)
        _add_member(self._tar, f"{s.key}.{s.ext}", s.image)
        _add_member(self._tar, f"{s.key}.cls", str(int(s.cls)).encode("ascii"))
        if s.meta is not None:
            _add_member(self._tar, f"{s.key}.json", json.dumps(s.meta, sort_keys=True).encode("utf-8"))
        self._count += 1
        if self._count == self.per_shard:
            self.finish_shard()

    def finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = self.filenames[-1]
        os.replace(self._partial(name), self.out_dir / name)
        self.lengths.append(self._count)
        self._tar, self._count = None, 0
        if self.publish is not None:
            self.publish(name)

    def abort(self) -> None:
        """Drop the shard being written (called on error): it never appears under its final name."""
        if self._tar is not None:
            self._tar.close()
            self._partial(self.filenames.pop()).unlink(missing_ok=True)
            self._tar, self._count = None, 0


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _class_names(classes: Sequence[str] | None, seen: dict[int, str], max_cls: int) -> list[str]:
    """Class names for _info.json: given ones, else names found in the meta ``class`` field, else indices."""
    if classes is not None:
        return list(classes)
    return [seen.get(i, str(i)) for i in range(max_cls + 1)]


def write_samples(
    samples: Iterable[Sample],
    out_dir: str | Path | Output,
    split: str,
    samples_per_shard: int = 1000,
    progress: bool = False,
    *,
    classes: Sequence[str] | None = None,
    name: str | None = None,
) -> dict:
    """Write ``samples`` as shards of ``split`` into ``out_dir`` and return the ``_info.json`` dict written.

    ``classes`` (names in index order) goes into ``_info.json`` and ``class_index.json``; without it the
    names come from ``meta["class"]`` where given. Raises ValueError on a bad key / duplicate / no sample.
    ``out_dir`` may be remote (``s3://...``, see the module docstring).
    """
    check_split(split, samples_per_shard)
    if not isinstance(out_dir, Output):
        out = Output(out_dir)
        try:
            return write_samples(samples, out, split, samples_per_shard, progress, classes=classes, name=name)
        finally:
            out.close()
    out = out_dir
    writer, keys, seen, max_cls = ShardWriter(out.dir, split, samples_per_shard, out.publish), set(), {}, -1
    try:
        for s in tqdm(samples, disable=not progress, unit="img", desc=f"writing {split}"):
            check_sample(s)
            if s.key in keys:
                raise ValueError(f"duplicate sample key {s.key!r}")
            keys.add(s.key)
            max_cls = max(max_cls, s.cls)
            if s.meta and "class" in s.meta:
                seen.setdefault(s.cls, str(s.meta["class"]))
            writer.add(s)
        writer.finish_shard()
    except BaseException:
        writer.abort()
        raise
    if not keys:
        raise ValueError(f"no samples to write for split {split!r}")
    names = _class_names(classes, seen, max_cls)
    info = {
        "name": name or out.name,
        "splits": {
            split: {
                "name": split,
                "num_samples": sum(writer.lengths),
                "filenames": writer.filenames,
                "shard_lengths": writer.lengths,
            }
        },
        "num_classes": len(names),
        "classes": names,
    }
    out.remove_stale(split, writer.filenames)
    out.write_json(CLASS_INDEX_FILE, names)
    out.write_json(INFO_FILE, info)  # last: readers see the new shards only once all of them are there
    return info


# --------------------------------------------------------------------------------------------------------------
# converting a source: read -> validate/convert (in worker processes) -> write
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ConvertOptions:
    """Options of :func:`convert` (the CLI flags)."""

    fmt: str = "auto"
    split: str | None = None
    name: str | None = None
    samples_per_shard: int = 1000
    workers: int = 1
    max_size: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    shuffle: bool = False
    seed: int = 0
    class_index: str | Path | None = None
    val_labels: str | Path | None = None
    tar_subdir: str | None = None
    progress: bool = False
    max_file_bytes: int = MAX_FILE_BYTES
    max_inflight_bytes: int = MAX_INFLIGHT_BYTES
    follow_external_links: bool = False


Processed = tuple[int, "Prepared | None", "str | None"]


def load_class_index(path: str | Path) -> list[str]:
    """Class names in index order from a JSON list, a JSON ``{name: index}`` dict, or a text file (one a line)."""
    text = Path(path).read_text()
    try:
        obj = json.loads(text)
    except ValueError:
        obj = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if isinstance(obj, dict) and "classes" in obj:  # an _info.json
        obj = obj["classes"]
    if isinstance(obj, dict):
        obj = [n for n, _ in sorted(obj.items(), key=lambda kv: int(kv[1]))]
    if not isinstance(obj, list) or not obj or len(set(obj)) != len(obj):
        raise SourceError(f"{path}: a class index must be a non-empty list of distinct class names")
    return [str(n) for n in obj]


def process_batch(batch: list, max_size: int | None, max_pixels: int) -> list[Processed]:
    """Validate/convert raw items in a worker; a failure becomes ``(index, None, reason)``, never an exception."""
    out: list[Processed] = []
    for i, data, err in batch:
        if err is not None:
            out.append((i, None, err))
            continue
        try:
            out.append((i, prepare_image(data, max_size, max_pixels), None))
        except BadImage as e:
            out.append((i, None, str(e)))
        except Exception as e:  # noqa: BLE001 - one odd file must not stop the writer
            out.append((i, None, f"unexpected {type(e).__name__}: {e}"))
    return out


def _raw_size(item: tuple) -> int:
    return len(item[1] or b"")


def _batched(items: Iterable, n: int, max_bytes: int | None = None, nbytes: Callable = _raw_size) -> Iterator[list]:
    """Lists of ``n`` items, or fewer once they hold ``max_bytes`` (``nbytes`` per item)."""
    batch, held = [], 0
    for item in items:
        batch.append(item)
        held += nbytes(item) if max_bytes is not None else 0
        if len(batch) == n or (max_bytes is not None and held >= max_bytes):
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def _batch_size(batch: list) -> int:
    return sum(_raw_size(item) for item in batch)


def ordered_map(fn: Callable[[list], list], batches: Iterable[list], workers: int, max_pending_bytes: int | None = None,
                nbytes: Callable[[list], int] = _batch_size) -> Iterator[list]:
    """``map(fn, batches)`` over ``workers`` processes, in input order, with at most 2 tasks per worker queued and,
    with ``max_pending_bytes``, at most that many bytes (``nbytes`` per batch) in the queued tasks (at least one)."""
    if workers <= 1:
        yield from map(fn, batches)
        return
    ex = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending: deque = deque()
        held = 0
        limit = max_pending_bytes if max_pending_bytes is not None else float("inf")
        for b in batches:
            size = nbytes(b) if max_pending_bytes is not None else 0
            while pending and (len(pending) >= 2 * workers or held + size > limit):
                future, done = pending.popleft()
                held -= done
                yield future.result()
            pending.append((ex.submit(fn, b), size))
            held += size
        while pending:
            yield pending.popleft()[0].result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _samples(
    source: Source, results: Iterable[Processed], class_to_idx: dict[str, int], split: str, report: list[dict]
) -> Iterator[Sample]:
    n = 0
    for i, prep, err in results:
        entry = source.entries[i]
        if prep is None:
            report.append({"path": entry.path, "reason": err})
            continue
        meta = {"path": entry.path, "class": entry.class_name, "size": [prep.width, prep.height]}
        yield Sample(f"{split}_{n:08d}", prep.data, prep.ext, class_to_idx[entry.class_name], meta)
        n += 1


def _resolve_classes(source: Source, class_index: list[str] | None, where: str) -> list[str]:
    if class_index is None:
        return source.classes
    unknown = [c for c in source.classes if c not in set(class_index)]
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise SourceError(f"class {shown} found in the source is not in the class index {where}")
    return class_index


def default_split(src: Path, tar_subdir: str | None, fmt: str) -> str:
    """The split name when none is given: a split word in the tar subdir or SRC name, else val/train."""
    base = Path(tar_subdir).name if tar_subdir else src.name
    for suffix in TAR_SUFFIXES:
        base = base[: -len(suffix)] if base.lower().endswith(suffix) else base
    for token in reversed(re.split(r"[-_.\s]+", base.lower())):
        if token in SPLIT_NAMES:
            return token
    return "val" if fmt == "imagenet-val" else "train"


def _summarise(report: dict, out_dir: Path | Output) -> None:
    skipped = report["skipped"]
    print(
        f"wrote {report['num_written']} samples of split {report['split']!r} to {out_dir} "
        f"({report['num_shards']} shards, {report['seconds']:.1f} s); skipped {len(skipped)} files, "
        f"ignored {report['ignored_non_images']} non-image files",
        file=sys.stderr,
    )
    if skipped:
        reasons = Counter(s["reason"].split(":")[0] for s in skipped)
        print("  skipped: " + "; ".join(f"{r} x{n}" for r, n in reasons.most_common()), file=sys.stderr)
        for s in skipped[:5]:
            print(f"  {s['path']}: {s['reason']}", file=sys.stderr)
        print(f"  full list: {out_dir}/{REPORT_FILE}", file=sys.stderr)


def convert(src: str | Path, out_dir: str | Path, opts: ConvertOptions) -> dict:
    """Convert the dataset at ``src`` into shards in ``out_dir``; returns the ``_report.json`` dict."""
    t0, src = time.time(), Path(src)
    class_index = load_class_index(opts.class_index) if opts.class_index else None
    source = open_source(src, opts.fmt, opts.tar_subdir, opts.val_labels, class_index,
                         follow_links=opts.follow_external_links, max_file_bytes=opts.max_file_bytes)
    classes = _resolve_classes(source, class_index, str(opts.class_index))
    split = opts.split or default_split(src, opts.tar_subdir, source.format)
    check_split(split, opts.samples_per_shard)
    order = list(range(len(source.entries)))
    if opts.shuffle:
        random.Random(opts.seed).shuffle(order)
    work = partial(process_batch, max_size=opts.max_size, max_pixels=opts.max_pixels)
    per_batch = max(1, opts.max_inflight_bytes // (2 * max(1, opts.workers)))
    batches = ordered_map(work, _batched(source.read(order), BATCH, per_batch), opts.workers, opts.max_inflight_bytes)
    results = tqdm(
        (r for b in batches for r in b), total=len(order), disable=not opts.progress, unit="img", desc=split
    )
    skipped = list(source.skipped)
    report = {"src": str(src), "format": source.format, "split": split, "num_written": 0, "num_shards": 0}
    out = Output(out_dir)
    try:
        samples = _samples(source, results, {c: i for i, c in enumerate(classes)}, split, skipped)
        info = write_samples(
            samples, out, split, opts.samples_per_shard, classes=classes, name=opts.name or _name(src)
        )
        written = info["splits"][split]
        report.update(num_written=written["num_samples"], num_shards=len(written["filenames"]))
    finally:
        report.update(seconds=round(time.time() - t0, 3), ignored_non_images=source.ignored, skipped=skipped)
        out.write_json(REPORT_FILE, report)
        out.close()
        _summarise(report, out)
    return report


def _name(src: Path) -> str:
    base = src.resolve().name
    for suffix in TAR_SUFFIXES:
        base = base[: -len(suffix)] if base.lower().endswith(suffix) else base
    return src.resolve().parent.name if base.lower() in SPLIT_NAMES else base


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mae_curriculum.data.write_shards",
        description="Write an image dataset as WebDataset tar shards with a timm _info.json.",
    )
    p.add_argument("src", help="ImageFolder tree, tar(.gz) of one, ImageNet train tar, or flat val folder")
    p.add_argument("out_dir", help="output folder (one split per folder)")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="auto")
    p.add_argument("--split", help="split name (default: a split word in SRC or --tar-subdir, else train / val)")
    p.add_argument("--name", help="dataset name in _info.json (default: SRC's name)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1, help="processes decoding / re-encoding (output identical)")
    p.add_argument("--max-size", type=int, help="bound the short side to S pixels (downscale only)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb limit (w*h)")
    p.add_argument("--shuffle", action="store_true", help="shuffle the sample order before writing")
    p.add_argument("--seed", type=int, default=0, help="seed of --shuffle")
    p.add_argument("--class-index", help="existing class index (JSON list) to use, e.g. the train split's")
    p.add_argument("--val-labels", help="labels file of a flat ImageNet-val folder")
    p.add_argument("--tar-subdir", help="folder inside the tar whose children are the class folders")
    p.add_argument("--max-file-bytes", type=int, default=MAX_FILE_BYTES,
                   help="skip (and report) source files larger than this, unread")
    p.add_argument("--max-inflight-bytes", type=int, default=MAX_INFLIGHT_BYTES,
                   help="bound on raw bytes read but not yet validated (all workers together)")
    p.add_argument("--follow-external-links", action="store_true",
                   help="read symbolic links that lead outside SRC (skipped and reported by default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    opts = ConvertOptions(
        fmt=a.fmt, split=a.split, name=a.name, samples_per_shard=a.samples_per_shard, workers=a.workers,
        max_size=a.max_size, max_pixels=a.max_pixels, shuffle=a.shuffle, seed=a.seed, class_index=a.class_index,
        val_labels=a.val_labels, tar_subdir=a.tar_subdir, progress=not a.no_progress,
        max_file_bytes=a.max_file_bytes, max_inflight_bytes=a.max_inflight_bytes,
        follow_external_links=a.follow_external_links,
    )
    try:
        convert(a.src, a.out_dir, opts)
    except (SourceError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
