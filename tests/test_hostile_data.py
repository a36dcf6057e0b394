"""Hostile or careless data (issue 13, data layer): lying tar headers, huge or compressed members, decompression
bombs, bad labels, bad _info.json, FIFOs / devices / outside links in a writer's source, failing or orphaned
loader workers. Each test builds its small data here; peak memory is measured in a subprocess."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from mae_curriculum.data.eval_loader import EvalLoader
from mae_curriculum.data.index import DataError, load_index
from mae_curriculum.data.loader import ShardLoader, StreamSpec, epoch_order, worker_ids
from mae_curriculum.data.tarsafe import pax_records_ok
from mae_curriculum.data.transforms import AugmentConfig
from mae_curriculum.data.write_shards import ConvertOptions, convert

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


# --------------------------------------------------------------------------------------------------------------
# helpers: tar members written byte by byte, so that they can lie
# --------------------------------------------------------------------------------------------------------------


def jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.PAX_FORMAT) + data + b"\0" * (-len(data) % 512)


def header(name: str, size: int) -> bytes:
    """A header declaring ``size`` bytes (a PAX ``size`` record beyond 8 GiB), with nothing behind it."""
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.PAX_FORMAT)


def sample(i: int, label: object = None, image: bytes | None = None) -> bytes:
    label = i % 10 if label is None else label
    cls = b"" if label == "missing" else member(f"s{i:06d}.cls", str(label).encode())
    return member(f"s{i:06d}.jpg", jpeg(i) if image is None else image) + cls


def write_shard(path: Path, *parts: bytes) -> None:
    path.write_bytes(b"".join(parts) + b"\0" * 1024)


def write_info(folder: Path, lengths: list[int], num_classes: int = 10, **extra) -> None:
    names = [f"train-{k:06d}.tar" for k in range(len(lengths))]
    split = {"name": "train", "num_samples": sum(lengths), "filenames": names, "shard_lengths": lengths}
    info = {"name": "t", "splits": {"train": split}, "num_classes": num_classes, **extra}
    (folder / "_info.json").write_text(json.dumps(info))


def good_shards(folder: Path, lengths: list[int], first: int = 0) -> None:
    """Shards of good samples numbered from ``first``, one per length, plus _info.json."""
    folder.mkdir(parents=True, exist_ok=True)
    i = first
    for k, n in enumerate(lengths):
        write_shard(folder / f"train-{k:06d}.tar", *(sample(j) for j in range(i, i + n)))
        i += n
    write_info(folder, lengths)


def loader_for(folder: Path, batch: int = 4, workers: int = 0, shuffle: int = 16, **spec) -> ShardLoader:
    return ShardLoader(StreamSpec(load_index(folder), batch, 1, 0, workers, 0, shuffle, AugmentConfig(size=SIZE),
                                  **spec))


def epoch(loader: ShardLoader, e: int = 0) -> list[dict]:
    loader.start_epoch(e)
    return list(loader)


def corrupt_and_ids(batches: list[dict]) -> tuple[int, set[int]]:
    """Number of corrupt (replaced) entries and the ids of the samples really delivered."""
    corrupt = sum(int(b["corrupt"].sum()) for b in batches)
    ids = {int(i) for b in batches for i, c in zip(b["id"], b["corrupt"]) if not c}
    return corrupt, ids


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def kill_all(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def py(script: str, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env, **kw)


# --------------------------------------------------------------------------------------------------------------
# item 2: a header that lies about its size; tarfile's PAX regex
# --------------------------------------------------------------------------------------------------------------


def test_pax_member_claiming_1e15_bytes_ends_its_shard_in_seconds_keeping_the_samples_before(tmp_path, caplog):
    """Streaming tarfile skipped the 10^15 declared bytes block by block (~20 h); seekable mode checks the member
    against the file size. A legit PAX header (a 150-character key) still reads."""
    folder = tmp_path / "pax"
    folder.mkdir()
    long_key = "k" * 150
    write_shard(folder / "train-000000.tar", *(sample(i) for i in range(9)),
                member(f"{long_key}.jpg", jpeg(9)) + member(f"{long_key}.cls", b"9"),
                header("s000010.jpg", 10**15))
    write_shard(folder / "train-000001.tar", *(sample(i) for i in range(11, 20)))
    write_info(folder, [11, 9])
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mae_curriculum.data.loader"):
        batches = epoch(loader_for(folder))
    assert time.monotonic() - t0 < 10
    corrupt, ids = corrupt_and_ids(batches)
    assert len(batches) == 5 and corrupt == 1
    assert ids == set(range(20)) - {10}  # every good sample of both shards, the PAX-named one included
    assert any("past the end" in r.getMessage() and "train-000000.tar" in r.getMessage() for r in caplog.records)


def test_index_scan_without_info_json_stops_at_the_lying_member(tmp_path, caplog):
    write_shard(tmp_path / "a.tar", *(sample(i) for i in range(10)), header("s000010.jpg", 10**15))
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mae_curriculum.data.index"):
        index = load_index(tmp_path)
    assert time.monotonic() - t0 < 10 and index.lengths == (10,)
    assert any("past the end" in r.getMessage() for r in caplog.records)


def quadratic_pax(n: int) -> bytes:
    """A PAX header whose records each make CPython < 3.11.10's regex scan to the one '=' at the end
    (CVE-2024-6232: 256 KiB took 17 s, this one ~70 s)."""
    body = b"7 aaaa\n" * (n // 7) + b"9 b=cc\n"
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(body)
    return info.tobuf(tarfile.USTAR_FORMAT) + body + b"\0" * (-len(body) % 512)


def test_malformed_pax_header_is_refused_before_tarfile_parses_it(tmp_path):
    assert pax_records_ok(b"30 path=" + b"a" * 21 + b"\n" + b"\0" * 100)
    assert not pax_records_ok(b"7 aaaa\n7 aaaa\n9 b=cc\n")
    folder = tmp_path / "redos"
    folder.mkdir()
    write_shard(folder / "train-000000.tar", *(sample(i) for i in range(6)), quadratic_pax(512 << 10), sample(6),
                sample(7))
    write_info(folder, [8])
    t0 = time.monotonic()
    batches = epoch(loader_for(folder, batch=2))
    assert time.monotonic() - t0 < 10
    corrupt, ids = corrupt_and_ids(batches)
    assert ids == set(range(6)) and corrupt == 2


WRITER = [sys.executable, "-m", "mae_curriculum.data.write_shards"]


@pytest.mark.parametrize("archive", ["src.tar", "src.tar.gz"])
def test_pax_member_claiming_1e15_bytes_does_not_hang_the_writer(tmp_path, archive):
    good = b"".join(member(f"data/{c}/{i}.jpg", jpeg(10 * k + i)) for k, c in enumerate("ab") for i in range(3))
    raw = good + header("data/b/liar.jpg", 10**15) + b"\0" * 1024
    (tmp_path / archive).write_bytes(gzip.compress(raw) if archive.endswith("gz") else raw)
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.run([*WRITER, str(tmp_path / archive), str(out), "--no-progress"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 60
    report = json.loads((out / "_report.json").read_text())
    assert report["num_written"] == 6  # the good images before the lying member
    reasons = " ".join(s["reason"] for s in report["skipped"])
    assert "past the end" in reasons or "unexpected end" in reasons or "too large" in reasons


# --------------------------------------------------------------------------------------------------------------
# item 2 / 6: loader workers die with their parent, worker errors propagate, close() ends them
# --------------------------------------------------------------------------------------------------------------

WORKER_SCRIPT = r"""
import json, os, sys, time
import mae_curriculum.data.loader as L
from mae_curriculum.data.index import load_index
from mae_curriculum.data.transforms import AugmentConfig
from torch.utils.data import get_worker_info

