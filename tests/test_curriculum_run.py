"""The curriculum inside real training: stage changes, compute budget, micro-batch growth, grids at B."""

import pytest
from PIL import Image
from safetensors.torch import load_file

from conftest import pretrain_cmd, read_json, run, scalars
from mae_curriculum.curriculum.flops import mae_flops_per_image

TINY_FLOPS = dict(patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1)


@pytest.mark.slow
def test_efficienttrain_pp_spends_the_compute_budget_and_changes_stage_in_flight(tmp_path, demo_data):
    out = tmp_path / "etpp"
    r = run(pretrain_cmd(out, demo_data, "train.epochs=3", "curriculum.schedule=efficienttrain++",
                         "log.vis_every_epochs=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    final = read_json(out / "final.json")
    # budget = 3 epochs of 480 images at the final size 32; a stage is 1/10 of it; overshoot < one step
    budget = 3 * 480 * mae_flops_per_image(32, **TINY_FLOPS)
    assert budget <= final["flops"] < budget + 16 * mae_flops_per_image(32, **TINY_FLOPS)
    sizes = [int(v) for _, v in scalars(out / "tensorboard", "curriculum/B")]
    assert sorted(set(sizes)) == [16, 24, 32] and sizes == sorted(sizes)  # 96/160/224 scaled to 32, patch 8
    assert final["samples"] > 3 * 480  # low-resolution stages process more images for the same compute
    stages = [int(v) for _, v in scalars(out / "tensorboard", "curriculum/stage")]
    assert stages[0] == 0 and stages[-1] == 9
    gflops = scalars(out / "tensorboard", "curriculum/gflops_per_image")
    assert gflops[0][1] < gflops[-1][1]
    # one run, no restart: the step counter is continuous and the optimizer kept going across stages
    steps = [s for s, _ in scalars(out / "tensorboard", "train/loss")]
    assert steps == list(range(1, final["step"] + 1))
    # reconstruction grids are drawn at the B of the moment: 8 images of B px + 2 px padding
    first = Image.open(out / "vis" / "epoch0000.png")
    last = Image.open(out / "vis" / "final.png")
    assert first.size[0] == 8 * (16 + 2) + 2 and last.size[0] == 8 * (32 + 2) + 2


@pytest.mark.slow
def test_growing_the_micro_batch_at_low_resolution_keeps_the_optimisation(tmp_path, demo_data):
    common = ["train.epochs=2", "curriculum.schedule=efficienttrain++", "train.grad_accum=4",
              "train.deterministic=true"]
    a, b = tmp_path / "fixed", tmp_path / "grow"
    assert run(pretrain_cmd(a, demo_data, *common)).returncode == 0
    r = run(pretrain_cmd(b, demo_data, *common, "curriculum.grow_micro_batch=true"))
    assert r.returncode == 0, r.stderr[-3000:]
    fa, fb = read_json(a / "final.json"), read_json(b / "final.json")
    assert (fa["step"], fa["samples"]) == (fb["step"], fb["samples"])
    micro = {int(v) for _, v in scalars(b / "tensorboard", "train/micro_batch")}
    assert micro == {64, 16}  # B=16: 4 batches merged (accumulation 1); B=24 and 32: 16 x 4 accumulation steps
    la = [v for _, v in scalars(a / "tensorboard", "train/loss")]
    lb = [v for _, v in scalars(b / "tensorboard", "train/loss")]
    assert abs(la[-1] - lb[-1]) < 0.05 * abs(la[-1])
    # same samples, same masks, same global batch: one optimizer step at B=16 gives the same weights up to
    # float summation order (later, Adam amplifies rounding in near-zero gradients to ~one lr step per weight)
    one = []
    for name, grow in (("fixed1", "false"), ("grow1", "true")):
        r = run(pretrain_cmd(tmp_path / name, demo_data, *common, "train.max_steps=1",
                             f"curriculum.grow_micro_batch={grow}"))
        assert r.returncode == 0, r.stderr[-3000:]
        one.append(load_file(str(tmp_path / name / "export" / "mae.safetensors")))
    wa, wb = one
    num = sum(float((wa[k] - wb[k]).norm() ** 2) for k in wa) ** 0.5
    den = sum(float(wa[k].norm() ** 2) for k in wa) ** 0.5
    assert num / den < 1e-6, num / den


@pytest.mark.slow
def test_compiled_training_compiles_once_per_stage(tmp_path, demo_data):
    out = tmp_path / "compiled"
    r = run(pretrain_cmd(out, demo_data, "train.epochs=1", "train.compile=true", "curriculum.schedule=custom",
                         "curriculum.stages=[{size: 16, fraction: 0.5, magnitude: 0}, {size: 32, fraction: 0.5, magnitude: 0}]"),
            timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    final = read_json(out / "final.json")
    sizes = {int(v) for _, v in scalars(out / "tensorboard", "curriculum/B")}
    assert sizes == {16, 32} and final["step"] > 20
    assert final["compiled_graphs"] == 2  # one graph per B, not one per step
