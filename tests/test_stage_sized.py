"""Stage-sized decode (``data.stage_sized_decode``, issue 14): the loader crops each step to S >= B from a plan
fixed at epoch start, and what the model sees stays within 40 dB PSNR of the exact path."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA, pretrain_cmd, read_json, run, scalars

from mae_curriculum.config import ConfigError, DataConfig, validate_data
from mae_curriculum.curriculum.schedule import build_schedule
from mae_curriculum.data.index import load_index
from mae_curriculum.data.loader import ShardLoader, StreamSpec, stage_crop_size
from mae_curriculum.data.synthetic import make_synthetic_dataset
from mae_curriculum.data.transforms import AugmentConfig
from mae_curriculum.data.write_shards import Sample, write_samples
from mae_curriculum.engine.accumulation import Accumulation
from mae_curriculum.engine.inputs import at_size
from mae_curriculum.engine.progress import Budget, step_sizes
from mae_curriculum.engine.state import Counters

WOOF = SHARED_DATA / "imagewoof2-320-subset.tar.gz"
MIN_PSNR_DB = 40.0


def woof_jpegs(n: int) -> list[bytes]:
    """The first ``n`` JPEGs of the imagewoof subset (real ImageNet JPEGs, short side 320), or PIL-made JPEGs
    of natural-looking noise at that size when the archive is absent."""
    out: list[bytes] = []
    if WOOF.is_file():
        with tarfile.open(WOOF, "r|gz") as tf:
            for m in tf:
                if m.isfile() and m.name.endswith(".JPEG"):
                    out.append(tf.extractfile(m).read())
                    if len(out) == n:
                        break
        return out
    rng = np.random.default_rng(0)
    for _ in range(n):
        small = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((426, 320), Image.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def woof_shards(root: Path, n: int = 48) -> Path:
    """``n`` real JPEGs as a shard folder (what the loader and benchmarks/data_capacity.py read)."""
    samples = (Sample(key=f"{k:06d}", image=data, ext="jpg", cls=k % 10) for k, data in enumerate(woof_jpegs(n)))
    write_samples(samples, root, split="train", samples_per_shard=24)
    return root


@pytest.fixture(scope="module")
def woof(tmp_path_factory) -> Path:
    return woof_shards(tmp_path_factory.mktemp("woof") / "train")


def spec_for(index, batch: int, workers: int, size: int, accum: int = 1) -> StreamSpec:
    return StreamSpec(index, batch, 1, 0, workers, seed=3, shuffle_buffer=16, augment=AugmentConfig(size=size),
                      steps_multiple=accum)


def batches(loader: ShardLoader, epoch: int, step: int = 0, sizes=None) -> list[dict]:
    loader.start_epoch(epoch, step, sizes=sizes)
    return list(loader)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def test_stage_crop_size_rule():
    assert stage_crop_size(96, 224, 16) == 192  # 2B
    assert stage_crop_size(160, 224, 16) == 224  # 2B > final: the final size
    assert stage_crop_size(224, 224, 16) == 224
    assert stage_crop_size(24, 64, 8) == 48 and stage_crop_size(48, 64, 8) == 64
    assert stage_crop_size(100, 224, 16) == 208  # rounded up to the patch


def test_stage_sized_input_matches_exact_path_psnr(woof):
    """The B x B input the model sees: exact path (final-size crop -> Fourier crop to B) vs stage-sized (the
    loader crops to S, DCT-scaled decode where the crop allows -> Fourier crop S -> B), same samples, same boxes."""
    index = load_index(woof)
    final = 224
    loader = ShardLoader(spec_for(index, 8, 0, final))
    exact = batches(loader, 0)
    results = {}
    for b in (96, 160):
        s = stage_crop_size(b, final, 16)
        staged = batches(loader, 0, sizes=[s] * loader.steps_in_epoch())
        assert all(x["image"].shape[-1] == s for x in staged)
        ref = torch.cat([at_size(x["image"].float(), b) for x in exact])
        got = torch.cat([at_size(x["image"].float(), b) for x in staged])
        assert torch.equal(torch.cat([x["id"] for x in exact]), torch.cat([x["id"] for x in staged]))
        results[b] = psnr(ref, got)
    print(f"stage-sized vs exact PSNR (dB): {results}")
    assert results[160] == math.inf  # S = final: the exact path itself
    assert results[96] >= MIN_PSNR_DB, results


def test_loader_follows_the_plan_per_step_and_resumes(tmp_path):
    make_synthetic_dataset(tmp_path, train_size=96, val_size=8, size=40, samples_per_shard=32, seed=0)
    index = load_index(tmp_path / "train")
    loader = ShardLoader(spec_for(index, 4, 2, 32, accum=2))
    steps = loader.steps_in_epoch()
    plan = [16 if k < 8 else (24 if k < 14 else 0) for k in range(steps)]
    full = batches(loader, 1, sizes=plan)
    assert [x["image"].shape[-1] for x in full] == [p or 32 for p in plan]
    exact = batches(loader, 1)
    assert all(torch.equal(a["id"], b["id"]) for a, b in zip(full, exact))  # same samples, only the size differs
    resumed = batches(loader, 1, step=6, sizes=plan)  # mid-epoch, before a size change
    assert len(resumed) == steps - 6
    for a, b in zip(full[6:], resumed):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["id"], b["id"])
    with pytest.raises(ValueError):
        loader.start_epoch(0, sizes=[64] * steps)
    loader.close()


def _budget(schedule_name: str, final: int, patch: int, epoch_images: int, epochs: float = 2.0) -> Budget:
    schedule = build_schedule(schedule_name, final_size=final, patch_size=patch)
    return Budget(schedule, final, lambda s: float(s * s), epochs, epoch_images)


@pytest.mark.parametrize("grow", [False, True])
def test_step_sizes_is_what_the_run_sees(grow):
    """Simulate the trainer's loop (stage from progress before each micro-step, progress consumed after, the
    merge factor fixed per window): every loader step's plan size covers its B and is constant per window."""
    final, patch, batch, accum, steps = 64, 8, 4, 4, 120
    budget = _budget("efficienttrain++", final, patch, epoch_images=steps * batch, epochs=0.25)
    acc = Accumulation(accum, final, grow)
    for start in (0, 8, 40):
        c = Counters()
        c.progress = 0.05 * start / 8
        plan = step_sizes(budget, c.progress, steps, start, batch, 1.0, accum, acc.merge_for)
        assert plan[:start] == [0] * start
        k, seen = start, []
        while k < steps:
            merge = acc.merge_for(budget.schedule.stage_at(c.progress).size)
            for _ in range(accum // merge):
                b = budget.schedule.stage_at(c.progress).size
                seen += [b] * merge
                budget.consume(c, b, batch * merge)
                k += merge
        assert all(p >= b for p, b in zip(plan[start:], seen))
        windows = [plan[j:j + accum] for j in range(start, steps, accum)]
        assert all(len(set(w)) == 1 for w in windows)
        assert len(set(plan[start:])) > 1  # the plan does change size within these epochs
        crops = [stage_crop_size(p, final, patch) for p in plan[start:]]
        assert all(s >= b for s, b in zip(crops, seen))


def test_gpu_decode_path_follows_the_plan(woof):
    """data.decode gpu (run on the CPU here: the same code): each batch is decoded in the main process and
    cropped to its step's S; the B x B input stays >= 40 dB from the exact CPU path."""
    index = load_index(woof)
    exact = batches(ShardLoader(spec_for(index, 8, 0, 224)), 0)
    spec = StreamSpec(index, 8, 1, 0, 1, seed=3, shuffle_buffer=16, augment=AugmentConfig(size=224), decode="gpu")
    loader = ShardLoader(spec, decode_device="cpu")
    steps = loader.steps_in_epoch()
    plan = [192 if k % 2 == 0 else 0 for k in range(steps)]
    staged = batches(loader, 0, sizes=plan)
    assert [b["image"].shape[-1] for b in staged] == [p or 224 for p in plan]
    assert all(torch.equal(a["id"], b["id"]) for a, b in zip(exact, staged))
    ref = torch.cat([at_size(x["image"].float(), 96) for x in exact[::2]])
    got = torch.cat([at_size(x["image"].float(), 96) for x in staged[::2]])
    assert psnr(ref, got) >= MIN_PSNR_DB
    loader.close()


def test_config_key():
    validate_data(DataConfig(train_shards="x", stage_sized_decode=True))
    validate_data(DataConfig(train_shards="x", stage_sized_decode=True, decode="gpu"))
    with pytest.raises(ConfigError, match="stage_sized_decode"):
        validate_data(DataConfig(train_shards="x", stage_sized_decode="yes"))


def test_corrupt_stand_ins_take_their_steps_size(tmp_path):
    """A corrupt / missing sample is replaced by the last good one, redone at its own step's size (runs of them
    across a size change, before the first good sample included)."""
    rng = np.random.default_rng(1)

    def jpeg() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
        return buf.getvalue()

    images = [b"garbage"] * 6 + [jpeg() for _ in range(10)] + [b""] * 5 + [jpeg() for _ in range(27)]
    write_samples((Sample(key=f"{k:04d}", image=d, ext="jpg", cls=0) for k, d in enumerate(images)),
                  tmp_path / "t", split="train", samples_per_shard=16)
    (tmp_path / "t" / "train-000001.tar").unlink()  # 16 samples missing as well
    index = load_index(tmp_path / "t")
    loader = ShardLoader(StreamSpec(index, 4, 1, 0, 0, seed=0, shuffle_buffer=0, augment=AugmentConfig(size=32)))
    steps = loader.steps_in_epoch()
    plan = [(16, 24, 0)[k % 3] for k in range(steps)]
    out = batches(loader, 0, sizes=plan)
    assert [b["image"].shape[-1] for b in out] == [p or 32 for p in plan]
    assert int(sum(b["corrupt"].sum() for b in out)) == 6 + 16
    loader.close()


@pytest.mark.slow
def test_run_with_merged_micro_batches_and_stage_sized_decode(tmp_path, demo_data):
    """grow_micro_batch merges loader batches with torch.cat: the plan keeps a merge window at one size."""
    out = tmp_path / "run"
    r = run(pretrain_cmd(out, demo_data, "train.epochs=2", "curriculum.schedule=efficienttrain++", "model.img_size=64",
                         "data.stage_sized_decode=true", "train.grad_accum=4", "curriculum.grow_micro_batch=true",
                         "train.batch_size=4", "checkpoint.every_steps=0"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_json(out / "final.json")["status"] == "finished"
    merged = {int(v) for _, v in scalars(out / "tensorboard", "train/micro_batch")}
    assert max(merged) > 4 and 4 in merged  # merged at low B, single batches at the final size