mode, folder, pid_dir = sys.argv[1:4]


def injected(items, *args, **kwargs):  # test-only stand-in for seeded_shuffle, inherited by the forked workers
    open(os.path.join(pid_dir, str(os.getpid())), "w").close()
    if mode != "spin" and get_worker_info().id == 0:
        deadline = time.monotonic() + 30
        while len(os.listdir(pid_dir)) < 2 and time.monotonic() < deadline:  # both workers up: pids recorded
            time.sleep(0.01)
        raise RuntimeError("injected failure in worker 0")
    while True:  # busy, and deaf to SIGTERM like every loader worker
        pass


L.seeded_shuffle = injected
loader = L.ShardLoader(L.StreamSpec(load_index(folder), 4, 1, 0, 2, 0, 16, AugmentConfig(size=32)))
loader.start_epoch(0)
t0 = time.monotonic()
if mode in ("spin", "exit"):  # the bare DataLoader: no close() on the error path, only the exit hook
    for batch in loader.loader:
        pass
try:
    for batch in loader:
        pass
except RuntimeError as e:
    print(json.dumps({"error": str(e), "seconds": time.monotonic() - t0}), flush=True)
    loader.close()
    loader.close()
    import psutil
    print(json.dumps({"children": [p.pid for p in psutil.Process().children(recursive=True)]}), flush=True)
