"""End-to-end pre-training: the loss drops, 2 DeepSpeed ranks agree, outputs a user can look at exist."""

import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import pretrain_cmd, read_json, run, scalars


@pytest.mark.slow
def test_demo_trains_loss_drops_and_writes_outputs(tmp_path, demo_data):
    out = tmp_path / "run"
    r = run(pretrain_cmd(out, demo_data, "train.epochs=6", "curriculum.schedule=constant",
                         "log.vis_every_epochs=3", "checkpoint.every_epochs=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    final = read_json(out / "final.json")
    steps_per_epoch = 480 // 16
    assert final["step"] == 6 * steps_per_epoch and final["epoch"] == 6 and final["samples"] == 6 * 480
    losses = [v for _, v in scalars(out / "tensorboard", "train/loss")]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    for tag in ("train/lr", "perf/images_per_s", "curriculum/B", "curriculum/cumulative_pflops"):
        assert scalars(out / "tensorboard", tag), tag
    assert (out / "vis" / "final.png").stat().st_size > 1000 and (out / "vis" / "epoch0002.png").is_file()
    # the export loads without DeepSpeed and reproduces the trained model's loss
    from mae_curriculum.engine.checkpoint import load_exported

    model = load_exported(out / "export").eval()
    enc = load_file(str(out / "export" / "encoder.safetensors"))
    assert not any(k.startswith("decoder") for k in enc) and "blocks.0.attn.qkv.weight" in enc
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        loss, per_sample, pred, mask = model(x, 0.75)
    assert torch.isfinite(loss) and pred.shape == (2, 16, 192)
    assert read_json(out / "status.json")["status"] == "finished"


@pytest.mark.slow
def test_two_rank_deepspeed_run_has_identical_step_counts(two_rank_reference):
    out = two_rank_reference
    ranks = [read_json(out / "ranks" / f"rank{k}.json") for k in range(2)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["status"] == ranks[1]["status"] == "finished"
    assert ranks[0]["step"] == ranks[1]["step"] > 0
    assert ranks[0]["samples"] == ranks[1]["samples"]
    # each optimizer step consumed 16 images on each of the 2 ranks
    assert read_json(out / "final.json")["samples"] == ranks[0]["step"] * 32


@pytest.mark.slow
def test_single_process_sets_rank_env_itself(tmp_path, demo_data):
    out = tmp_path / "run1"
    r = run(pretrain_cmd(out, demo_data, "train.max_steps=3", "--local_rank=0"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_json(out / "final.json")["step"] == 3
    assert "mpi4py" not in r.stderr


def test_help_runs_without_deepspeed_init():
    r = run([sys.executable, "pretrain.py", "--help"], timeout=60)
    assert r.returncode == 0 and "--resume" in r.stdout


@pytest.mark.slow
def test_device_decode_path_trains(tmp_path, demo_data):
    """data.decode=gpu: JPEG bytes + crop boxes from the workers, decoded on the training device (here the CPU)."""
    out = tmp_path / "devdecode"
    r = run(pretrain_cmd(out, demo_data, "train.max_steps=6", "data.decode=gpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    final = read_json(out / "final.json")
    assert final["step"] == 6 and final["corrupt_samples"] == 0
