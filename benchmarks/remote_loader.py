#!/usr/bin/env python
"""Streaming throughput from an S3-compatible server on loopback vs local files (issue 16).

Data: the Imagenette train shards of ``benchmarks/loader.py`` (same ``--tar`` / ``--cache``; ``--limit N``: its
first N images). moto's S3 server is started in its own process on 127.0.0.1 (found by botocore through
``AWS_ENDPOINT_URL`` only, as a user's S3-compatible store would be), the shards are uploaded, then for each
source -- local files, ``s3://`` streamed, ``s3://`` through ``data.cache_dir`` (the first epoch fills the cache,
the next ones read it) -- this measures:

* ``raw``: :func:`read_raw` over every sample in this process (transfer + tar parsing, no decode): images/s, MB/s;
* ``loader``: a ``ShardLoader`` epoch as ``engine.pretrain`` builds it (decode + crop at ``--size``), per worker
  count: images/s and images/s per worker (the first ``--warmup`` batches untimed).

The server is Python (moto) on the same machine: what it spends per request is CPU the loader then lacks, so the
S3 figures are a lower bound for a real store with the same bandwidth.

    python benchmarks/remote_loader.py --limit 2000 --workers 1,2 --out /tmp/remote.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import loader as bench_loader  # noqa: E402
from common import environment, print_table, write_json  # noqa: E402

BUCKET = "bench-shards"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tar", type=Path, default=bench_loader.DEFAULT_TAR)
    p.add_argument("--cache", type=Path, default=bench_loader.DEFAULT_CACHE, help="as benchmarks/loader.py")
    p.add_argument("--limit", type=int, default=2000, help="first N train images (0: all 9,469)")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="epochs per source and worker count (median)")
    p.add_argument("--write-workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def start_s3() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def time_raw(location: str, cache_dir: str = "") -> dict:
    from mae_curriculum.data.index import load_index
    from mae_curriculum.data.loader import read_raw

    index = load_index(location, cache_dir)
    t0, n, nbytes = time.perf_counter(), 0, 0
    for _, sample in read_raw(index, np.arange(index.num_samples), lambda e: print(e, file=sys.stderr)):
        n += 1
        nbytes += sum(len(v) for v in sample.values())
    dt = time.perf_counter() - t0
    return {"images": n, "seconds": dt, "images_per_s": n / dt, "MB_per_s": nbytes / dt / 1e6}


def time_loader(location: str, workers: int, a, cache_dir: str = "") -> dict:
    from mae_curriculum.data.index import load_index
    from mae_curriculum.data.loader import ShardLoader, StreamSpec
    from mae_curriculum.data.transforms import AugmentConfig

    aug = AugmentConfig(size=a.size, scale=(0.2, 1.0), hflip=0.5, randaug_magnitude=-1.0)  # as engine.pretrain
    spec = StreamSpec(load_index(location, cache_dir), a.batch, 1, 0, workers, 0, a.shuffle_buffer, aug)
    loader = ShardLoader(spec)
    epochs = []
    try:
        for epoch in range(a.repeats):
            steps = loader.start_epoch(epoch)
            epochs.append(bench_loader._time_epoch(loader, min(a.warmup, steps // 2), lambda: None))
    finally:
        loader.close()
    ips = statistics.median(e["images_per_s"] for e in epochs)
    return {"epochs": epochs, "images_per_s": ips, "images_per_s_per_worker": ips / workers}


def main(argv=None) -> int:
    a = parse_args(argv)
    shards, _, _ = bench_loader.ensure_data(a)
    proc, endpoint = start_s3()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    cache = Path(tempfile.mkdtemp(prefix="remote-cache-"))
    try:
        import fsspec

        fs, _ = fsspec.core.url_to_fs(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        url = f"s3://{BUCKET}/train"
        t0 = time.perf_counter()
        for f in sorted(shards.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                fs.put_file(str(f), f"{BUCKET}/train/{f.name}")
        upload_s = time.perf_counter() - t0
        results: dict = {"raw": {}, "loader": {}, "upload_s": upload_s}
        results["raw"]["local"] = time_raw(str(shards))
        results["raw"]["s3"] = time_raw(url)
        results["raw"]["s3_cache_fill"] = time_raw(url, str(cache))
        results["raw"]["s3_cache_hit"] = time_raw(url, str(cache))
        for w in (int(x) for x in a.workers.split(",")):
            shutil.rmtree(cache, ignore_errors=True)
            results["loader"][w] = {"local": time_loader(str(shards), w, a), "s3": time_loader(url, w, a),
                                    "s3_cache": time_loader(url, w, a, str(cache))}
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(cache, ignore_errors=True)
    print_table([{"source": k, **v} for k, v in results["raw"].items()],
                [("source", "raw read (no decode)", "s"), ("images_per_s", "images/s", ".0f"),
                 ("MB_per_s", "MB/s", ".1f")])
    rows = [{"workers": w, "source": k, **v} for w, by in results["loader"].items() for k, v in by.items()]
    print_table(rows,
                [("workers", "workers", "d"), ("source", "source", "s"), ("images_per_s", "images/s", ".0f"),
                 ("images_per_s_per_worker", "images/s/worker", ".0f")], title=f"loader, crop {a.size}")
    if a.out:
        write_json(a.out, {"args": {k: str(v) for k, v in vars(a).items()},
                           "environment": environment(torch.device("cpu")), "shards": str(shards), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
