"""Shared fixtures: a small procedural data set (made once per test session) and a tiny-MAE run helper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# A tiny MAE and small batches: each run takes seconds on 2 CPU cores.
TINY = [
    "model.img_size=32", "model.patch_size=8", "model.embed_dim=64", "model.depth=2", "model.num_heads=2",
    "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2", "model.norm_pix_loss=false",
    "train.batch_size=16", "data.num_workers=1", "data.shuffle_buffer=64", "optim.blr=1e-2", "optim.warmup_epochs=0.5",
    "log.progress_bar=false", "log.every_steps=1", "log.vis_every_epochs=0", "checkpoint.every_minutes=0",
]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from mae_curriculum.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("demo_data")
    make_synthetic_dataset(root, train_size=480, val_size=64, size=32, samples_per_shard=100, seed=0)
    return root


def pretrain_cmd(out: Path, data: Path, *overrides: str, launcher: list[str] | None = None) -> list[str]:
    base = launcher or [sys.executable]
    return [*base, str(ROOT / "pretrain.py"), "--config", str(ROOT / "configs" / "demo.yaml"), *TINY,
            f"output_dir={out}", f"data.train_shards={data / 'train'}", f"data.val_shards={data / 'val'}",
            *overrides]


def fault_cmd(cmd: list[str], *faults: str) -> list[str]:
    """``cmd`` (from :func:`pretrain_cmd`) run through tests/fault_run.py with fault-injection hooks, e.g.
    ``fault_cmd(pretrain_cmd(...), "--kill-at-step", "5")``."""
    i = next(k for k, a in enumerate(cmd) if a.endswith("pretrain.py") or a.endswith("finetune.py"))
    script = "pretrain" if cmd[i].endswith("pretrain.py") else "finetune"
    return [*cmd[:i], str(ROOT / "tests" / "fault_run.py"), script, *faults, "--", *cmd[i + 1:]]


def run(cmd: list[str], timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, **kw)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def deepspeed_launcher(port: int) -> list[str]:
    import shutil

    return [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(port)]


TWO_RANK = ["train.epochs=2", "curriculum.schedule=efficienttrain++", "checkpoint.every_steps=4"]


def session_root(tmp_path_factory) -> Path:
    """A folder shared by the whole test session: with pytest-xdist (``-n 2``) its workers share it."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def two_rank_reference(tmp_path_factory, demo_data) -> Path:
    """An uninterrupted 2-rank ``deepspeed --num_gpus 2`` run, shared by the tests that compare with it (made
    once per test session, also when pytest-xdist workers both need it)."""
    from filelock import FileLock

    root = session_root(tmp_path_factory)
    out = root / "two_rank_ref" / "run"
    with FileLock(str(root / "two_rank_ref.lock")):
        if not (out / "final.json").is_file():
            r = run(pretrain_cmd(out, demo_data, *TWO_RANK, launcher=deepspeed_launcher(29561)), timeout=400)
            assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return out


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_samples(split: str, per_class: int):
    """The first ``per_class`` JPEGs of each class of the real CIFAR-10 archive in ../shared/data."""
    import tarfile

    from mae_curriculum.data.write_shards import Sample

    counts = {c: 0 for c in CIFAR_CLASSES}
    out = []
    with tarfile.open(SHARED_DATA / "cifar10-jpg.tar.gz", "r:gz") as tf:
        for m in tf:
            parts = m.name.split("/")
            if not (m.isfile() and len(parts) == 4 and parts[1] == split and parts[2] in counts):
                continue
            if counts[parts[2]] < per_class:
                counts[parts[2]] += 1
                stem = parts[3].rsplit(".", 1)[0]
                out.append(Sample(key=f"{split}_{parts[2]}_{stem}", image=tf.extractfile(m).read(), ext="jpg",
                                  cls=CIFAR_CLASSES.index(parts[2]), meta={"class": parts[2]}))
            if all(v >= per_class for v in counts.values()):
                break
    return out


@pytest.fixture(scope="session")
def cifar_shards(tmp_path_factory) -> Path:
    """CIFAR-10 subset as shards: train (200/class, interleaved) and test (50/class) under one root."""
    import random

    from mae_curriculum.data.write_shards import write_samples

    root = tmp_path_factory.mktemp("cifar_shards")
    for split, n in (("train", 200), ("test", 50)):
        samples = cifar_samples(split, n)
        random.Random(0).shuffle(samples)
        write_samples(samples, root / split, split=split, samples_per_shard=500, classes=CIFAR_CLASSES)
    return root
