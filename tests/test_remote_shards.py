"""Shards in object storage and on a web server (issue 16, item 1), against real servers on 127.0.0.1: moto's S3
server (botocore finds it through AWS_ENDPOINT_URL alone) and Python's http.server."""

from __future__ import annotations

import functools
import http.server
import logging
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, pretrain_cmd, read_json, run
from mae_curriculum.config import ConfigError, PretrainConfig, load_config
from mae_curriculum.data import remote
from mae_curriculum.data.index import DataError, load_index
from mae_curriculum.data.loader import ShardLoader, StreamSpec, epoch_order, read_raw, worker_ids
from mae_curriculum.data.transforms import AugmentConfig
from mae_curriculum.data.write_shards import Sample, write_samples

pytest.importorskip("s3fs", reason="the s3 extra: pip install -e '.[s3]'")
moto_server = pytest.importorskip("moto.server", reason="moto[server] (in the dev extra)")

BUCKET = "shards"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port, reached through the standard AWS_* variables only."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    yield f"s3://{BUCKET}"
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """http.server's file handler (no Range support), counting GETs per path; ``faults[path]`` = (mode, n):
    ``"503"`` answers 503 to the first n GETs (n < 0: to all), ``"cut"`` sends half the body of the first n."""

    counts: Counter
    faults: dict

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.counts[self.path] += 1
        mode, n = self.faults.get(self.path, (None, 0))
        if mode == "503" and (n < 0 or self.counts[self.path] <= n):
            self.send_error(503)
            return
        if mode == "cut" and self.counts[self.path] <= n:
            data = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture()
def web(tmp_path):
    """``serve(folder, faults)`` -> (base URL, GET counts) of a plain http.server on 127.0.0.1."""
    servers = []

    def serve(folder: Path, faults: dict | None = None):
        handler = type("H", (_Handler,), {"counts": Counter(), "faults": faults or {}})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", handler.counts

    yield serve
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def samples_of(folder: Path) -> list[Sample]:
    """The demo data set's samples as the writer takes them (image bytes and labels, in id order)."""
    index = load_index(folder)
    out = []
    for i, s in read_raw(index, np.arange(index.num_samples), lambda e: None):
        out.append(Sample(key=f"s{i:06d}", image=s["jpg"], ext="jpg", cls=int(s["cls"])))
    return out


@pytest.fixture(scope="module")
def copies(tmp_path_factory, demo_data, s3):
    """The demo data written by the writer twice: into a local folder and into the bucket."""
    local = tmp_path_factory.mktemp("local")
    for split in ("train", "val"):
        samples = samples_of(demo_data / split)
        write_samples(samples, local / split, split, samples_per_shard=100)
        write_samples(samples, f"{s3}/demo/{split}", split, samples_per_shard=100)
    return local, f"{s3}/demo"


def ids_of(index, keep=None, workers: int = 1, step: int = 0) -> list[int]:
    spec = StreamSpec(index, 16, 1, 0, workers, 7, 64, AugmentConfig(size=32))
    loader = ShardLoader(spec)
    try:
        loader.start_epoch(1, step, keep)
        batches = list(loader)
    finally:
        loader.close()
    assert int(sum(b["corrupt"].sum() for b in batches)) == 0
    return torch.cat([b["id"] for b in batches]).tolist()


def test_the_writer_fills_the_bucket_and_the_loader_streams_it_like_local_files(copies, web, tmp_path):
    local, bucket = copies
    import fsspec

    fs, _ = fsspec.core.url_to_fs(bucket)
    for name in ("_info.json", "train-000000.tar", "train-000004.tar"):  # byte-identical objects
        assert fs.cat_file(f"{BUCKET}/demo/train/{name}") == (local / "train" / name).read_bytes()
    assert not fs.exists(f"{BUCKET}/demo/train/.train-000000.tar.partial")

    keep = np.random.default_rng(0).random(480) < 0.7  # pruned samples are skipped, never decoded
    reference = ids_of(load_index(local / "train"), keep)
    assert len(reference) == int(keep.sum()) // 16 * 16 and len(set(reference)) == len(reference)
    s3_index = load_index(f"{bucket}/train")
    assert (s3_index.filenames, s3_index.lengths) == (load_index(local / "train").filenames,
                                                        load_index(local / "train").lengths)
    assert ids_of(s3_index, keep) == reference
    assert ids_of(s3_index, keep, step=5) == reference[5 * 16:]  # a mid-epoch resume skips the same samples

    cache = tmp_path / "cache"
    assert ids_of(load_index(f"{bucket}/train", str(cache)), keep) == reference
    cached = sorted(cache.iterdir())
    assert len(cached) == 5 and not [p for p in cached if p.name.startswith(".")]
    assert {p.stat().st_size for p in cached} == {(local / "train" / f).stat().st_size for f in s3_index.filenames}

    url, gets = web(local)
    http_index = load_index(f"{url}/train")
    assert ids_of(http_index, keep, workers=2) == ids_of(load_index(local / "train"), keep, workers=2)
    order = epoch_order(http_index, 7, 1, keep)  # each worker streams each of its shards once
    opened = Counter(f"/train/train-{k:06d}.tar" for w in range(2)
                     for k in set(http_index.shard_of(worker_ids(order, 1, 0, 16, 2, w)).tolist()))
    assert {p: n for p, n in gets.items() if p.endswith(".tar")} == opened and sum(opened.values()) >= 5


