"""The streaming loader: equal steps on every rank, disjoint samples, determinism, resume, safety, bad data."""

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mae_curriculum.data.index import DataError, load_index
from mae_curriculum.data.loader import (ShardLoader, StreamSpec, consumed_by_worker, epoch_order, steps_per_epoch,
                                        worker_ids)
from mae_curriculum.data.transforms import AugmentConfig

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"


def cifar_images(n: int) -> list[tuple[bytes, int]]:
    """The first n training JPEGs of the real CIFAR-10 archive with their labels (class folders sorted)."""
    out = []
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with tarfile.open(CIFAR, "r:gz") as tf:
        for m in tf:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 4 and parts[1] == "train" and parts[3].endswith(".jpg"):
                out.append((tf.extractfile(m).read(), classes.index(parts[2])))
                if len(out) == n:
                    break
    return out


class Pwned:
    """Unpickling this creates a file: the loader must never do it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_shards(folder: Path, samples: list[tuple], lengths: list[int], extra=None) -> None:
    """Shards of (image bytes, label[, suffix]) samples written as-is (no conversion), plus _info.json."""
    folder.mkdir(parents=True, exist_ok=True)
    names, it = [], iter(enumerate(samples))
    for k, n in enumerate(lengths):
        name = f"train-{k:06d}.tar"
        with tarfile.open(folder / name, "w") as tf:
            for _ in range(n):
                i, (img, label, *suffix) = next(it)
                members = {(suffix[0] if suffix else "jpg"): img, "cls": str(label).encode()}
                if extra is not None:
                    members.update(extra(i))
                for ext, data in members.items():
                    ti = tarfile.TarInfo(f"s{i:06d}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        names.append(name)
    info = {"name": "t", "splits": {"train": {"name": "train", "num_samples": sum(lengths), "filenames": names,
                                              "shard_lengths": lengths}}, "num_classes": 10}
    (folder / "_info.json").write_text(json.dumps(info))


@pytest.fixture(scope="module")
def cifar():
    return cifar_images(240)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, cifar):
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, cifar[:230], [100, 80, 50])  # uneven shards
    return folder


def make_loader(folder, world=1, rank=0, workers=0, batch=8, seed=0, size=32):
    spec = StreamSpec(load_index(folder), batch, world, rank, workers, seed, 64, AugmentConfig(size=size))
    return ShardLoader(spec)


def run_epoch(loader, epoch, start=0, keep=None):
    loader.start_epoch(epoch, start, keep)
    return [b for b in loader]


def test_plan_equal_steps_and_disjoint_over_ranks_and_workers(shards):
    index = load_index(shards)
    order = epoch_order(index, seed=0, epoch=3)
    assert sorted(order.tolist()) == list(range(230))
    seen = []
    for rank in range(2):
        for w in range(2):
            ids = worker_ids(order, 2, rank, 8, 2, w)
            assert len(ids) == steps_per_epoch(230, 2, 8, 2) // 2 * 8
            seen += ids.tolist()
    assert len(seen) == len(set(seen))  # no sample twice within the epoch
    assert steps_per_epoch(230, 2, 8, 2) == 14  # 230 // 16 = 14 batches per rank, even for 2 workers


def test_two_ranks_two_workers_real_loader(shards, cifar):
    per_rank = []
    for rank in range(2):
        batches = run_epoch(make_loader(shards, world=2, rank=rank, workers=2), epoch=1)
        per_rank.append(batches)
    assert len(per_rank[0]) == len(per_rank[1]) == 14
    ids0 = torch.cat([b["id"] for b in per_rank[0]]).tolist()
    ids1 = torch.cat([b["id"] for b in per_rank[1]]).tolist()
    assert not set(ids0) & set(ids1) and len(set(ids0)) == len(ids0)
    # labels survive the trip: every id carries the label it was written with
    for b in per_rank[0] + per_rank[1]:
        for i, lab in zip(b["id"].tolist(), b["label"].tolist()):
            assert cifar[i][1] == lab
        assert b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (3, 32, 32)


def test_fewer_shards_than_workers_and_single_shard(tmp_path, cifar):
    write_shards(tmp_path / "one", cifar[:64], [64])
    batches = run_epoch(make_loader(tmp_path / "one", world=2, rank=1, workers=3, batch=4), epoch=0)
    assert len(batches) == steps_per_epoch(64, 2, 4, 3) == 6


def test_order_is_deterministic_and_changes_with_epoch(shards):
    a = torch.cat([b["id"] for b in run_epoch(make_loader(shards, workers=2), 2)])
    b = torch.cat([b["id"] for b in run_epoch(make_loader(shards, workers=2), 2)])
    c = torch.cat([b["id"] for b in run_epoch(make_loader(shards, workers=2), 3)])
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_resume_mid_epoch_yields_the_same_remaining_sequence(shards):
    full = run_epoch(make_loader(shards, workers=2), epoch=5)
    for start in (1, 4, 7):
        rest = run_epoch(make_loader(shards, workers=2), epoch=5, start=start)
        assert len(rest) == len(full) - start
        for x, y in zip(full[start:], rest):
            assert torch.equal(x["id"], y["id"]) and torch.equal(x["image"], y["image"])
    assert consumed_by_worker(7, 2, 0) == 4 and consumed_by_worker(7, 2, 1) == 3


def test_keep_mask_streams_only_kept_samples(shards):
    keep = np.zeros(230, dtype=bool)
    keep[::3] = True
    loader = make_loader(shards, workers=2)
    batches = run_epoch(loader, 0, keep=keep)
    ids = torch.cat([b["id"] for b in batches]).numpy()
    assert keep[ids].all() and len(batches) == loader.steps_in_epoch(keep)


def test_pickle_members_are_never_unpickled(tmp_path, cifar):
    target = tmp_path / "pwned"
    write_shards(tmp_path / "evil", cifar[:32], [32],
                 extra=lambda i: {"pyd": pickle.dumps(Pwned(str(target))), "pth": pickle.dumps(Pwned(str(target)))})
    batches = run_epoch(make_loader(tmp_path / "evil", workers=0, batch=8), 0)
    assert len(batches) == 4
    assert set(batches[0]) == {"image", "label", "id", "corrupt", "fresh"}
    assert not target.exists()


def test_corrupt_samples_are_replaced_and_counted(tmp_path, cifar):
    bad = [(b"\xff\xd8\xff garbage", 0), (cifar[1][0][: len(cifar[1][0]) // 3], 1), (b"", 2)]
    samples = cifar[:10] + bad + cifar[10:39]
    write_shards(tmp_path / "bad", samples, [20, 22])
    batches = run_epoch(make_loader(tmp_path / "bad", workers=0, batch=6), 0)
    assert len(batches) == 7
    corrupt = int(sum(b["corrupt"].sum() for b in batches))
    assert corrupt >= 2  # garbage and empty; a truncated JPEG may still decode (PIL pads it)


def test_missing_shard_is_skipped_with_equal_steps(tmp_path, cifar, caplog):
    write_shards(tmp_path / "miss", cifar[:60], [20, 20, 20])
    (tmp_path / "miss" / "train-000001.tar").unlink()
    loader = make_loader(tmp_path / "miss", workers=0, batch=4)
    batches = run_epoch(loader, 0)
    assert len(batches) == 15
    assert int(sum(b["corrupt"].sum() for b in batches)) == 20


def test_index_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="shard folder not found"):
        load_index(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .tar shards"):
        load_index(tmp_path / "empty")
    (tmp_path / "esc").mkdir()
    (tmp_path / "esc" / "_info.json").write_text(json.dumps(
        {"splits": {"t": {"filenames": ["../../etc/passwd"], "shard_lengths": [1]}}}))
    with pytest.raises(DataError, match="outside the folder"):
        load_index(tmp_path / "esc")


def test_fractional_randaugment_magnitude_from_the_curriculum(shards):
    """ET++ stage magnitudes such as 4.5 reach timm's RandAugment exactly (timm's parser takes integers)."""
    loader = make_loader(shards, workers=1)
    loader.start_epoch(0, 0, None, magnitude=4.5)
    batches = list(loader)
    assert len(batches) == 28 and batches[0]["image"].dtype == torch.uint8
    from mae_curriculum.data.transforms import _randaug

    assert {op.magnitude for op in _randaug(4.5, 0.5).ops} == {4.5}


def test_randaugment_is_reproducible_per_sample(cifar):
    """Resume must redraw the same augmentation: every RNG RandAugment uses is seeded per sample."""
    from mae_curriculum.data.transforms import SampleTransform, seed_sample

    t = SampleTransform(AugmentConfig(size=32, randaug_magnitude=9.0))
    outs = []
    for junk in (1, 2):
        np.random.seed(junk)  # disturb the global RNGs between the two draws
        torch.manual_seed(junk)
        seed_sample(0, 3, 17)
        outs.append(torch.stack([t(cifar[i][0]) for i in range(8)]))
    assert torch.equal(outs[0], outs[1])
    seed_sample(0, 4, 17)
    assert not torch.equal(torch.stack([t(cifar[i][0]) for i in range(8)]), outs[0])
