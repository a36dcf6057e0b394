"""Readers for the input layouts of the shard writer.

A source is opened in two passes. :func:`open_source` makes the first one: it lists every image file with its
class (cheap: names and offsets only) so that the class list, the sample count and an optional shuffle are
known before anything is written. :meth:`Source.read` makes the second one and yields the raw bytes.

Layouts (``--format``)
----------------------
``imagefolder``
    ``SRC/<class>/<image>``; one extra level ``SRC/<class>/<subdir>/<image>`` is accepted (ImageNet-22K style
    trees, per-class sub-folders), deeper levels are not searched. Images directly in ``SRC`` are reported.
``tar``
    A ``.tar`` / ``.tar.gz`` / ``.tgz`` / ``.tar.bz2`` / ``.tar.xz`` holding such a tree, possibly under
    top-level folders. ``tar_subdir`` names the folder whose children are the classes; without it the reader
    descends while all images sit under one single folder and at least two levels below it. It is never
    unpacked: plain tars are read by offset (random access), compressed ones through a decompressor, in
    offset order.
``imagenet-train-tar``
    The official ILSVRC2012 train tar: a tar of per-class tars ``n01440764.tar`` holding JPEGs; the class is
    the inner tar's name. Read nested, never unpacked.
``imagenet-val``
    A flat folder of images plus a labels file (see :func:`parse_val_labels`).

``auto`` picks: a tar file whose first image-or-tar member is a ``.tar`` -> imagenet-train-tar, other tar
files -> tar; a folder with ``val_labels`` -> imagenet-val; any other folder -> imagefolder.

A tree whose top folders include split names (train, val, test, ...) with class folders below is refused
with a message naming the ``--tar-subdir`` to use (or the split folder to point SRC at).

Classes are the class folders (or inner tars) that hold at least one image file, sorted like Python
``sorted`` (torchvision's ImageFolder order). Only files with an image suffix (see ``IMAGE_SUFFIXES``) are
read; other files and hidden names (``.DS_Store``, ``._x.jpg``) are counted as ignored. Folder and ImageNet
sources are listed in sorted path order; tar sources keep the archive order.

Untrusted sources: only regular files are read (a FIFO or a device behind an image name is skipped, never
waited on), each at most ``max_file_bytes``; symbolic links (files or folders) that resolve outside SRC are
skipped unless ``follow_links``; tars are read in seekable mode with every member bounded
(:mod:`~mae_curriculum.data.tarsafe`): an archive that cannot be read further keeps the files listed before
that point and reports the rest. Skipped files are listed with their reason in ``_report.json``.
"""

from __future__ import annotations

import lzma
import os
import re
import stat
import sys
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from mae_curriculum.data.tarsafe import compression, members, open_archive

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
SPLIT_NAMES = frozenset({"train", "val", "validation", "test", "dev"})
FORMATS = ("auto", "imagefolder", "tar", "imagenet-train-tar", "imagenet-val")
MAX_FILE_BYTES = 64 << 20  # default bound on the bytes of one source file
_ARCHIVE_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)

Raw = tuple[int, "bytes | None", "str | None"]  # (entry index, data, error reason)


class SourceError(ValueError):
    """A layout problem the user can fix (wrong folder, unknown class, missing labels)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One image of a source.

    ``path`` is relative to SRC (a file path, a tar member name, or ``inner.tar/member`` for nested tars);
    ``offset``/``size`` locate the bytes inside a (decompressed) tar; ``seq`` is the file's position in the
    source's natural traversal.
    """

    path: str
    class_name: str
    offset: int = -1
    size: int = -1
    seq: int = -1