def test_pretraining_from_the_bucket_equals_pretraining_from_local_files(copies, tmp_path):
    local, bucket = copies
    over = ["train.max_steps=5", "train.deterministic=true", "pruning.method=seta", "pruning.ratio=0.3"]
    runs = {name: tmp_path / name for name in ("local", "s3")}
    with ThreadPoolExecutor(2) as pool:  # side by side: each run is mostly one thread
        results = list(pool.map(lambda kv: run(pretrain_cmd(kv[1], local, *over, f"data.train_shards={kv[0]}/train",
                                                            f"data.val_shards={kv[0]}/val")),
                                [(str(local), runs["local"]), (bucket, runs["s3"])]))
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "shard " not in r.stderr  # no shard was missing, cut short or retried
    fa, fb = (read_json(runs[k] / "final.json") for k in ("local", "s3"))
    assert fa["samples"] == fb["samples"] == 5 * 16
    assert read_json(runs["s3"] / "ranks" / "rank0.json")["keep_mask_sha1"] == \
        read_json(runs["local"] / "ranks" / "rank0.json")["keep_mask_sha1"]
    wa, wb = (load_file(str(runs[k] / "export" / "mae.safetensors")) for k in ("local", "s3"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_transient_errors_are_retried_and_a_dead_shard_is_replaced(demo_data, web, monkeypatch, caplog):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    url, gets = web(demo_data, {"/train/train-000000.tar": ("cut", 1), "/train/train-000001.tar": ("503", 2),
                                "/train/train-000002.tar": ("503", -1)})
    index = load_index(f"{url}/train")
    errors: list[str] = []
    with caplog.at_level(logging.WARNING, logger="mae_curriculum.data.remote"):
        got = dict(read_raw(index, np.arange(300), errors.append))
    assert all(got[i] for i in range(200))  # shards 0 and 1 read in full after the retries
    assert gets["/train/train-000000.tar"] == 2 and gets["/train/train-000001.tar"] == 3
    retried = [m for m in caplog.messages if "retry 1/4" in m]
    assert any("train-000000.tar" in m and "ContentLength" in m for m in retried)  # body cut short: resumed
    assert any("train-000001.tar" in m and "503" in m for m in retried)
    assert all(got[i] == {} for i in range(200, 300))  # shard 2 stayed down: its samples come out empty
    assert gets["/train/train-000002.tar"] == remote.RETRIES + 1
    assert len(errors) == 2 and "train-000002.tar" in errors[0] and "after 5 tries" in errors[0]

    keep = np.zeros(480, dtype=bool)
    keep[150:300] = True  # 50 good samples of shard 1, 100 of the dead shard 2
    spec = StreamSpec(index, 10, 1, 0, 0, 0, 0, AugmentConfig(size=32))
    loader = ShardLoader(spec)
    loader.start_epoch(0, 0, keep)
    batches = list(loader)
    assert sum(len(b["id"]) for b in batches) == 150  # replaced, so every step still runs
    assert int(sum(b["corrupt"].sum() for b in batches)) == 100


def test_locations_are_checked_at_load(tmp_path, s3):
    cfg = ROOT / "configs" / "demo.yaml"
    for bad, needle in (("ftp://host/x", "only local folders and s3://"), ("s3://", "names no bucket"),
                        ("pipe:aws s3 cp s3://b/x -", "no 'pipe:' commands")):
        with pytest.raises(ConfigError, match=needle):
            load_config(PretrainConfig, cfg, [f"data.train_shards={bad}"])
    ok = load_config(PretrainConfig, cfg, ["data.train_shards=s3://b/train", "data.val_shards=https://h/val",
                                           "data.cache_dir=/tmp/c"])  # no network at load
    assert (ok.data.train_shards, ok.data.cache_dir) == ("s3://b/train", "/tmp/c")
    with pytest.raises(ConfigError, match="cache_dir must be a local folder"):
        load_config(PretrainConfig, cfg, ["data.cache_dir=s3://b/cache"])
    with pytest.raises(DataError, match="_info.json not found"):
        load_index(f"{s3}/nothing-here")
    import fsspec

    fs, _ = fsspec.core.url_to_fs(s3)  # an _info.json naming objects outside its folder is refused
    for bad in ("../other/train-000000.tar", "https://evil/x.tar"):
        fs.pipe_file(f"{BUCKET}/hostile/_info.json",
                     f'{{"splits": {{"train": {{"filenames": ["{bad}"], "shard_lengths": [1]}}}}}}'.encode())
        with pytest.raises(DataError, match="not a plain object name"):
            load_index(f"{s3}/hostile")
    with pytest.raises(ValueError, match="read-only"):
        write_samples([Sample("a", b"x", "jpg", 0)], "http://127.0.0.1:9/x", "train")
