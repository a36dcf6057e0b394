"""End to end on real images (CIFAR-10 JPEGs, 32x32): pre-train a tiny MAE, fine-tune it, linear-probe it, train
a ViT from scratch with the EfficientTrain++ curriculum, evaluate on 2 DeepSpeed ranks, and fail cleanly."""

import sys
import tarfile
from pathlib import Path

import pytest

from conftest import ROOT, deepspeed_launcher, read_json, run, scalars

CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
N_TRAIN, N_VAL = 3000, 1000
# the tiny ViT shared by pre-training and the classifiers: 8x8 patches of 4 pixels
VIT = ["model.img_size=32", "model.patch_size=4", "model.embed_dim=96", "model.depth=4", "model.num_heads=3"]
COMMON = ["data.num_workers=1", "data.shuffle_buffer=500", "log.progress_bar=false"]

pytestmark = pytest.mark.skipif(not CIFAR.is_file(), reason=f"needs {CIFAR}")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    """N_TRAIN train and N_VAL test images (balanced, shuffled) as shards, written by the project's writer."""
    import random

    from mae_curriculum.data.write_shards import Sample, write_samples

    want = {"train": N_TRAIN // 10, "test": N_VAL // 10}
    got: dict = {s: {c: [] for c in CLASSES} for s in want}
    with tarfile.open(CIFAR, "r:gz") as tf:
        for m in tf:
            p = m.name.split("/")
            if m.isfile() and len(p) == 4 and p[1] in want and p[3].endswith(".jpg"):
                if len(got[p[1]][p[2]]) < want[p[1]]:
                    got[p[1]][p[2]].append(tf.extractfile(m).read())
    root = tmp_path_factory.mktemp("cifar")
    for split, out in (("train", "train"), ("test", "val")):
        items = [(ci, b) for ci, c in enumerate(CLASSES) for b in got[split][c]]
        random.Random(0).shuffle(items)
        write_samples([Sample(f"{out}_{k:06d}", b, "jpg", ci) for k, (ci, b) in enumerate(items)],
                      root / out, out, 500, classes=CLASSES)
    return root


def data_args(cifar: Path) -> list[str]:
    return [f"data.train_shards={cifar / 'train'}", f"data.val_shards={cifar / 'val'}"]


def finetune_cmd(config: str, out: Path, cifar: Path, *overrides: str, launcher=None) -> list[str]:
    return [*(launcher or [sys.executable]), str(ROOT / "finetune.py"), "--config", str(ROOT / "configs" / config),
            *VIT, *COMMON, *data_args(cifar), f"output_dir={out}", *overrides]


@pytest.fixture(scope="module")
def pretrained(cifar, tmp_path_factory) -> Path:
    """A demo MAE pre-trained for a few epochs on the CIFAR train shards (its output_dir)."""
    out = tmp_path_factory.mktemp("mae") / "run"
    cmd = [sys.executable, str(ROOT / "pretrain.py"), "--config", str(ROOT / "configs" / "demo.yaml"), *VIT, *COMMON,
           *data_args(cifar), f"output_dir={out}", "model.decoder_embed_dim=64", "model.decoder_depth=1",
           "model.decoder_num_heads=2", "train.epochs=4", "curriculum.schedule=constant", "optim.blr=1.5e-3",
           "optim.warmup_epochs=0.5", "log.vis_every_epochs=0", "checkpoint.every_minutes=0",
           "checkpoint.every_epochs=4"]
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def check_eval_counts(final: dict) -> None:
    assert final["val_count"] == N_VAL and final["val_id_sum"] == N_VAL * (N_VAL - 1) // 2


@pytest.mark.slow
def test_finetune_demo_of_the_demo_mae_beats_chance(tmp_path, cifar, pretrained):
    out = tmp_path / "ft"
    r = run(finetune_cmd("finetune_demo.yaml", out, cifar, f"finetune.pretrained={pretrained / 'export'}",
                         "train.epochs=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    final = read_json(out / "final.json")
    assert final["top1"] > 20.0, final  # chance is 10%: 1000 samples put 20% > 10 sigma above it
    assert final["top5"] > final["top1"] and final["best_top1"] >= final["top1"] and final["epochs"] == 3
    check_eval_counts(final)
    assert [e for e, _ in scalars(out / "tensorboard", "eval/top1")] == [1, 2, 3]  # one point per epoch
    report = read_json(out / "load_report.json")
    assert report["format"] == "export" and report["pos_embed"].startswith("sin-cos")
    assert set(report["missing"]) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert "fc_norm.weight" in r.stderr  # the load report is also in the log
    for name in ("best", "last"):
        assert (out / name / "model.safetensors").stat().st_size > 100_000
    assert read_json(out / "best" / "metrics.json")["top1"] == final["best_top1"]
    assert read_json(out / "status.json")["status"] == "finished"


@pytest.mark.slow
def test_linear_probe_on_cached_features_from_a_deepspeed_checkpoint(tmp_path, cifar, pretrained):
    # MAE's LARS lr at its global batch of 16384 (blr 0.1 -> 6.4): with a batch of 128, blr * batch / 256 would
    # leave LARS's trust-ratio steps (1e-3 of the weight norm x lr) far too small for 10 short epochs
    out = tmp_path / "lp"
    r = run(finetune_cmd("finetune_demo.yaml", out, cifar, "mode=linprobe", "model.global_pool=token",
                         f"finetune.pretrained={pretrained / 'checkpoints'}", "augment.crop=center",
                         "optim.name=lars", "optim.lr=6.4", "optim.weight_decay=0", "optim.warmup_epochs=1",
                         "train.epochs=10", "train.batch_size=128", "checkpoint.every_epochs=0"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "features of 3000 + 1000 images extracted" in r.stderr  # the fast path ran
    assert read_json(out / "load_report.json")["format"] == "deepspeed"
    final = read_json(out / "final.json")
    assert final["top1"] > 20.0, final
    check_eval_counts(final)


@pytest.mark.slow
def test_supervised_demo_with_the_curriculum_beats_chance(tmp_path, cifar):
    out = tmp_path / "sup"
    r = run(finetune_cmd("supervised_demo.yaml", out, cifar, "train.epochs=2", "log.every_steps=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    final = read_json(out / "final.json")
    assert final["top1"] > 20.0, final
    check_eval_counts(final)
    sizes = [v for _, v in scalars(out / "tensorboard", "curriculum/B")]
    assert sizes[0] == 12 and sizes[-1] == 32 and sizes == sorted(sizes) and 24 in sizes  # ET++ at 32 px
    mags = [v for _, v in scalars(out / "tensorboard", "curriculum/randaug_magnitude")]
    assert mags[0] == 0 and mags[-1] > 0 and mags == sorted(mags)
    assert "pos-embed resized to a 3x3 grid" in r.stderr and "pos-embed resized to a 8x8 grid" in r.stderr
    # compute accounting: the budget of 2 epochs at 32 px buys more (cheaper) epochs at low resolution
    assert final["epochs"] > 3


@pytest.mark.slow
def test_two_rank_evaluation_counts_every_sample_once(tmp_path, cifar):
    out = tmp_path / "two"
    # 1000 samples: 500 per rank in batches of 96 -> 6 batches per rank, the last one padded
    # (the training steps also run the full MAE recipe's on-device pieces: random erasing, mixup/cutmix, EMA)
    r = run(finetune_cmd("supervised_demo.yaml", out, cifar, "train.max_steps=2", "eval.batch_size=96",
                         "curriculum.schedule=constant", "augment.mixup=0.8", "augment.cutmix=1.0",
                         "augment.reprob=0.25", "ema.enabled=true", launcher=deepspeed_launcher(29571)), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    final = read_json(out / "final.json")
    assert final["world_size"] == 2 and final["steps"] == 2 and "ema_top1" in final
    check_eval_counts(final)


@pytest.mark.slow
def test_bad_checkpoints_fail_with_one_line_and_exit_2(tmp_path, cifar, pretrained):
    r = run(finetune_cmd("finetune_demo.yaml", tmp_path / "a", cifar, "finetune.pretrained=/nonexistent/ckpt.pth"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "error: finetune.pretrained: not found: /nonexistent/ckpt.pth"
    r = run(finetune_cmd("finetune_demo.yaml", tmp_path / "b", cifar, f"finetune.pretrained={pretrained}",
                         "model.depth=6"))
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "does not fit the model: 4 blocks in the checkpoint, 6 in the model" in last
    assert "Traceback" not in r.stderr
    r = run(finetune_cmd("finetune_demo.yaml", tmp_path / "c", cifar, f"finetune.pretrained={pretrained}",
                         "model.embed_dim=192"))
    assert r.returncode == 2 and "does not fit the model" in r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_resume_across_a_stage_change_restores_the_resized_pos_embed_and_moments(tmp_path, cifar):
    import math

    import torch

    out = tmp_path / "res"
    args = ("train.epochs=2", "checkpoint.every_epochs=0", "curriculum.schedule=efficienttrain++")
    # ET++ at 32 px: 12 px for the first 20% of the compute (cost ~ size^2), then 24 px. The step that crosses
    # 20% still runs at 12 px: its checkpoint holds the 3x3 table although its progress is in the 24 px stage.
    steps_per_epoch = N_TRAIN // 64
    first = math.ceil(0.2 / (12 * 12 / (2 * steps_per_epoch * 32 * 32)))
    r = run(finetune_cmd("supervised_demo.yaml", out, cifar, *args, f"train.max_steps={first}"))
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(out / "checkpoints" / f"step{first:09d}" / "mp_rank_00_model_states.pt", weights_only=True)
    assert state["module"]["pos_embed"].shape == (1, 1 + 3 * 3, 96)
    assert state["counters"]["progress"] > 0.2
    r = run(finetune_cmd("supervised_demo.yaml", out, cifar, *args, "train.max_steps=150"))
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stderr
    assert log.index("resized to a 3x3 grid") < log.index("resumed from") < log.index("resized to a 6x6 grid")
    final = read_json(out / "final.json")
    assert final["steps"] == 150 and final["samples"] == 150 * 64
    # the 6x6 table's AdamW moments were resized with it (and the second moments stay >= 0)
    state = torch.load(out / "checkpoints" / "step000000150" / "mp_rank_00_model_states.pt", weights_only=True)
    assert state["module"]["pos_embed"].shape == (1, 1 + 6 * 6, 96)
    moments = [s for s in state["optimizer"]["state"].values() if s["exp_avg"].shape == (1, 37, 96)]
    assert len(moments) == 1 and (moments[0]["exp_avg_sq"] >= 0).all()


@pytest.mark.slow
def test_nonfinite_losses_follow_the_pretraining_policy(tmp_path, cifar):
    """Fine-tuning skips a non-finite step, rolls back after train.nan_skip_limit in a row, and stops with exit 3
    when it happens again from the same checkpoint: the same policy (engine/nonfinite.py) as pre-training."""
    from conftest import fault_cmd

    args = ("train.max_steps=20", "checkpoint.every_steps=4", "train.nan_skip_limit=3", "curriculum.schedule=constant",
            "eval.every_epochs=100")
    out = tmp_path / "nan1"
    r = run(fault_cmd(finetune_cmd("supervised_demo.yaml", out, cifar, *args), "--nan-at-micro-steps", "5"))
    assert r.returncode == 0, r.stderr[-3000:]
    final = read_json(out / "final.json")
    assert final["nonfinite_skips"] == 1 and final["rollbacks"] == 0 and final["steps"] == 20
    out = tmp_path / "nanroll"
    r = run(fault_cmd(finetune_cmd("supervised_demo.yaml", out, cifar, *args), "--nan-at-micro-steps", "10,11,12"))
    assert r.returncode == 3, r.stderr[-3000:]
    assert "rolling back to" in r.stderr and "step000000008" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: 3 consecutive non-finite losses again after rolling back")
    status = read_json(out / "ranks" / "rank0.json")  # per-rank status, as in pre-training
    assert status["status"] == "diverged" and status["step"] >= 8