@dataclass
class Source:
    """A listed source: its entries (in natural order) and the files skipped while listing."""

    src: Path
    format: str
    entries: list[Entry]
    skipped: list[dict] = field(default_factory=list)
    ignored: int = 0
    max_file_bytes: int = MAX_FILE_BYTES  # a larger file is skipped ("too large"), never read

    @property
    def classes(self) -> list[str]:
        return sorted({e.class_name for e in self.entries})

    def read(self, order: Sequence[int]) -> Iterator[Raw]:
        """Yield ``(index, bytes, None)`` or ``(index, None, reason)`` for the entries in ``order``."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------------------
# tree layouts (folder and tar): which level holds the classes
# --------------------------------------------------------------------------------------------------------------


def _parts(path: str) -> list[str]:
    return [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]


def _is_image_name(parts: list[str]) -> bool:
    hidden = any(p.startswith(".") for p in parts)
    return bool(parts) and not hidden and Path(parts[-1]).suffix.lower() in IMAGE_SUFFIXES


def _descend(rels: list[list[str]]) -> list[str]:
    """Common leading folders to skip: descend while every path shares one folder and stays >= 3 deep."""
    prefix: list[str] = []
    while rels and len({r[0] for r in rels}) == 1 and min(len(r) for r in rels) >= 3:
        prefix.append(rels[0][0])
        rels = [r[1:] for r in rels]
    return prefix


def _check_not_splits(rels: list[list[str]], prefix: list[str], where: str) -> None:
    """Refuse ``<split>/<class>/<image>`` trees (train/val/test folders mistaken for classes)."""
    tops = sorted({r[0] for r in rels if len(r) >= 3})
    splits = [t for t in tops if t.lower() in SPLIT_NAMES]
    if splits:
        raise SourceError(
            f"{where} looks like a folder of splits ({', '.join(splits)}), not of classes: point SRC at one "
            f"split (for a tar: --tar-subdir {'/'.join([*prefix, splits[0]])})"
        )


def tree_entries(
    files: Sequence[tuple[str, int, int]], prefix: str | None, auto_descend: bool, where: str
) -> tuple[list[Entry], list[dict], int]:
    """Entries (class = first folder under the class root) from ``(path, offset, size)`` listings.

    Returns ``(entries, skipped, ignored)``: ``skipped`` lists image files outside a class folder or nested
    too deep; ``ignored`` counts non-image / hidden files.
    """
    pre = _parts(prefix or "")
    images, ignored = [], 0
    for seq, (path, offset, size) in enumerate(files):
        parts = _parts(path)
        if parts[: len(pre)] != pre:
            continue
        if _is_image_name(parts):
            images.append((parts[len(pre) :], path, offset, size, seq))
        else:
            ignored += 1
    if not images:
        raise SourceError(f"no image files found in {where}" + (f" under {prefix!r}" if prefix else ""))
    if auto_descend and not pre:
        pre = _descend([img[0] for img in images])
        images = [(rel[len(pre) :], *rest) for rel, *rest in images]
    _check_not_splits([img[0] for img in images], pre, where)
    entries, skipped = [], []
    for rel, path, offset, size, seq in images:
        if len(rel) == 1:
            skipped.append({"path": path, "reason": "not inside a class folder"})
        elif len(rel) > 3:
            skipped.append({"path": path, "reason": "nested more than one level below its class folder"})
        else:
            entries.append(Entry(path, rel[0], offset, size, seq))
    return entries, skipped, ignored


# --------------------------------------------------------------------------------------------------------------
# folders
# --------------------------------------------------------------------------------------------------------------


class FolderSource(Source):
    """Files under a folder, read with :func:`read_regular`."""

    def read(self, order: Sequence[int]) -> Iterator[Raw]:
        for i in order:
            yield (i, *read_regular(self.src / self.entries[i].path, self.max_file_bytes))


def too_large(size: int, limit: int) -> str:
    return f"too large: {size} bytes (over --max-file-bytes {limit})"


def read_regular(path: Path, limit: int) -> tuple[bytes | None, str | None]:
    """(bytes, None) of the regular file at ``path`` if it has at most ``limit`` bytes, else (None, reason).
    Anything else (FIFO, device, socket) is refused from its metadata, never opened for a blocking read."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None, "not a regular file"
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:  # non-blocking: swapped for a FIFO
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None, "not a regular file"
            if st.st_size > limit:
                return None, too_large(st.st_size, limit)
            data = f.read(limit + 1)
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    return (data, None) if len(data) <= limit else (None, too_large(len(data), limit))


