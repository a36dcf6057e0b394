"""Replay (``curriculum.replay``, issue 14 item 3): at a stage with factor r each decoded image gives r crops (r
consecutive rows of the batch), deterministic and resumable; the counters say what was decoded and what was seen.
The kill -9 resume of a run that replays is in tests/test_faults.py (``STAGE_SIZED``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, pretrain_cmd, read_json, run, scalars
from test_stage_sized import woof_shards

from mae_curriculum.config import ConfigError, PretrainConfig, load_config
from mae_curriculum.config_finetune import FinetuneConfig
from mae_curriculum.curriculum.schedule import build_schedule
from mae_curriculum.data.index import load_index
from mae_curriculum.data.loader import ShardLoader, StreamSpec
from mae_curriculum.data.transforms import AugmentConfig, SampleTransform
from mae_curriculum.engine.progress import Budget, step_replays, step_stages


@pytest.fixture(scope="module")
def woof(tmp_path_factory) -> Path:
    return woof_shards(tmp_path_factory.mktemp("woof_replay") / "train", n=64)


def loader_for(index, workers: int, batch: int = 8, randaug: float = -1.0) -> ShardLoader:
    return ShardLoader(StreamSpec(index, batch, 1, 0, workers, seed=5, shuffle_buffer=16,
                                  augment=AugmentConfig(size=224, randaug_magnitude=randaug)))


def epoch(loader: ShardLoader, ep: int, start: int = 0, **plans) -> list[dict]:
    loader.start_epoch(ep, start, **plans)
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_groups_of_r_rows_share_one_decoded_image(woof, workers):
    loader = loader_for(load_index(woof), workers)
    steps = loader.steps_in_epoch()
    plan = [4 if k < 2 else (2 if k < 4 else 1) for k in range(steps)]
    out = epoch(loader, 0, replays=plan)
    loader.close()
    assert len(out) == steps
    for k, b in enumerate(out):
        r = plan[k]
        ids, fresh, img = b["id"].view(-1, r), b["fresh"].view(-1, r), b["image"].view(-1, r, *b["image"].shape[1:])
        assert (ids == ids[:, :1]).all(), (k, b["id"])  # a group: one image
        assert ids[:, 0].unique().numel() == ids.shape[0]  # groups: different images
        assert fresh[:, 0].eq(1).all() and fresh[:, 1:].eq(0).all()  # decoded once, replayed r - 1 times
        assert (b["label"].view(-1, r) == b["label"].view(-1, r)[:, :1]).all()
        for g in range(ids.shape[0]):  # every row its own crop
            rows = img[g].flatten(1).float()
            assert all(not torch.equal(rows[i], rows[j]) for i in range(r) for j in range(i + 1, r))
    assert sum(int(b["fresh"].sum()) for b in out) == sum(8 // r for r in plan)


def test_r1_is_the_plain_loader_and_plans_are_deterministic_and_resume(woof):
    index = load_index(woof)
    loader = loader_for(index, 2, randaug=5.0)
    steps = loader.steps_in_epoch()
    plain = epoch(loader, 1)
    ones = epoch(loader, 1, replays=[1] * steps)
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["id"], b["id"]) for a, b in zip(plain, ones))
    plan = [(4, 2, 1, 8)[k % 4] for k in range(steps)]
    full = epoch(loader, 1, replays=plan)
    again = epoch(loader, 1, replays=plan)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(full, again))
    for start in (1, 3):  # mid-epoch resume, into a step with r = 2 and one with r = 8 (the workers swap roles)
        resumed = epoch(loader, 1, start, replays=plan)
        assert len(resumed) == steps - start
        assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["id"], b["id"])
                   for a, b in zip(full[start:], resumed))
    # rows of the plain loader's batch that a replay step does not use are skipped, not shifted: the anchors are
    # the plain batch's rows 0, r, 2r, ...
    assert torch.equal(full[0]["id"][::4], plain[0]["id"][::4])
    with pytest.raises(ValueError, match="divide the batch size"):
        loader.start_epoch(0, replays=[3] * steps)
    loader.close()


def test_one_decode_serves_every_crop(woof, monkeypatch):
    calls = []
    real = SampleTransform.decode_many

    def counting(self, img, data, boxes):
        calls.append(len(boxes))
        return real(self, img, data, boxes)

    monkeypatch.setattr(SampleTransform, "decode_many", counting)
    loader = loader_for(load_index(woof), 0)
    steps = loader.steps_in_epoch()
    epoch(loader, 0, replays=[4] * steps)
    loader.close()
    assert calls == [4] * (steps * 8 // 4)


def test_one_view_is_the_single_crop_path(woof):
    """``views(data, 1)`` (what ``__call__`` and every r = 1 step use) draws the box and flip from the header, then
    decodes and crops: exactly ``apply(img, data, params(img))``, the path the GPU decode's CPU fallback shares."""
    from mae_curriculum.data.loader import read_raw
    from mae_curriculum.data.transforms import open_image, seed_sample

    index = load_index(woof)
    t = SampleTransform(AugmentConfig(size=224, randaug_magnitude=5.0))
    for _, sample in read_raw(index, torch.arange(6).numpy(), lambda e: None):
        data = sample["jpg"]
        seed_sample(0, 0, 1)
        img = open_image(data)
        ref = t.apply(img, data, t.params(img))
        seed_sample(0, 0, 1)
        assert torch.equal(t.views(data, 1)[0], ref)


