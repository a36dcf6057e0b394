"""EfficientTrain++ as its authors run it, in supervised training (issue 18, items 3-5): Swin windows that follow
the stage with their bias tables and AdamW moments resampled, micro-batch growth on by default (the pre-training
mechanism), the RandAugment magnitude switching at the exact step a stage begins, bicubic RandAugment, drop path
scaled with the budget, evaluation at the stage size."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, read_json, run, scalars
from mae_curriculum.config import ConfigError, PretrainConfig, load_config
from mae_curriculum.config_finetune import FinetuneConfig, effective_drop_path
from mae_curriculum.curriculum.schedule import build_schedule
from mae_curriculum.data.index import load_index
from mae_curriculum.data.loader import ShardLoader, StreamSpec
from mae_curriculum.data.transforms import AugmentConfig, _randaug
from mae_curriculum.engine import classifier as C
from mae_curriculum.engine.accumulation import Accumulation
from mae_curriculum.engine.progress import Budget, step_stages
from mae_curriculum.engine.state import Counters


def tiny_swin(img_size: int = 128, window: int = 4):
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, embed_dim=16,
                             depths=(2, 2), num_heads=(1, 2), img_size=img_size, window_size=window,
                             drop_path_rate=0.0)


def bilinear_table(t: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """The authors' rule, written out independently: (2w-1)^2 x heads -> bilinear, align_corners=False."""
    g = t.view(2 * old - 1, 2 * old - 1, -1).permute(2, 0, 1).unsqueeze(0)
    g = F.interpolate(g, size=(2 * new - 1, 2 * new - 1), mode="bilinear", align_corners=False)
    return g.squeeze(0).permute(1, 2, 0).reshape((2 * new - 1) ** 2, -1)


def test_swin_window_follows_the_stage_with_its_bias_tables_and_adamw_moments():
    # ET++'s window is B/32 for the 224 / window-7 models (and the 384 / window-12 ones)
    assert [C.swin_window(7, b, 224) for b in (96, 160, 192, 224)] == [3, 5, 6, 7]
    assert C.swin_window(12, 96, 384) == 3
    torch.manual_seed(0)
    model = tiny_swin()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 3, 128, 128)).logsumexp(1).sum().backward()
    opt.step()
    attns = C._window_attentions(model)
    tables = [a.relative_position_bias_table for a in attns]
    old = [(t.detach().clone(), opt.state[t]["exp_avg"].clone(), opt.state[t]["exp_avg_sq"].clone()) for t in tables]
    assert C.swin_final_windows(model) == (4, 4) and all(t.shape[0] == 7 * 7 for t in tables)

    assert C.resize_swin_(model, 64, C.swin_windows((4, 4), 64, 128), opt)
    assert not C.resize_swin_(model, 64, (2, 2), opt)  # already there: nothing is touched
    blocks = [b for layer in model.layers for b in layer.blocks]
    assert [b.window_size for b in blocks] == [(2, 2)] * 4 and [b.shift_size for b in blocks][1] == (1, 1)
    owned = {id(p) for g in opt.param_groups for p in g["params"]}
    for a, t, (w, m1, m2) in zip(attns, tables, old):
        assert a.relative_position_bias_table is t and id(t) in owned  # the optimizer still owns the table
        assert torch.allclose(t.detach(), bilinear_table(w, 4, 2), atol=1e-6)
        assert torch.equal(t.detach()[4], w[24])  # offset (0, 0): the 3x3 centre is the 7x7 centre, exactly
        assert torch.allclose(opt.state[t]["exp_avg"], bilinear_table(m1, 4, 2), atol=1e-7)
        assert torch.allclose(opt.state[t]["exp_avg_sq"], bilinear_table(m2, 4, 2), atol=1e-9)
        assert (opt.state[t]["exp_avg_sq"] >= 0).all()
    # trains at 64 px with the resampled state; evaluation at the final size puts the tables back exactly
    before = [t.detach().clone() for t in tables]
    opt.zero_grad()
    model(torch.randn(2, 3, 64, 64)).logsumexp(1).sum().backward()
    opt.step()
    assert all(not torch.equal(b, t.detach()) for b, t in zip(before, tables))
    trained = [t.detach().clone() for t in tables]
    with C.swin_at_size(model, 128, (4, 4)):
        assert [b.window_size for b in blocks] == [(4, 4)] * 4 and model(torch.randn(1, 3, 128, 128)).shape == (1, 5)
    assert [b.window_size for b in blocks] == [(2, 2)] * 4 and tuple(model.patch_embed.img_size) == (64, 64)
    assert all(torch.equal(a, t.detach()) for a, t in zip(trained, tables))