def external_link(root: Path, path: Path) -> str | None:
    """Why ``path`` (inside ``root``, which is resolved) must be skipped: a symbolic link that resolves outside
    ``root``; None for anything else."""
    if not path.is_symlink():
        return None
    real = path.resolve()
    if real == root or root in real.parents:
        return None
    kind = "folder" if real.is_dir() else "file"
    return f"symbolic link to a {kind} outside SRC ({real}); pass --follow-external-links to read it"


def _walk_folder(root: Path, follow_links: bool = False, max_depth: int = 3) -> tuple[list[str], list[dict]]:
    """Relative paths of all files at most ``max_depth`` levels below ``root`` (symlinks followed), sorted, and
    the links skipped because they resolve outside ``root`` (unless ``follow_links``), as report entries."""
    real_root, out, refused = root.resolve(), [], []

    def allowed(path: Path) -> bool:
        reason = None if follow_links else external_link(real_root, path)
        if reason is not None:
            refused.append({"path": path.relative_to(root).as_posix(), "reason": reason})
        return reason is None

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        keep = sorted(d for d in dirnames if not d.startswith(".")) if depth < max_depth - 1 else []
        dirnames[:] = [d for d in keep if allowed(here / d)]
        out.extend((here / f).relative_to(root).as_posix() for f in filenames if allowed(here / f))
    return sorted(out), sorted(refused, key=lambda r: r["path"])


def open_imagefolder(root: Path, follow_links: bool = False) -> FolderSource:
    paths, refused = _walk_folder(root, follow_links)
    entries, skipped, ignored = tree_entries([(p, -1, -1) for p in paths], None, auto_descend=False, where=str(root))
    entries.sort(key=lambda e: (e.class_name, e.path))
    return FolderSource(root, "imagefolder", entries, refused + skipped, ignored)


# --------------------------------------------------------------------------------------------------------------
# tars
# --------------------------------------------------------------------------------------------------------------


def _tar_files(path: Path, nested: bool, errors: list[dict]) -> Iterator[tuple[str, int, int]]:
    """``(name, offset, size)`` of each regular file of the archive (of its inner tars if ``nested``), offsets
    into the (decompressed) archive. An unreadable inner tar is appended to ``errors`` and skipped; where the
    archive itself cannot be read further, this raises (after the files before that point)."""
    f, size = open_archive(path)
    with f:
        for m in members(f, 0, size):
            if not m.isreg():
                continue
            if not nested:
                yield m.name, m.offset_data, m.size
            elif m.name.endswith(".tar"):
                yield from _inner_files(f, m, errors)


def _inner_files(f, m: tarfile.TarInfo, errors: list[dict]) -> Iterator[tuple[str, int, int]]:
    try:
        for im in members(f, m.offset_data, m.size):
            if im.isreg():
                yield f"{m.name}/{im.name}", m.offset_data + im.offset_data, im.size
    except tarfile.TarError as e:
        errors.append({"path": m.name, "reason": f"unreadable inner tar: {e}"})


def _first_member(path: Path) -> str:
    """Name of the first image or ``.tar`` file in the archive (for format detection)."""
    try:
        for name, _, _ in _tar_files(path, False, []):
            if name.endswith(".tar") or _is_image_name(_parts(name)):
                return name
    except _ARCHIVE_ERRORS:
        pass
    return ""


@dataclass
class TarSource(Source):
    """A tar of images (``nested``: a tar of per-class tars), read by offset (a compressed one in offset order)."""

    nested: bool = False
    compressed: bool = False

    def read(self, order: Sequence[int]) -> Iterator[Raw]:
        order = list(order)
        if not self.compressed or order == sorted(order):
            yield from self._read_at(order)
            return
        print(f"note: shuffling a compressed tar buffers {self.src} in memory", file=sys.stderr)
        buffered = {i: (data, err) for i, data, err in self._read_at(sorted(order))}
        for i in order:
            yield (i, *buffered.pop(i))

    def _read_at(self, order: list[int]) -> Iterator[Raw]:
        """Seek and read each entry (forward only when ``order`` ascends: one pass through a compressed tar)."""
        f, _ = open_archive(self.src)
        with f:
            for n, i in enumerate(order):
                e = self.entries[i]
                if e.size > self.max_file_bytes:
                    yield i, None, too_large(e.size, self.max_file_bytes)
                    continue
                try:
                    f.seek(e.offset)
                    data = f.read(e.size)
                except _ARCHIVE_ERRORS as err:
                    for j in order[n:]:
                        yield j, None, f"unreadable archive: {type(err).__name__}: {err}"
                    return
                yield (i, data, None) if len(data) == e.size else (i, None, "truncated inside the archive")


