"""Reading tar archives that may be hostile: bounded, seekable, never stuck.

Shared by the loader (shards), the shard index (counting samples) and the writer's tar sources. Three guards
around Python's :mod:`tarfile`:

* seekable mode only (``"r:"``) over a local file or a decompressor. Streaming mode (``"r|*"``) skips a member
  by reading it block by block without checking for the end of the data: a PAX header declaring 10^15 bytes
  kept it busy for hours. A seek stops at the end of the file (a decompressor's too).
* :func:`members` checks that every member ends inside the archive when its size is known
  (``offset_data + size <= size``), so a caller reads a member with one bounded ``read``.
* tarfile's own reads (headers, PAX records, GNU long names) go through :class:`_HeaderView`, which refuses a
  header extension over ``MAX_HEADER_BYTES`` and PAX records whose ``=`` lies outside the record: CPython before
  3.11.10 / 3.12.6 parses those with a regex that backtracks over the rest of the header (CVE-2024-6232;
  quadratic: a 256 KiB header took 17 s here).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import tarfile
from typing import BinaryIO, Iterator

BLOCK = tarfile.BLOCKSIZE
MAX_HEADER_BYTES = 1 << 20  # PAX records / GNU long names of one member (real ones are well under 64 KiB)
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


class TarLimitError(tarfile.ReadError):
    """The archive breaks a bound (a member past its end, a huge or malformed header): the rest is not read."""


def compression_of(head: bytes) -> str | None:
    """The compression named by a file's first bytes (``"gzip"``, ``"bzip2"``, ``"xz"``, ``"zstd"``), or None."""
    return next((name for magic, name in COMPRESSED_MAGIC.items() if head.startswith(magic)), None)


def compression(path: str | os.PathLike) -> str | None:
    """The compression of the file at ``path`` (see :func:`compression_of`)."""
    with open(path, "rb") as f:
        return compression_of(f.read(6))


def open_archive(path: str | os.PathLike) -> tuple[BinaryIO, int | None]:
    """Open a plain or gzip / bzip2 / xz compressed tar: (file object, size in bytes or None if compressed)."""
    kind = compression(path)
    if kind is None:
        f = open(path, "rb")
        return f, os.fstat(f.fileno()).st_size
    opener = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}.get(kind)
    if opener is None:
        raise tarfile.ReadError(f"{kind}-compressed archives are not supported")
    return opener(path, "rb"), None


def pax_records_ok(buf: bytes) -> bool:
    """Whether ``buf`` is a sequence of PAX records ``"<length> <key>=<value>\\n"`` (NUL padding after)."""
    pos = 0
    while pos < len(buf) and buf[pos] != 0:
        space = buf.find(b" ", pos, pos + 20)
        if space <= pos or not buf[pos:space].isdigit():
            return False
        end = pos + int(buf[pos:space])
        if end > len(buf) or buf.find(b"=", space + 2, end) < 0:
            return False
        pos = end
    return True


class _HeaderView:
    """``f[start:start + size]`` as a file for tarfile, whose reads are all header reads: a data member is never
    read through it (callers seek the real file). Reads stop at ``size``; see the module docstring."""

    def __init__(self, f: BinaryIO, start: int, size: int | None):
        self.f, self.start, self.size = f, start, size
        self._header = b""

    def tell(self) -> int:
        return self.f.tell() - self.start

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET:
            raise OSError("only absolute seeks")
        return self.f.seek(self.start + pos) - self.start

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > BLOCK + MAX_HEADER_BYTES:
            raise TarLimitError(f"a tar header extension of {n} bytes (over {MAX_HEADER_BYTES})")
        if self.size is not None:
            n = max(0, min(n, self.size - self.tell()))
        data = self.f.read(n)
        if n == BLOCK:
            self._header = data
        elif n > BLOCK and self._header[156:157] in (b"x", b"g") and not pax_records_ok(data):
            raise TarLimitError("a malformed PAX header")
        return data


