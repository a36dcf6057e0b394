"""Device crops (``data.crop: device``, issue 14): the workers ship each decoded image's canvas, the device crops
every row of a batch in one roi_align. Same rows, boxes and flips as the worker path; what the model sees within
40 dB PSNR of the exact path; deterministic and resumable mid-epoch; the kill -9 resume is in tests/test_faults.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import ROOT, pretrain_cmd, read_json, run
from test_stage_sized import MIN_PSNR_DB, psnr, woof_shards

from mae_curriculum.config import ConfigError, PretrainConfig, load_config
from mae_curriculum.data.device_crop import collate_regions, crop_regions
from mae_curriculum.data.index import load_index
from mae_curriculum.data.loader import ShardLoader, StreamSpec, stage_crop_size
from mae_curriculum.data.transforms import AugmentConfig
from mae_curriculum.data.transport import restore
from mae_curriculum.engine.inputs import at_size

FINAL = 224


@pytest.fixture(scope="module")
def woof(tmp_path_factory) -> Path:
    return woof_shards(tmp_path_factory.mktemp("woof_device") / "train", n=48)


def loader_for(index, crop: str, workers: int = 0, batch: int = 8, randaug: float = -1.0) -> ShardLoader:
    return ShardLoader(StreamSpec(index, batch, 1, 0, workers, seed=7, shuffle_buffer=16,
                                  augment=AugmentConfig(size=FINAL, randaug_magnitude=randaug), crop=crop),
                       decode_device="cpu")


def epoch(loader: ShardLoader, ep: int = 0, start: int = 0, **plans) -> list[dict]:
    loader.start_epoch(ep, start, **plans)
    return list(loader)


def at(batches: list[dict], b: int) -> torch.Tensor:
    return torch.cat([at_size(x["image"].float(), b) for x in batches])


@pytest.mark.parametrize("b, r", [(96, 1), (96, 4), (160, 2), (224, 1)])
def test_what_the_model_sees_matches_the_exact_path(woof, b, r):
    """The B x B input: exact path (final-size bicubic crop in the workers -> Fourier crop to B) vs device crops
    (canvas -> roi_align to S -> Fourier crop to B), the same samples, boxes and flips (replay r: the same r boxes)."""
    index = load_index(woof)
    with loader_for(index, "workers") as exact_loader, loader_for(index, "device") as device_loader:
        n = exact_loader.steps_in_epoch()
        reps = [r] * n if r > 1 else None
        exact = epoch(exact_loader, replays=reps)
        s = stage_crop_size(b, FINAL, 16)
        dev = epoch(device_loader, sizes=[s] * n, replays=reps)
    assert all(x["image"].shape[-1] == s and x["image"].dtype == torch.uint8 for x in dev)
    for k in ("id", "label", "corrupt", "fresh"):
        assert torch.equal(torch.cat([x[k] for x in exact]), torch.cat([x[k] for x in dev])), k
    ref, got = at(exact, b), at(dev, b)
    per_image = [psnr(x, y) for x, y in zip(ref, got)]
    print(f"B = {b}, S = {s}, r = {r}: {psnr(ref, got):.1f} dB over {len(per_image)} rows, worst {min(per_image):.1f}")
    assert psnr(ref, got) >= MIN_PSNR_DB
    assert psnr(ref, got) < 60  # not the same operator: the test would not notice a silent fallback otherwise


def test_a_group_shares_one_canvas_and_two_workers_give_the_worker_paths_rows(woof):
    index = load_index(woof)
    with loader_for(index, "device") as raw:
        raw.start_epoch(0, replays=[4] * raw.steps_in_epoch())
        first = restore(next(iter(raw.loader)))  # as the workers hand it over
    assert first["canvas"].shape[0] == 2 and torch.equal(first["group"], torch.arange(8) // 4)
    assert torch.equal(first["fresh"], (torch.arange(8) % 4 == 0).long())
    # every box is a non-empty box inside the (padded) canvases
    box, (h, w) = first["box"], first["canvas"].shape[1:3]
    assert (box[:, :2] >= 0).all() and (box[:, 2:] > box[:, :2]).all()
    assert (box[:, 2] <= w).all() and (box[:, 3] <= h).all()
    with loader_for(index, "workers", workers=2) as a, loader_for(index, "device", workers=2) as b:
        n = a.steps_in_epoch()
        cpu, dev = epoch(a, 1, replays=[2] * n), epoch(b, 1, sizes=[192] * n, replays=[2] * n)
    for k in ("id", "label", "fresh"):  # two workers: the same rows in the same order as the worker path
        assert torch.equal(torch.cat([x[k] for x in cpu]), torch.cat([x[k] for x in dev])), k


def test_resume_mid_epoch_is_bitwise_with_plans_that_change(woof):
    """Sizes and replay factors change mid-epoch (as at a stage change); resumed at any step, the rest of the
    epoch is bitwise the uninterrupted one."""
    index = load_index(woof)
    with loader_for(index, "device", workers=2) as loader:
        n = loader.steps_in_epoch()
        plans = dict(sizes=[96] * (n // 2) + [160] * (n - n // 2), replays=[4] * (n // 2) + [2] * (n - n // 2))
        full = epoch(loader, 2, **plans)
        for start in (1, n // 2, n - 1):
            rest = epoch(loader, 2, start, **plans)
            assert len(rest) == n - start
            for x, y in zip(full[start:], rest):
                assert torch.equal(x["id"], y["id"]) and torch.equal(x["image"], y["image"])
    assert {x["image"].shape[-1] for x in full} == {96, 160}


def test_collate_pads_with_the_edge_and_a_batch_starts_with_a_canvas():
    grey = torch.arange(12, dtype=torch.uint8).reshape(1, 3, 4)
    rgb = torch.full((3, 5, 6), 200, dtype=torch.uint8)
    rows = [{"canvas": grey, "box": (0, 0, 3, 4), "flip": False, "label": 1, "id": 10, "corrupt": 0, "fresh": 1},
            {"canvas": None, "box": (1, 1, 2, 2), "flip": True, "label": 1, "id": 10, "corrupt": 0, "fresh": 0},
            {"canvas": rgb, "box": (0, 1, 5, 5), "flip": False, "label": 2, "id": 11, "corrupt": 0, "fresh": 1}]
    b = collate_regions(rows)
    c = b["canvas"].permute(0, 3, 1, 2)  # shipped channels last
    assert c.shape == (2, 3, 5, 6) and torch.equal(b["group"], torch.tensor([0, 0, 1]))
    assert torch.equal(c[1], rgb)
    assert all(torch.equal(c[0, k, :3, :4], grey[0]) for k in range(3))  # greyscale -> 3 channels
    assert torch.equal(c[0, :, :3, 4], c[0, :, :3, 3]) and torch.equal(c[0, :, 3, :], c[0, :, 2, :])  # edge repeated
    assert not c[0, :, 4:, :].any() and not c[0, :, :3, 5:].any()  # then zeros
    assert b["box"].tolist()[1] == [1.0, 1.0, 3.0, 3.0]  # (x1, y1, x2, y2)
    with pytest.raises(RuntimeError, match="canvas"):
        collate_regions(rows[1:])


def test_a_box_at_its_own_size_is_copied_and_flips_mirror():
    canvas = torch.randint(0, 256, (2, 3, 9, 11), dtype=torch.uint8)
    box = torch.tensor([[2.0, 1.0, 9.0, 8.0], [0.0, 0.0, 7.0, 7.0]])
    out = crop_regions(canvas.permute(0, 2, 3, 1), torch.tensor([0, 1]), box, torch.tensor([False, True]), 7)
    assert torch.equal(out[0], canvas[0, :, 1:8, 2:9])  # one sample per output pixel, at the pixel centres
    assert torch.equal(out[1], canvas[1, :, 0:7, 0:7].flip(-1))


def test_refused_where_it_cannot_run(woof, tmp_path):
    index = load_index(woof)
    with pytest.raises(ValueError, match="RandAugment"):
        loader_for(index, "device", randaug=9.0)
    with loader_for(index, "device") as loader, pytest.raises(ValueError, match="RandAugment"):
        loader.start_epoch(0, magnitude=5.0)
    (tmp_path / "d").mkdir()
    demo, shards = ROOT / "configs" / "demo.yaml", f"data.train_shards={tmp_path / 'd'}"
    for overrides, match in ((["data.crop=device", "data.decode=gpu"], "data.decode: cpu"),
                             (["data.crop=device", "curriculum.lowpass=lanczos"], "fourier"),
                             (["data.crop=gpu"], "data.crop")):
        with pytest.raises(ConfigError, match=match) as e:
            load_config(PretrainConfig, demo, [*overrides, shards])
        assert "\n" not in str(e.value)
    assert load_config(PretrainConfig, demo, ["data.crop=device", shards]).data.crop == "device"


def test_corrupt_jpegs_are_replaced_as_on_the_worker_path(tmp_path):
    from test_stage_sized import woof_jpegs
    from mae_curriculum.data.write_shards import Sample, write_samples

    jpegs = woof_jpegs(24)
    jpegs[5] = jpegs[5][:400]  # truncated body: the header reads, the decode fails
    jpegs[9] = b"not an image"
    samples = (Sample(key=f"{k:06d}", image=d, ext="jpg", cls=k % 10) for k, d in enumerate(jpegs))
    write_samples(samples, tmp_path / "train", split="train", samples_per_shard=12)
    index = load_index(tmp_path / "train")
    with loader_for(index, "workers") as w, loader_for(index, "device") as d:
        reps = [2] * w.steps_in_epoch()
        exact, dev = epoch(w, replays=reps), epoch(d, sizes=[192] * d.steps_in_epoch(), replays=reps)
    assert sum(int(x["corrupt"].sum()) for x in dev) == sum(int(x["corrupt"].sum()) for x in exact) > 0
    assert torch.equal(torch.cat([x["id"] for x in exact]), torch.cat([x["id"] for x in dev]))
    assert all(len(x["id"]) == 8 for x in dev)
    assert psnr(at(exact, 96), at(dev, 96)) >= MIN_PSNR_DB - 3  # 24 images: a noisier mean than the 48 above


def test_pretraining_with_device_crops_and_replay(tmp_path, demo_data):
    out = tmp_path / "run"
    r = run(pretrain_cmd(out, demo_data, "train.epochs=1", "model.img_size=64", "curriculum.schedule=efficienttrain++",
                         "data.stage_sized_decode=true", "curriculum.replay=[4, 4, 2, 2, 2, 2, 1, 1, 1, 1]",
                         "data.crop=device"))
    assert r.returncode == 0, r.stderr[-3000:]
    final = read_json(out / "final.json")
    assert final["status"] == "finished" and final["corrupt_samples"] == 0
    assert final["decoded"] < final["samples"] and math.isfinite(final["final_loss"])


def test_the_crop_box_draw_is_torchvisions_draw_for_draw():
    """``resized_crop_params`` (fewer torch calls) = ``RandomResizedCrop.get_params``: the same box and the same
    generator state after it, over sizes, scales and ratios that hit the fallback too."""
    import random

    from torchvision.transforms import RandomResizedCrop

    from mae_curriculum.data.transforms import resized_crop_params

    rng = random.Random(0)
    for k in range(3000):
        h, w = rng.randint(1, 900), rng.choice([rng.randint(1, 900), rng.randint(1, 20)])
        if k < 3:  # 10 failed attempts: the fallback (a 1-pixel-high image cannot hold any drawn box)
            h, w = 1, 900
        scale = rng.choice([(0.2, 1.0), (0.08, 1.0), (0.9, 1.0)])
        ratio = rng.choice([(3 / 4, 4 / 3), (0.5, 2.0), (1.0, 1.0)])
        torch.manual_seed(k)
        ref = RandomResizedCrop.get_params(torch.empty(1).expand(1, h, w), list(scale), list(ratio))
        after_ref = torch.rand(2)
        torch.manual_seed(k)
        got = resized_crop_params(h, w, scale, ratio)
        assert tuple(ref) == tuple(got) and torch.equal(after_ref, torch.rand(2)), (k, h, w, ref, got)
        if k < 3:
            assert got == (0, 449, 1, 1)  # the central 1 x 1 crop of the fallback


def test_canvases_cropped_in_chunks_give_the_same_batch(monkeypatch):
    """Past MAX_FLOAT_BYTES of canvases the crop runs group chunk by group chunk: the same rows come out."""
    import mae_curriculum.data.device_crop as dc

    canvas = torch.randint(0, 256, (5, 30, 40, 3), dtype=torch.uint8)
    group = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4])
    box = torch.tensor([[1.0, 2.0, 30.0, 25.0], [0.0, 0.0, 40.0, 30.0]] * 4)
    flip = torch.tensor([0, 1, 0, 1, 0, 0, 1, 1], dtype=torch.bool)
    whole = crop_regions(canvas, group, box, flip, 16)
    monkeypatch.setattr(dc, "MAX_FLOAT_BYTES", 30 * 40 * 3 * 4 * 2)  # two canvases per chunk
    assert torch.equal(crop_regions(canvas, group, box, flip, 16), whole)
    assert torch.equal(whole[1], crop_regions(canvas[:1], group[:1], box[1:2], flip[:1], 16)[0].flip(-1))