"""


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small")
    good_shards(folder, [16, 16])
    return folder


def worker_pids(pid_dir: Path, n: int, proc: subprocess.Popen, seconds: float = 60) -> list[int]:
    deadline = time.monotonic() + seconds
    while len(list(pid_dir.iterdir())) < n and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return [int(p.name) for p in pid_dir.iterdir()]


def test_workers_die_with_their_parent_even_when_busy(tmp_path, small_shards):
    """SIGKILL of the main process (a scheduler's time limit): its two busy workers must not live on."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, "spin", str(small_shards), str(pid_dir)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pids = []
    try:
        pids = worker_pids(pid_dir, 2, proc)
        if len(pids) != 2:
            proc.kill()
            pytest.fail(proc.communicate()[1].decode()[-3000:])
        assert all(alive(p) for p in pids)
        proc.kill()
        proc.wait(10)
        assert wait_gone(pids, 5) == []
    finally:
        proc.kill()
        kill_all(pids)


@pytest.mark.parametrize("mode", ["close", "exit"])
def test_worker_error_reaches_the_main_process_and_no_worker_remains(tmp_path, small_shards, mode):
    """Worker 0 raises, worker 1 spins ignoring SIGTERM. "close": ShardLoader re-raises at once and close() (twice)
    leaves no child; "exit": the error leaves the script through the bare DataLoader and the exit hook must end
    the workers (multiprocessing's own hook waited forever on the SIGTERM-deaf worker)."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    try:
        t0 = time.monotonic()
        proc = py(WORKER_SCRIPT, mode, str(small_shards), str(pid_dir), timeout=90)
        elapsed = time.monotonic() - t0
        pids = [int(p.name) for p in pid_dir.iterdir()]
        assert len(pids) == 2 and "injected failure in worker 0" in proc.stdout + proc.stderr, proc.stderr[-3000:]
        if mode == "close":
            assert proc.returncode == 0, proc.stderr
            lines = [json.loads(x) for x in proc.stdout.splitlines()]
            assert lines[0]["seconds"] < 10 and lines[1]["children"] == []
        else:
            assert proc.returncode == 1 and "Traceback" in proc.stderr
        assert elapsed < 60
        assert wait_gone(pids, 5) == []
    finally:
        kill_all([int(p.name) for p in pid_dir.iterdir() if alive(int(p.name))])


def test_shuffle_buffer_zero_means_no_shuffle_buffer(small_shards):
    """data.shuffle_buffer=0 raised ``ValueError: high <= 0`` in the worker; now the plan order comes out as is."""
    loader = loader_for(small_shards, batch=4, workers=1, shuffle=0)
    try:
        batches = epoch(loader, 3)
    finally:
        loader.close()
    ids = torch.cat([b["id"] for b in batches]).numpy()
    plan = worker_ids(epoch_order(loader.spec.index, 0, 3), 1, 0, 4, 1, 0)
    assert len(batches) == 8 and np.array_equal(ids, plan)


# --------------------------------------------------------------------------------------------------------------
# item 3 / 9: bytes and pixels read before validation; peak memory measured in a subprocess
# --------------------------------------------------------------------------------------------------------------


def png_bomb(side: int) -> bytes:
    """A real side x side greyscale PNG of zeros (13000: 169 Mpixels, under PIL's limit; ~0.7 MB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    c, rows = zlib.compressobj(1), b"\0" * (side + 1) * 512
    idat = b"".join([c.compress(rows) for _ in range(side // 512)]
                    + [c.compress(b"\0" * (side + 1) * (side % 512)), c.flush()])
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def gzip_shard(member_mib: int) -> bytes:
    """A gzip of a tar holding one all-zero member of ``member_mib`` MiB (256: a 1.1 MB file)."""
    c, zeros = zlib.compressobj(1, zlib.DEFLATED, 31), b"\0" * (1 << 20)  # wbits 31: gzip framing
    parts = [c.compress(header("s000000.jpg", member_mib << 20))] + [c.compress(zeros) for _ in range(member_mib)]
    return b"".join([*parts, c.compress(member("s000000.cls", b"0") + b"\0" * 1024), c.flush()])


def sparse_member_shard(path: Path, declared: int) -> None:
    """s000000.jpg of ``declared`` bytes (a sparse hole: no disk used), then good sample 1."""
    with open(path, "wb") as f:
        f.write(header("s000000.jpg", declared))
        f.seek(f.tell() + declared + (-declared % 512))
        f.write(sample(1) + b"\0" * 1024)


RSS_SCRIPT = r"""
import json, resource, sys, time
from pathlib import Path
from mae_curriculum.data.index import load_index
from mae_curriculum.data.loader import ShardLoader, StreamSpec
from mae_curriculum.data.transforms import AugmentConfig

out = {}
for folder in sys.argv[1:]:  # the first (clean) warms up imports, decoders and the allocator
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loader = ShardLoader(StreamSpec(load_index(folder), 4, 1, 0, 0, 0, 16, AugmentConfig(size=32)))
    loader.start_epoch(0)
    t0 = time.monotonic()
    batches = list(loader)
    out[Path(folder).name] = {"seconds": time.monotonic() - t0,
                              "corrupt": sum(int(b["corrupt"].sum()) for b in batches),
                              "growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def loader_rss(tmp_path_factory) -> dict:
    """One subprocess streams an epoch of each folder (workers=0: everything in that process) and reports the
    growth of its peak RSS, the seconds and the corrupt count per folder."""
    root = tmp_path_factory.mktemp("rss")
    good_shards(root / "clean", [8, 8])
    good_shards(root / "bomb", [3, 5], first=1)
    write_shard(root / "bomb" / "train-000000.tar", sample(0, image=png_bomb(13000)), sample(1), sample(2))
    good_shards(root / "gzip", [1, 7])
    (root / "gzip" / "train-000000.tar").write_bytes(gzip_shard(256))
    good_shards(root / "member", [2, 6])
    sparse_member_shard(root / "member" / "train-000000.tar", 5 << 30)
    proc = py(RSS_SCRIPT, *(str(root / n) for n in ("clean", "bomb", "gzip", "member")), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_decompression_bomb_under_pils_limit_is_refused_from_its_header(loader_rss):
    """A 13000x13000 PNG (0.7 MB) cost 5 s and +1.6 GiB per worker; the limit now follows the training size."""
    r = loader_rss["bomb"]
    assert r["corrupt"] == 1 and r["seconds"] < 3 and r["growth_mb"] < 40, r


def test_gzip_shard_named_tar_is_refused_not_inflated(loader_rss):
    """256 MiB of zeros in a 1.1 MB gzip named .tar (the issue's 512 MiB one added ~1 GiB per worker)."""
    r = loader_rss["gzip"]
    assert r["corrupt"] == 1 and r["seconds"] < 3 and r["growth_mb"] < 40, r


def test_member_over_the_byte_limit_is_corrupt_unread_and_the_shard_goes_on(loader_rss):
    """A 5 GiB member (a sparse hole): counted corrupt without a byte read; the sample after it is used."""
    r = loader_rss["member"]
    assert r["corrupt"] == 1 and r["seconds"] < 3 and r["growth_mb"] < 40, r


def test_member_limit_is_configurable(tmp_path):
    good_shards(tmp_path / "s", [8])
    with pytest.raises(RuntimeError, match="none of its 8 samples"):  # every JPEG is over 100 bytes
        epoch(loader_for(tmp_path / "s", max_member_bytes=100))


WRITER_RSS = r"""
import json, resource, sys
from mae_curriculum.data.write_shards import ConvertOptions, convert

warm, big, out = sys.argv[1:4]
opts = dict(workers=2, samples_per_shard=100)
convert(warm, out + "/warm", ConvertOptions(**opts))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = convert(big, out + "/big", ConvertOptions(max_inflight_bytes=16 << 20, **opts))
growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"growth_mb": growth, "written": report["num_written"], "skipped": len(report["skipped"])}))
"""


def test_writer_bounds_the_bytes_in_flight(tmp_path):
    """12 non-images of 16 MiB each: the old writer held a whole 32-file task (+ its pickled copy) at once."""
    for root, big in ((tmp_path / "warm", 0), (tmp_path / "big", 12)):
        for c in "ab":
            (root / c).mkdir(parents=True)
            for i in range(2):
                (root / c / f"{i}.jpg").write_bytes(jpeg(i))
        for i in range(big):
            with open(root / "ab"[i % 2] / f"zeros{i}.jpg", "wb") as f:
                f.truncate(16 << 20)
    proc = py(WRITER_RSS, str(tmp_path / "warm"), str(tmp_path / "big"), str(tmp_path / "out"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.splitlines()[-1])
    assert r["written"] == 4 and r["skipped"] == 12
    assert r["growth_mb"] < 120, r  # unbounded: ~400 MB


def test_writer_reads_only_regular_files_of_bounded_size(tmp_path):
    """A FIFO named .jpg blocked the writer forever, /dev/zero behind a .jpg link ran it out of memory, a huge
    file was read whole: each is now skipped from its metadata, with its reason in _report.json."""
    src = tmp_path / "src"
    for c in "ab":
        (src / c).mkdir(parents=True)
        for i in range(2):
            (src / c / f"{i}.jpg").write_bytes(jpeg(i))
    os.mkfifo(src / "a" / "fifo.jpg")
    (src / "a" / "zero.jpg").symlink_to("/dev/zero")
    with open(src / "b" / "huge.jpg", "wb") as f:
        f.truncate(2 << 30)
    reasons = {}
    for flag in ([], ["--follow-external-links"]):
        out = tmp_path / f"out{len(flag)}"
        proc = subprocess.run([*WRITER, str(src), str(out), "--no-progress", "--max-file-bytes", str(1 << 20), *flag],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        report = json.loads((out / "_report.json").read_text())
        assert report["num_written"] == 4
        reasons[len(flag)] = {s["path"]: s["reason"] for s in report["skipped"]}
    assert "outside SRC" in reasons[0]["a/zero.jpg"] and "not a regular file" in reasons[1]["a/zero.jpg"]
    for r in reasons.values():
        assert "not a regular file" in r["a/fifo.jpg"] and "too large" in r["b/huge.jpg"]


# --------------------------------------------------------------------------------------------------------------
# item 4: labels
# --------------------------------------------------------------------------------------------------------------

BAD_LABELS = {3: 99999, 5: -7, 8: "abc", 11: "missing"}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("labels")
    write_shard(folder / "train-000000.tar", *(sample(i, BAD_LABELS.get(i)) for i in range(16)))
    write_info(folder, [16])
    return folder


def test_bad_labels_are_corrupt_in_finetuning_and_ignored_in_pretraining(labelled):
    ft_corrupt, ft_ids = corrupt_and_ids(epoch(loader_for(labelled, num_classes=10, require_labels=True)))
    assert ft_corrupt == len(BAD_LABELS) and ft_ids == set(range(16)) - set(BAD_LABELS)
    pre = epoch(loader_for(labelled, num_classes=10))
    pre_corrupt, pre_ids = corrupt_and_ids(pre)
    assert pre_corrupt == 0 and pre_ids == set(range(16))  # "abc" no longer costs a good image
    labels = {int(i): int(lab) for b in pre for i, lab in zip(b["id"], b["label"])}
    assert all(labels[i] == -1 for i in BAD_LABELS) and all(labels[i] == i % 10 for i in labels if i not in BAD_LABELS)


def test_eval_loader_counts_bad_labels_as_unreadable_not_as_misses(labelled):
    for workers in (0, 1):
        loader = EvalLoader(load_index(labelled), 6, 1, 0, SIZE, num_workers=workers)  # num_classes from _info.json
        try:
            batches = list(loader)
        finally:
            loader.close()
        valid = torch.cat([b["valid"] for b in batches])
        labels = torch.cat([b["label"] for b in batches])
        assert sum(int(b["unreadable"]) for b in batches) == len(BAD_LABELS)
        assert int(valid.sum()) == 16 - len(BAD_LABELS)
        assert ((labels[valid] >= 0) & (labels[valid] < 10)).all() and (labels[~valid] == -1).all()


# --------------------------------------------------------------------------------------------------------------
# item 5: _info.json
# --------------------------------------------------------------------------------------------------------------


def _bad_info(kind: str) -> dict:
    split = {"filenames": ["train-000000.tar", "train-000001.tar"], "shard_lengths": [8, 8], "num_samples": 16}
    info = {"splits": {"train": split}, "num_classes": 10}
    change = {
        "negative": lambda: split.update(shard_lengths=[8, -3], num_samples=5),
        "huge": lambda: split.update(shard_lengths=[8, 10**12], num_samples=8 + 10**12),
        "float": lambda: split.update(shard_lengths=[8, 1e12]),
        "string": lambda: split.update(shard_lengths=[8, "8"]),
        "count": lambda: split.update(shard_lengths=[16]),
        "sum": lambda: split.update(num_samples=17),
        "room": lambda: split.update(shard_lengths=[8, 5000], num_samples=5008),
        "twice": lambda: split.update(filenames=["train-000000.tar", "train-000000.tar"]),
        "classes_huge": lambda: info.update(num_classes=10**9),
        "classes_type": lambda: info.update(num_classes="ten"),
        "classes_list": lambda: info.update(classes=["a", "b"]),
        "no_splits": lambda: info.pop("splits"),
    }
    change[kind]()
    return info


BAD_INFO = {"negative": "train-000001.tar", "huge": "train-000001.tar", "float": "shard_lengths",
            "string": "shard_lengths", "count": "differ in length", "sum": "num_samples", "room": "train-000001.tar",
            "twice": "twice", "classes_huge": "num_classes", "classes_type": "num_classes",
            "classes_list": "num_classes", "no_splits": "splits"}


@pytest.mark.parametrize("kind", sorted(BAD_INFO))
def test_bad_info_json_gives_one_clear_error_naming_the_shard_or_key(tmp_path, kind):
    good_shards(tmp_path, [8, 8])
    (tmp_path / "_info.json").write_text(json.dumps(_bad_info(kind)))
    with pytest.raises(DataError, match=BAD_INFO[kind]) as e:
        load_index(tmp_path)
    assert "_info.json" in str(e.value) and "\n" not in str(e.value)


def test_shard_holding_more_samples_than_declared_is_reported(tmp_path, caplog):
    good_shards(tmp_path, [12, 8])
    write_info(tmp_path, [10, 8])  # two samples of shard 0 are never used
    with caplog.at_level(logging.WARNING, logger="mae_curriculum.data.loader"):
        batches = epoch(loader_for(tmp_path, batch=2))
    assert len(batches) == 9 and corrupt_and_ids(batches)[0] == 0
    assert any("holds more samples than the 10" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------------------------
# item 8: the writer and symbolic links out of SRC
# --------------------------------------------------------------------------------------------------------------


def test_writer_refuses_links_out_of_src_unless_asked(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for i in range(3):
        (outside / f"{i}.jpg").write_bytes(jpeg(100 + i))
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    for i in range(2):
        (src / "a" / f"{i}.jpg").write_bytes(jpeg(i))
    (src / "a" / "copy.jpg").symlink_to(src / "a" / "0.jpg")  # inside SRC: fine
    (src / "a" / "stolen.jpg").symlink_to(outside / "0.jpg")
    (src / "b").symlink_to(outside, target_is_directory=True)
    report = convert(src, tmp_path / "out", ConvertOptions())
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert report["num_written"] == 3 and set(skipped) == {"a/stolen.jpg", "b"}
    assert all("outside SRC" in r for r in skipped.values())
    assert json.loads((tmp_path / "out" / "_report.json").read_text())["skipped"] == report["skipped"]
    report = convert(src, tmp_path / "out2", ConvertOptions(follow_external_links=True))
    assert report["num_written"] == 7 and report["skipped"] == []