def test_randaugment_is_bicubic_and_follows_a_per_step_magnitude_plan(demo_data):
    assert {op.kwargs["resample"] for op in _randaug(9, 0.5).ops} == {3}  # PIL.Image.BICUBIC, never random

    spec = StreamSpec(load_index(demo_data / "train"), 8, 1, 0, 1, seed=0, shuffle_buffer=16,
                      augment=AugmentConfig(size=32, randaug_magnitude=0.0))
    loader = ShardLoader(spec)  # one persistent worker: the plan reaches it through shared memory
    keep = np.zeros(spec.index.num_samples, dtype=bool)
    keep[:96] = True  # 12 steps

    def epoch(**kw):
        loader.start_epoch(0, keep=keep, **kw)
        return [b["image"] for b in loader]

    low, high = epoch(magnitude=0.0), epoch(magnitude=9.0)
    k = len(low) // 2 + 1  # a stage that begins mid-epoch, at loader step k
    mixed = epoch(magnitude=0.0, magnitudes=[0.0] * k + [9.0] * (len(low) - k))
    assert all(torch.equal(a, b) for a, b in zip(mixed[:k], low[:k]))
    assert all(torch.equal(a, b) for a, b in zip(mixed[k:], high[k:]))
    assert not all(torch.equal(a, b) for a, b in zip(low[k:], high[k:]))
    assert all(torch.equal(a, b) for a, b in zip(epoch(magnitude=0.0), low))  # the plan does not outlive its epoch
    loader.close()