def _list_tar(path: Path, nested: bool) -> tuple[list[tuple[str, int, int]], list[dict]]:
    errors: list[dict] = []
    files: list[tuple[str, int, int]] = []
    try:
        files.extend(_tar_files(path, nested, errors))
    except _ARCHIVE_ERRORS as e:
        if not files:
            raise SourceError(f"{path}: unreadable or truncated archive ({type(e).__name__}: {e})") from None
        errors.append({"path": path.name, "reason": f"archive unreadable after its first {len(files)} files "
                                                    f"({type(e).__name__}: {e}): the rest is skipped"})
    return files, errors


def open_tar(path: Path, tar_subdir: str | None) -> TarSource:
    files, errors = _list_tar(path, nested=False)
    entries, skipped, ignored = tree_entries(files, tar_subdir, auto_descend=True, where=str(path))
    return TarSource(path, "tar", entries, errors + skipped, ignored, nested=False,
                     compressed=compression(path) is not None)


def open_imagenet_train_tar(path: Path) -> TarSource:
    files, errors = _list_tar(path, nested=True)
    entries, ignored = [], 0
    for seq, (name, offset, size) in enumerate(files):
        inner_tar, _, member = name.partition(".tar/")
        if _is_image_name(_parts(member)):
            entries.append(Entry(name, Path(inner_tar).name, offset, size, seq))
        else:
            ignored += 1
    if not entries:
        raise SourceError(f"no images found inside the per-class tars of {path}")
    return TarSource(path, "imagenet-train-tar", entries, errors, ignored, nested=True,
                     compressed=compression(path) is not None)


# --------------------------------------------------------------------------------------------------------------
# ImageNet validation layout
# --------------------------------------------------------------------------------------------------------------


def _class_of(token: str, classes: Sequence[str] | None, one_based: bool, where: str) -> str:
    if not token.lstrip("-").isdigit():
        return token
    if classes is None:
        raise SourceError(f"{where}: integer labels need --class-index to map them to class names")
    idx = int(token) - (1 if one_based else 0)
    if not 0 <= idx < len(classes):
        raise SourceError(f"{where}: label {token} is out of range for a class index of {len(classes)} classes")
    return classes[idx]


def parse_val_labels(path: Path, filenames: Sequence[str], classes: Sequence[str] | None) -> dict[str, str]:
    """Map image file names to class names from a labels file.

    Two forms (blank lines and ``#`` comments ignored, fields split on whitespace or commas):

    * ``<filename> <label>`` per line: ``filename`` with or without its extension, ``label`` a class name
      (synset) or a 0-based index into the class index. Lines naming no file in the folder (a CSV header)
      are ignored.
    * one ``<label>`` per line, in sorted-filename order (ILSVRC2012_validation_ground_truth.txt): a class name
      or a 1-BASED index into the class index. Note the official file holds ILSVRC2012_IDs, which are NOT in
      sorted-synset order: pass ``--class-index`` listing the synsets in ILSVRC2012_ID order (from the devkit's
      meta.mat) or convert the file to ``<filename> <synset>`` lines first.
    """
    rows = [re.split(r"[\s,]+", ln.strip()) for ln in path.read_text().splitlines()]
    rows = [r for r in rows if r and r[0] and not r[0].startswith("#")]
    widths = {len(r) >= 2 for r in rows}
    if not rows:
        raise SourceError(f"{path}: no labels")
    if widths == {False}:
        if len(rows) != len(filenames):
            raise SourceError(f"{path}: {len(rows)} labels for {len(filenames)} images (one label per line form)")
        return {f: _class_of(r[0], classes, True, str(path)) for f, r in zip(sorted(filenames), rows)}
    if widths != {True}:
        raise SourceError(f"{path}: mixes '<filename> <label>' lines with single-label lines")
    by_name = {f: f for f in filenames} | {Path(f).stem: f for f in filenames}
    return {by_name[r[0]]: _class_of(r[1], classes, False, str(path)) for r in rows if r[0] in by_name}


