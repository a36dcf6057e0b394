"""``tarsafe.members`` parses plain regular-file headers itself (the loader's tar reading was ~0.1 ms per sample
through tarfile) and hands any other archive to tarfile from the start: the members it gives, and where and how it
stops, must be tarfile's on every archive, the hostile ones included."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from mae_curriculum.data import tarsafe


def member(name: str, data: bytes, fmt: int = tarfile.PAX_FORMAT, type_: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = len(data), type_
    return info.tobuf(fmt) + data + b"\0" * (-len(data) % 512)


def plain(n: int, start: int = 0) -> bytes:
    return b"".join(member(f"s{i:06d}.jpg", bytes([i % 251]) * (300 + 97 * i)) + member(f"s{i:06d}.cls", b"%d" % i)
                    for i in range(start, start + n))


def bad_checksum(block: bytes) -> bytes:
    return block[:148] + b"0000000\0" + block[156:]


def with_field(block: bytes, at: int, value: bytes) -> bytes:
    """``block`` with ``value`` written at ``at`` in its header and the checksum made valid again."""
    head = block[:at] + value + block[at + len(value):512]
    head = head[:148] + b" " * 8 + head[156:]
    return head[:148] + b"%06o\0 " % sum(head) + head[156:] + block[512:]


def big_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.USTAR_FORMAT)


END = b"\0" * 1024

ARCHIVES = {
    "plain with end blocks": plain(5) + END,
    "plain, no end blocks": plain(5),
    "empty file": b"",
    "end blocks only": END,
    "PAX long name in the middle": plain(3) + member("k" * 150 + ".jpg", b"x" * 700) + plain(2, 3) + END,
    "GNU long name in the middle": plain(2) + member("g" * 120 + ".jpg", b"y" * 10, tarfile.GNU_FORMAT) + plain(1, 2)
    + END,
    "ustar prefix": plain(1) + member("d" * 90 + "/" + "e" * 60 + ".jpg", b"z" * 5, tarfile.USTAR_FORMAT) + END,
    "a directory and an old-style regular file": plain(1) + member("dir", b"", type_=tarfile.DIRTYPE)
    + member("old.jpg", b"q" * 20, type_=tarfile.AREGTYPE) + plain(1, 1) + END,
    "bad checksum in the middle": plain(2) + bad_checksum(member("s000002.jpg", b"w" * 30)) + plain(2, 3) + END,
    "bad checksum first": bad_checksum(member("a.jpg", b"w" * 30)) + plain(1) + END,
    "truncated in the padding": (plain(2) + member("p.jpg", b"u" * 10))[:-400],
    "truncated header": plain(2) + member("h.jpg", b"t")[:300],
    "garbage after the members": plain(2) + b"\x01" * 700,
    "bad octal mode": plain(1) + with_field(member("m.jpg", b"s" * 9), 100, b"9999999\0") + END,
    "base-256 uid": plain(1) + with_field(member("u.jpg", b"r" * 9), 108, b"\x80" + b"\0" * 6 + b"\x05") + plain(1, 1)
    + END,
    "signed mtime": plain(1) + with_field(member("t.jpg", b"p" * 9), 136, b"+17\0") + plain(1, 1) + END,
    "tab in a field": plain(1) + with_field(member("v.jpg", b"o" * 9), 116, b"\t17 2\0") + plain(1, 1) + END,
    "data past the end": plain(2) + big_header("big.jpg", 5000) + b"v" * 100,
}


def listing(fn, raw: bytes, start: int = 0, pad: int = 0) -> list:
    f = io.BytesIO(b"\x07" * start + raw + b"\x07" * pad)
    out: list = []
    try:
        for m in fn(f, start, len(raw)):
            out.append((m.name, m.offset, m.offset_data, m.size, m.type, m.isreg()))
    except tarfile.TarError as e:
        out.append((type(e).__name__, str(e)))
    return out


@pytest.mark.parametrize("name", sorted(ARCHIVES))
def test_the_fast_path_lists_what_tarfile_lists(name):
    raw = ARCHIVES[name]
    for start, pad in ((0, 0), (1536, 512)):  # also inside a larger file (an inner tar of a source archive)
        ref = listing(tarsafe._tarfile_members, raw, start, pad)
        assert listing(tarsafe.members, raw, start, pad) == ref, name
    assert ref or name in ("empty file", "end blocks only", "bad checksum first") or name.startswith("truncated")


def test_the_fast_path_is_taken_for_plain_archives(monkeypatch):
    """A plain archive never reaches tarfile; one with an extension header does, once, from the start."""
    calls = []
    real = tarsafe._tarfile_members

    def spy(f, start, size, skip_before=0):
        calls.append(skip_before)
        yield from real(f, start, size, skip_before)

    monkeypatch.setattr(tarsafe, "_tarfile_members", spy)
    assert len(listing(tarsafe.members, ARCHIVES["plain with end blocks"])) == 10 and calls == []
    listing(tarsafe.members, ARCHIVES["PAX long name in the middle"])
    assert calls == [len(plain(3))]


def test_a_real_shard_file(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(7):
            data = os.urandom(100 + i * 511)
            info = tarfile.TarInfo(f"k{i:03d}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw = path.read_bytes()
    assert listing(tarsafe.members, raw) == listing(tarsafe._tarfile_members, raw)
    assert len(listing(tarsafe.members, raw)) == 7
