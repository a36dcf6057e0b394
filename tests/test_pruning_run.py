"""Sample pruning inside real training: what is streamed, agreement across ranks, and that it still learns."""

import numpy as np
import pytest
import torch

from conftest import cifar_samples, deepspeed_launcher, pretrain_cmd, read_json, run, scalars
from mae_curriculum.data.index import load_index
from mae_curriculum.data.loader import ShardLoader, StreamSpec
from mae_curriculum.data.transforms import AugmentConfig
from mae_curriculum.data.write_shards import Sample, write_samples


def test_pruned_samples_are_never_decoded(tmp_path):
    """Pruned ids hold undecodable bytes: had the loader decoded them, it would count corrupt samples."""
    real = cifar_samples("train", 6)  # 60 real JPEGs
    samples = []
    for i in range(120):
        if i % 2 == 0:
            s = real[i // 2]
            samples.append(Sample(key=f"k{i:04d}", image=s.image, ext="jpg", cls=s.cls))
        else:
            samples.append(Sample(key=f"k{i:04d}", image=b"\xff\xd8\xff not a jpeg", ext="jpg", cls=0))
    folder = tmp_path / "mixed"
    write_samples(iter(samples), folder, split="train", samples_per_shard=40)
    keep = np.zeros(120, dtype=bool)
    keep[::2] = True
    spec = StreamSpec(load_index(folder), 10, 1, 0, 2, 0, 32, AugmentConfig(size=32))
    loader = ShardLoader(spec)
    loader.start_epoch(0, 0, keep)
    batches = list(loader)
    assert len(batches) == 6
    assert int(sum(b["corrupt"].sum() for b in batches)) == 0
    assert sorted(torch.cat([b["id"] for b in batches]).tolist()) == list(range(0, 120, 2))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["seta", "infobatch"])
def test_pruned_mae_run_streams_the_expected_fraction_and_learns(tmp_path, cifar_shards, method):
    out = tmp_path / method
    r = run(pretrain_cmd(out, cifar_shards, "train.epochs=6", "curriculum.schedule=constant",
                         f"pruning.method={method}", "pruning.ratio=0.3", "pruning.delta=0.875",
                         f"data.train_shards={cifar_shards / 'train'}", f"data.val_shards={cifar_shards / 'test'}"))
    assert r.returncode == 0, r.stderr[-3000:]
    final = read_json(out / "final.json")
    kept = [v for _, v in scalars(out / "tensorboard", "pruning/kept_fraction")]
    # first epoch: InfoBatch keeps all (every score is the initial 3.0, none below the mean); SeTa thins it to
    # 1 - ratio, as its authors' code does
    assert len(kept) == 6 and kept[0] == pytest.approx(0.7 if method == "seta" else 1.0, abs=1e-3)
    assert all(k < 0.95 for k in kept[1:5])  # pruning epochs
    # every streamed epoch is floor(kept * 2000 / 16) steps; the total matches the kept fractions
    expected = sum(int(round(k * 2000)) // 16 * 16 for k in kept)
    assert final["samples"] == expected
    assert final["flops"] < 0.9 * final["full_flops"]  # compute saved
    losses = [v for _, v in scalars(out / "tensorboard", "train/loss")]
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10])
    assert final["epoch"] == 6


@pytest.mark.slow
def test_seta_masks_identical_on_two_ranks(tmp_path, demo_data):
    out = tmp_path / "ranks"
    r = run(pretrain_cmd(out, demo_data, "train.epochs=4", "curriculum.schedule=constant", "pruning.method=seta",
                         "pruning.ratio=0.3", launcher=deepspeed_launcher(29565)), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (read_json(out / "ranks" / f"rank{k}.json") for k in range(2))
    assert len(r0["keep_mask_sha1"]) == 4
    assert r0["keep_mask_sha1"] == r1["keep_mask_sha1"]
    assert len(set(r0["keep_mask_sha1"].values())) >= 3  # masks change from epoch to epoch
    assert r0["step"] == r1["step"]