def open_imagenet_val(root: Path, labels_file: Path, classes: Sequence[str] | None,
                      follow_links: bool = False) -> FolderSource:
    real_root = root.resolve()
    files = sorted(p for p in root.iterdir() if p.is_file())
    refused = {} if follow_links else {p.name: r for p in files if (r := external_link(real_root, p)) is not None}
    names = [p.name for p in files if p.name not in refused]
    images = [n for n in names if _is_image_name([n])]
    labels = parse_val_labels(labels_file, images, classes)
    entries = [Entry(n, labels[n]) for n in images if n in labels]
    skipped = [{"path": n, "reason": r} for n, r in refused.items()]
    skipped += [{"path": n, "reason": f"no label in {labels_file.name}"} for n in images if n not in labels]
    if not entries:
        raise SourceError(f"no labelled images in {root} (labels from {labels_file})")
    return FolderSource(root, "imagenet-val", entries, skipped, len(names) - len(images))


# --------------------------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------------------------


def _looks_like_tar(path: Path) -> bool:
    try:
        f, size = open_archive(path)
        with f:
            next(members(f, 0, size), None)
        return True
    except _ARCHIVE_ERRORS:
        return False


def is_tar_path(path: Path) -> bool:
    return path.is_file() and (path.name.lower().endswith(TAR_SUFFIXES) or _looks_like_tar(path))


def detect_format(src: Path, val_labels: str | None) -> str:
    """The layout of ``src`` for ``--format auto`` (see the module docstring)."""
    if is_tar_path(src):
        return "imagenet-train-tar" if _first_member(src).endswith(".tar") else "tar"
    if not src.is_dir():
        raise SourceError(f"SRC is neither a folder nor a tar archive: {src}")
    if val_labels:
        return "imagenet-val"
    if not any(p.is_dir() and not p.name.startswith(".") for p in src.iterdir()):
        raise SourceError(f"{src} holds no class folders; for a flat ImageNet-val folder pass --val-labels FILE")
    return "imagefolder"


def open_source(
    src: str | Path,
    fmt: str = "auto",
    tar_subdir: str | None = None,
    val_labels: str | Path | None = None,
    classes: Sequence[str] | None = None,
    *,
    follow_links: bool = False,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> Source:
    """Detect (if ``fmt == "auto"``) and list ``src``. ``classes`` maps integer val labels to names;
    ``follow_links`` reads symbolic links that lead outside ``src``; a file over ``max_file_bytes`` is skipped."""
    source = _open_source(Path(src), fmt, tar_subdir, val_labels, classes, follow_links)
    source.max_file_bytes = max_file_bytes
    return source


def _open_source(src: Path, fmt: str, tar_subdir: str | None, val_labels: str | Path | None,
                 classes: Sequence[str] | None, follow_links: bool) -> Source:
    if not src.exists():
        raise SourceError(f"SRC not found: {src}")
    if fmt not in FORMATS:
        raise SourceError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    fmt = detect_format(src, str(val_labels) if val_labels else None) if fmt == "auto" else fmt
    if fmt == "imagefolder":
        return open_imagefolder(src, follow_links)
    if fmt == "tar":
        return open_tar(src, tar_subdir)
    if fmt == "imagenet-train-tar":
        return open_imagenet_train_tar(src)
    if not val_labels:
        raise SourceError("--format imagenet-val needs --val-labels FILE")
    return open_imagenet_val(src, Path(val_labels), classes, follow_links)