@pytest.mark.parametrize("grow", [False, True])
def test_step_stages_is_what_the_run_sees(grow):
    """The engine's walk (stage from the progress before each micro-step, merge fixed per window): the plan gives
    every loader step the stage its micro-step runs in, stage changes mid-epoch included."""
    final, batch, accum, steps = 64, 4, 4, 120
    schedule = build_schedule("efficienttrain++", final_size=final, patch_size=8)
    budget = Budget(schedule, final, lambda s: float(s * s), 0.25, steps * batch)
    acc = Accumulation(accum, final, grow)
    for start in (0, 8, 40):
        c = Counters()
        c.progress = 0.05 * start / 8
        plan = step_stages(budget, c.progress, steps, start, batch, 1.0, accum, acc.merge_for)
        seen = []
        while len(seen) < steps - start:
            merge = acc.merge_for(schedule.stage_at(c.progress).size)
            for _ in range(accum // merge):
                stage = schedule.stage_at(c.progress)
                seen += [stage.index] * merge
                budget.consume(c, stage.size, batch * merge)
        assert plan[:start] == [-1] * start and plan[start:] == seen[:steps - start]
        assert any(plan[j] != plan[j - 1] for j in range(start + 1, steps))  # stages begin mid-epoch


def test_config_keys_and_shipped_recipes(tmp_path):
    for d in ("train", "val"):
        (tmp_path / d).mkdir()
    base = [f"data.train_shards={tmp_path / 'train'}", f"data.val_shards={tmp_path / 'val'}"]
    demo = ROOT / "configs" / "supervised_demo.yaml"
    cfg = load_config(FinetuneConfig, demo, base)
    assert cfg.curriculum.grow_micro_batch is True and cfg.eval.at_stage_size is False
    assert cfg.model.drop_path_ref_epochs == 0 and effective_drop_path(cfg) == cfg.model.drop_path
    assert load_config(PretrainConfig, ROOT / "configs" / "demo.yaml").curriculum.grow_micro_batch is False
    cfg = load_config(FinetuneConfig, demo, [*base, "model.drop_path=0.1", "model.drop_path_ref_epochs=200",
                                              "train.epochs=300", "eval.at_stage_size=true"])
    assert effective_drop_path(cfg) == pytest.approx(0.15) and cfg.eval.at_stage_size is True
    for override, start in (("curriculum.grow_micro_batch=maybe", "curriculum.grow_micro_batch: expected true/false"),
                            ("eval.at_stage_size=2", "eval.at_stage_size: expected true/false"),
                            ("model.drop_path_ref_epochs=-1", "model.drop_path_ref_epochs must be >= 0"),
                            ("model.drop_path_ref_epochs=abc", "model.drop_path_ref_epochs: expected a number")):
        with pytest.raises(ConfigError) as e:
            load_config(FinetuneConfig, demo, [*base, override])
        assert str(e.value).startswith(start), str(e.value)
    with pytest.raises(ConfigError, match=r"drop_path_ref_epochs = 0.5 x 300.0 / 100.0 = 1.5 must be < 1"):
        load_config(FinetuneConfig, demo, [*base, "model.drop_path=0.5", "model.drop_path_ref_epochs=100",
                                            "train.epochs=300"])
    # the shipped ET++ recipes: the authors' per-GPU batches (512 at 96/160, 256 x 2 at 192/224 for DeiT-S and
    # Swin-T, 512 throughout for ResNet-50), drop path x budget/200, clipping 5 (not ResNet-50), min_lr 1e-6
    for name, dp, clip, accum in (("deit_s", 0.1, 5.0, 2), ("swin_t", 0.2, 5.0, 2), ("resnet50", 0.0, 0.0, 1)):
        cfg = load_config(FinetuneConfig, ROOT / "configs" / f"supervised_{name}.yaml", base)
        assert (cfg.train.batch_size * cfg.train.grad_accum, cfg.train.grad_accum) == (512, accum), name
        assert cfg.model.drop_path_ref_epochs == 200 and effective_drop_path(cfg) == pytest.approx(dp), name
        assert (cfg.optim.gradient_clipping, cfg.optim.min_lr) == (clip, 1e-6), name
        base_cfg = load_config(FinetuneConfig, ROOT / "configs" / f"supervised_{name}_baseline.yaml", base)
        assert (base_cfg.optim.gradient_clipping, base_cfg.optim.min_lr) == (clip, 1e-6), name


@pytest.mark.slow
def test_supervised_swin_grows_the_micro_batch_and_switches_magnitude_mid_epoch(tmp_path, demo_data):
    """A tiny Swin under ET++ at 64 px, batch 8 x 4 accumulation: at 32 px (window 2) four loader batches make one
    micro-batch of 32 (accumulation 1), at 48 px (window 3) 8 x 4 again; every optimizer step takes 32 images.
    The RandAugment magnitude changes at loader steps inside an epoch; evaluation runs at the stage size."""
    out = tmp_path / "swin"
    cmd = [sys.executable, str(ROOT / "finetune.py"), "--config", str(ROOT / "configs" / "supervised_demo.yaml"),
           f"output_dir={out}", f"data.train_shards={demo_data / 'train'}", f"data.val_shards={demo_data / 'val'}",
           "data.num_workers=1", "data.shuffle_buffer=64", "log.progress_bar=false", "log.every_steps=1",
           "checkpoint.every_minutes=0", "checkpoint.every_epochs=0", "model.name=swin_tiny_patch4_window7_224",
           "model.img_size=64", "model.patch_size=16",
           "model.kwargs={embed_dim: 16, depths: [2, 2], num_heads: [1, 2], window_size: 4, img_size: 64}",
           "train.batch_size=8", "train.grad_accum=4", "train.epochs=1", "train.max_steps=14",
           "curriculum.max_magnitude=9", "eval.at_stage_size=true"]
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    final = read_json(out / "final.json")
    assert final["global_batch"] == 32 and final["steps"] == 14 and final["samples"] == 14 * 32
    micro = [v for _, v in scalars(out / "tensorboard", "train/micro_batch")]
    sizes = [v for _, v in scalars(out / "tensorboard", "curriculum/B")]
    assert set(zip(sizes, micro)) == {(32, 32), (48, 8)}, set(zip(sizes, micro))
    log = r.stderr
    assert "Swin windows 2/2" in log and "Swin windows 3/3" in log and "at 48 px" in log
    # 60 loader steps per epoch; stage 1 (m1) begins inside epoch 0, at a micro-batch boundary (4 merged batches)
    line = next(x for x in log.splitlines() if "RandAugment magnitude 1 from loader step" in x)
    step = int(line.split("from loader step ")[1].split()[0])
    assert 0 < step < 60 and step % 4 == 0 and "of epoch 0" in line