def test_step_replays_follow_the_stages():
    sched = build_schedule("efficienttrain++", final_size=64, patch_size=8)
    budget = Budget(sched, 64, lambda b: float(b * b), epochs=2.0, epoch_images=640)
    replay = [4, 4, 2, 2, 2, 2, 1, 1, 1, 1]
    for start_progress in (0.0, 0.15, 0.55):
        stages = step_stages(budget, start_progress, 40, 0, 16, 1.0, 2)
        reps = step_replays(budget, replay, start_progress, 40, 0, 16, 1.0, 2)
        assert reps == [replay[i] for i in stages]
    assert step_replays(budget, [], 0.0, 40, 0, 16, 1.0, 2) is None
    assert step_replays(budget, [1] * 10, 0.0, 40, 0, 16, 1.0, 2) is None


@pytest.mark.parametrize("value, match", [
    ("[4, 2]", "has 2 entries but the schedule efficienttrain\\+\\+ has 10 stages"),
    ("[3, 3, 2, 2, 2, 2, 1, 1, 1, 1]", "factor 3 does not divide train.batch_size 64"),
    ("[0, 4, 2, 2, 2, 2, 1, 1, 1, 1]", "must be in \\[1, 64\\]"),
    ("[4.5, 4, 2, 2, 2, 2, 1, 1, 1, 1]", "curriculum.replay\\[0\\]: expected an integer"),
])
def test_bad_replay_configs_fail_in_one_line(tmp_path, value, match):
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match=match):
        load_config(PretrainConfig, ROOT / "configs" / "demo.yaml",
                    [f"curriculum.replay={value}", f"data.train_shards={tmp_path / 'd'}"])


def test_replay_config_accepts_one_factor_per_stage_and_needs_cpu_decode(tmp_path):
    (tmp_path / "d").mkdir()
    ok = load_config(PretrainConfig, ROOT / "configs" / "demo.yaml",
                     ["curriculum.replay=[4, 4, 2, 2, 2, 2, 1, 1, 1, 1]", f"data.train_shards={tmp_path / 'd'}"])
    assert ok.curriculum.replay == [4, 4, 2, 2, 2, 2, 1, 1, 1, 1]
    with pytest.raises(ConfigError, match="needs data.decode: cpu"):
        load_config(PretrainConfig, ROOT / "configs" / "demo.yaml", ["curriculum.replay=[4, 4, 2, 2, 2, 2, 1, 1, 1, 1]",
                                                     "data.decode=gpu", f"data.train_shards={tmp_path / 'd'}"])
    ft = load_config(FinetuneConfig, ROOT / "configs" / "supervised_demo.yaml",
                     ["curriculum.replay=[4, 4, 2, 2, 2, 2, 1, 1, 1, 1]", f"data.train_shards={tmp_path / 'd'}",
                      f"data.val_shards={tmp_path / 'd'}"])
    assert ft.curriculum.replay[0] == 4


@pytest.mark.slow
def test_pretraining_with_replay_counts_decoded_and_seen(tmp_path, demo_data):
    """A real run: ET++ at 32 px, patch 8 (B = 16 / 24 / 32), replay 4 / 2 / 1. Decoded = the sum over steps of
    rows / r, seen = every row; TensorBoard logs both at every step."""
    out = tmp_path / "run"
    r = run(pretrain_cmd(out, demo_data, "train.epochs=1", "curriculum.schedule=efficienttrain++",
                         "curriculum.replay=[4, 4, 2, 2, 2, 2, 1, 1, 1, 1]", "checkpoint.every_steps=0"))
    assert r.returncode == 0, r.stderr[-3000:]
    final = read_json(out / "final.json")
    sizes = dict(scalars(out / "tensorboard", "curriculum/B"))
    decoded = dict(scalars(out / "tensorboard", "data/decoded_images"))
    seen = dict(scalars(out / "tensorboard", "data/seen_images"))
    assert final["decoded"] < final["samples"] and seen[max(seen)] == final["samples"]
    # per step (batch 16, one rank): 16 / r decoded, r from the step's B
    rate = {16: 4, 24: 2, 32: 1}
    steps = sorted(sizes)
    for a, b in zip(steps, steps[1:]):
        assert decoded[b] - decoded[a] == sum(16 // rate[int(sizes[s])] for s in range(a + 1, b + 1)), (a, b)
    assert final["decoded"] == sum(16 // rate[int(sizes[s])] for s in steps)


@pytest.mark.slow
def test_supervised_with_replay_reports_decoded(tmp_path, demo_data):
    out = tmp_path / "sup"
    cmd = [sys.executable, str(ROOT / "finetune.py"), "--config", str(ROOT / "configs" / "supervised_demo.yaml"),
           f"output_dir={out}", f"data.train_shards={demo_data / 'train'}", f"data.val_shards={demo_data / 'val'}",
           "model.img_size=32", "model.patch_size=4", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
           "train.epochs=1", "train.batch_size=16", "data.num_workers=1",
           "curriculum.replay=[4, 4, 2, 2, 2, 2, 1, 1, 1, 1]", "log.every_steps=1", "log.progress_bar=false",
           "checkpoint.every_epochs=0", "checkpoint.every_minutes=0"]
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    final = read_json(out / "final.json")
    assert 0 < final["decoded"] < final["samples"], final
    assert dict(scalars(out / "tensorboard", "data/decoded_images"))
    # the FLOPs counter counts FLOPs (ViT: the analytic count per stage size), not the budget's progress unit
    from mae_curriculum.curriculum.flops import vit_classifier_flops_per_image

    per = {b: vit_classifier_flops_per_image(b, 4, 32, 1, 10) for b in (12, 24, 32)}
    assert final["samples"] * per[12] < final["flops"] < final["samples"] * per[32]