_NUMERIC_FIELDS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))
# an octal field in its common form: spaces, octal digits, spaces, then a NUL and anything (tarfile reads up to the
# first NUL): it parses; any other form is parsed by _octal (as tarfile's nti would)
_PLAIN_FIELD = re.compile(rb" *[0-7]* *(?:\0[\s\S]*)?")


def _octal(field: bytes) -> int | None:
    """tarfile's ``nti`` for an octal field (None where it would take another branch or fail)."""
    if field[:1] in (b"\x80", b"\xff"):
        return None  # base-256: tarfile's own parser
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None


def _plain_member(buf: bytes, offset: int) -> tarfile.TarInfo | None:
    """The member of a plain regular-file header block (type ``0``, valid unsigned checksum, octal fields), as
    tarfile's ``frombuf`` + ``_proc_builtin`` would build it, or None for anything else (tarfile decides)."""
    if len(buf) != BLOCK or buf[156:157] != tarfile.REGTYPE:
        return None
    chksum, size = _octal(buf[148:156]), _octal(buf[124:136])
    if chksum is None or size is None or chksum != sum(buf) - sum(buf[148:156]) + 256:
        return None
    if not all(_PLAIN_FIELD.fullmatch(buf, a, b) or _octal(buf[a:b]) is not None for a, b in _NUMERIC_FIELDS):
        return None  # mode, uid, gid, mtime, devmajor, devminor: tarfile parses them all and refuses the header
    name = buf[0:100].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
    prefix = buf[345:500].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
    m = tarfile.TarInfo(prefix + "/" + name if prefix else name)
    m.size, m.type, m.offset, m.offset_data = size, tarfile.REGTYPE, offset, offset + BLOCK
    return m


def members(f: BinaryIO, start: int = 0, size: int | None = None) -> Iterator[tarfile.TarInfo]:
    """The members of the tar at ``f[start:start + size]`` (``size`` None: up to the end of a stream), in order,
    with offsets relative to ``start``. Raises :class:`tarfile.TarError` when the rest cannot be read, e.g.
    :class:`TarLimitError` for a member that would end past ``size``.

    With ``size`` known, plain regular-file headers (what tar writers put in shards) are parsed here, in about half
    tarfile's time (profiled: ~25 vs ~50 us per header, three headers per sample); at the first header of any other
    kind (extensions, other types, a bad checksum, a short read; not the end-of-archive block) tarfile reads the
    archive again from the start and takes over after the members already given, so it decides exactly as
    before."""
    off = 0
    if size is not None:
        while off + BLOCK <= size:
            f.seek(start + off)
            buf = f.read(BLOCK)
            if off > 0 and buf == bytes(BLOCK):
                return  # the end-of-archive block (tarfile stops there too, without reading further)
            m = _plain_member(buf, off)
            if m is None:
                break
            if m.offset_data + m.size > size:
                raise TarLimitError(f"member {m.name!r} declares {m.size} bytes, past the end of the archive")
            yield m
            off = m.offset_data + -(-m.size // BLOCK) * BLOCK
            if m.size and off - 1 >= size:
                break  # tarfile raises "unexpected end of data" here
    yield from _tarfile_members(f, start, size, skip_before=off)


def _tarfile_members(f: BinaryIO, start: int, size: int | None, skip_before: int = 0) -> Iterator[tarfile.TarInfo]:
    """:func:`members` by tarfile, leaving out the members whose header starts before ``skip_before``."""
    f.seek(start)  # tarfile starts where the file is
    tf = tarfile.open(fileobj=_HeaderView(f, start, size), mode="r:")
    while (m := tf.next()) is not None:
        tf.members = []  # constant memory over millions of members
        skips_data = tf.offset > m.offset_data  # tarfile steps over this member's data to the next header
        if size is not None and skips_data and m.offset_data + m.size > size:
            raise TarLimitError(f"member {m.name!r} declares {m.size} bytes, past the end of the archive")
        if m.offset >= skip_before:
            yield m


__all__ = ["MAX_HEADER_BYTES", "TarLimitError", "compression", "compression_of", "members", "open_archive",
           "pax_records_ok"]
