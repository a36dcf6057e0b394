"""Pre-trained encoders into timm ViTs (all layouts), pos-embed resizing, layer decay, losses, eval sharding."""

import pickle
from pathlib import Path

import pytest
import torch

from mae_curriculum.config import ConfigError, ModelConfig, load_config
from mae_curriculum.config_finetune import FinetuneConfig, FTModelConfig
from mae_curriculum.models.mae import build_mae
from mae_curriculum.engine.classifier import check_input_sizes, resize_pos_embed_
from mae_curriculum.engine.optim import param_groups
from mae_curriculum.engine.pretrained import PretrainedError, load_pretrained
from mae_curriculum.models.vit import LinearProbe, build_vit, sincos_pos_embed

ROOT = Path(__file__).resolve().parents[1]
DIMS = dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3)


def tiny_mae(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, **DIMS)
    return build_mae(cfg).eval()


def vit(pool="avg", **kw):
    return build_vit(FTModelConfig(**{**DIMS, "drop_path": 0.0, **kw}), 10, pool).eval()


def mae_features(mae, x, pos=None, final_norm=True):
    """The MAE encoder on all patches in their original order (mask ratio 0, identity shuffle)."""
    if pos is not None:
        mae.pos_embed_for = lambda dim, grid, ref: pos.to(ref.dtype)
    norm = mae.norm
    if not final_norm:
        mae.norm = torch.nn.Identity()
    noise = torch.arange(64, dtype=torch.float32).expand(x.shape[0], 64)
    with torch.no_grad():
        latent = mae.forward_encoder(x, 0.0, noise)[0]
    mae.norm = norm
    return latent


def official_checkpoint(tmp_path, mae, pos):
    """The official MAE layout: {'model': state dict} with pos_embed (1, 1+L, D) and decoder keys, {'epoch'...}."""
    sd = {**mae.state_dict(), "pos_embed": pos, "decoder_pos_embed": torch.zeros(1, 65, 32)}
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": sd, "epoch": 799, "args": {"lr": 1.0}}, path)
    return path


def test_official_layout_gives_the_same_encoder_outputs(tmp_path):
    mae = tiny_mae()
    pos = torch.randn(1, 65, 48) * 0.2  # not sin-cos: proves the checkpoint's table is the one used
    path = official_checkpoint(tmp_path, mae, pos)
    x = torch.randn(3, 3, 32, 32)
    # cls-token layout (linear probe): every token after the final norm matches
    model = vit("token")
    report = load_pretrained(model, path)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), mae_features(mae, x, pos), atol=1e-5)
    assert report.format == "official-mae" and report.pos_embed == "checkpoint"
    assert report.missing == ["head.weight", "head.bias"] and report.ignored_decoder > 0
    # avg-pool layout (fine-tune): `norm` is unused (fc_norm is new), the blocks' output matches
    model = vit("avg")
    report = load_pretrained(model, path)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), mae_features(mae, x, pos, final_norm=False), atol=1e-5)
    assert set(report.missing) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert set(report.unused) == {"norm.weight", "norm.bias"}
    assert "checkpoint" in report.summary() and "fc_norm.weight" in report.summary()


def test_project_export_and_deepspeed_layouts_use_the_sincos_table(tmp_path):
    from mae_curriculum.engine.checkpoint import export_safetensors

    mae = tiny_mae(1)
    export_safetensors(mae, tmp_path / "export", {})
    step = tmp_path / "run" / "checkpoints" / "step000000010"
    step.mkdir(parents=True)
    torch.save({"module": mae.state_dict(), "ds_version": "0.19"}, step / "mp_rank_00_model_states.pt")
    (step / "complete.json").write_text("{}")
    x = torch.randn(2, 3, 32, 32)
    ref = mae_features(mae, x)
    for path, fmt in ((tmp_path / "export", "export"), (tmp_path / "export" / "encoder.safetensors", "export"),
                      (step, "deepspeed"), (tmp_path / "run", "deepspeed")):
        model = vit("token")
        report = load_pretrained(model, path)
        assert report.format == fmt and report.pos_embed.startswith("sin-cos"), path
        with torch.no_grad():
            assert torch.allclose(model.forward_features(x), ref, atol=1e-5), path
        assert torch.equal(model.pos_embed.data, sincos_pos_embed(48, (8, 8)))


def test_pos_embed_resized_on_load_and_unchanged_at_same_size(tmp_path):
    mae = tiny_mae()
    pos = torch.randn(1, 65, 48)
    path = official_checkpoint(tmp_path, mae, pos)
    same = vit()
    assert load_pretrained(same, path).pos_embed == "checkpoint"
    assert torch.equal(same.pos_embed.data, pos)  # the same grid: the table is taken bit for bit
    bigger = vit(img_size=48)
    report = load_pretrained(bigger, path)
    assert bigger.pos_embed.shape == (1, 1 + 12 * 12, 48) and "8x8 -> 12x12" in report.pos_embed
    assert torch.equal(bigger.pos_embed.data[:, :1], pos[:, :1])  # the cls row is never interpolated
    with torch.no_grad():
        assert bigger(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_stage_change_resizes_the_table_and_its_adamw_moments():
    torch.manual_seed(0)
    model = vit().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    opt.zero_grad()
    before = model.pos_embed.data.clone()
    assert resize_pos_embed_(model, 32, opt) is False  # same grid: nothing touched
    assert torch.equal(model.pos_embed.data, before)
    p = model.pos_embed
    assert resize_pos_embed_(model, 16, opt) is True
    assert model.pos_embed is p and p.shape == (1, 1 + 4 * 4, 48)  # same Parameter: the optimizer still owns it
    st = opt.state[p]
    assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape
    assert (st["exp_avg_sq"] >= 0).all()  # bilinear weights are convex: second moments stay non-negative
    assert torch.equal(p.data[:, :1], before[:, :1])
    assert tuple(model.patch_embed.grid_size) == (4, 4)
    out = model(torch.randn(4, 3, 16, 16))
    out.sum().backward()
    opt.step()  # AdamW runs on the resized state
    assert torch.isfinite(p).all()
    # a constant table stays constant under the resize (interpolation reproduces constants)
    m2 = vit()
    m2.pos_embed.data.fill_(0.5)
    resize_pos_embed_(m2, 24)
    assert torch.allclose(m2.pos_embed.data, torch.full_like(m2.pos_embed.data, 0.5))


def test_layer_decay_groups_and_scales():
    model = vit()
    decay, depth = 0.65, 3
    groups = param_groups(model, 0.05, decay)
    names = {id(p): n for n, p in model.named_parameters()}
    scale_of, wd_of = {}, {}
    for g in groups:
        for p in g["params"]:
            scale_of[names[id(p)]] = g["lr_scale"]
            wd_of[names[id(p)]] = g["weight_decay"]
    assert set(scale_of) == set(names.values())  # every parameter is in exactly one group

    def layer(name):
        if name.startswith(("patch_embed", "cls_token", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return depth + 1

    for name, s in scale_of.items():
        assert s == pytest.approx(decay ** (depth + 1 - layer(name))), name
    assert scale_of["head.weight"] == 1.0 and scale_of["pos_embed"] == pytest.approx(decay ** 4)
    assert wd_of["blocks.1.attn.qkv.weight"] == 0.05 and wd_of["head.weight"] == 0.05
    for name in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.2.attn.qkv.bias", "head.bias"):
        assert wd_of[name] == 0.0, name


@pytest.mark.parametrize("change, needle", [({"depth": 5}, "3 blocks in the checkpoint, 5 in the model"),
                                            ({"patch_size": 8}, "patch_embed.proj.weight is 48x3x4x4"),
                                            ({"embed_dim": 96}, "pos_embed of shape 1x65x48")])
def test_other_architecture_is_a_one_line_error(tmp_path, change, needle):
    path = official_checkpoint(tmp_path, tiny_mae(), torch.zeros(1, 65, 48))
    with pytest.raises(PretrainedError) as e:
        load_pretrained(vit(**change), path)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ConfigError)  # -> exit status 2 in the CLI


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unreadable_or_unsafe_checkpoints_are_refused(tmp_path):
    with pytest.raises(PretrainedError, match="not found"):
        load_pretrained(vit(), tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedError, match="cannot read"):
        load_pretrained(vit(), tmp_path / "junk.pth")

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(PretrainedError):
        load_pretrained(vit(), tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()  # weights_only=True: nothing was unpickled
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedError, match="no encoder.safetensors"):
        load_pretrained(vit(), tmp_path / "empty")


def test_linear_probe_head_and_frozen_encoder(tmp_path):
    mae = tiny_mae()
    path = official_checkpoint(tmp_path, mae, sincos_pos_embed(48, (8, 8)))
    probe = LinearProbe(build_vit(FTModelConfig(**DIMS, drop_path=0.1), 10, "token"), 10)
    bn, linear = probe.head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert 0.005 < linear.weight.std().item() < 0.015 and torch.all(linear.bias == 0)
    assert load_pretrained(probe, path).missing == ["head.1.weight", "head.1.bias"]
    trainable = [n for n, p in probe.named_parameters() if p.requires_grad]
    assert trainable == ["head.1.weight", "head.1.bias"]
    probe.train()
    assert not probe.encoder.training  # frozen: no drop path
    x = torch.randn(4, 3, 32, 32)
    feats = probe.features(x)
    assert torch.allclose(feats, mae_features(mae, x)[:, 0], atol=1e-5)  # the cls token after the final norm
    assert torch.allclose(probe(feats, features=True), probe(x))


def test_per_sample_losses_match_timm():
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from mae_curriculum.engine.finetune import per_sample_loss

    torch.manual_seed(0)
    logits, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    soft = torch.softmax(torch.randn(8, 10), 1)
    per = per_sample_loss(logits, soft)
    assert per.shape == (8,) and torch.allclose(per.mean(), SoftTargetCrossEntropy()(logits, soft))
    per = per_sample_loss(logits, y, 0.1)
    assert per.shape == (8,) and torch.allclose(per.mean(), LabelSmoothingCrossEntropy(0.1)(logits, y))


def test_window_model_with_strict_size_is_refused_clearly():
    from timm.models.swin_transformer import SwinTransformer

    kw = dict(img_size=64, patch_size=4, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 2), num_classes=3)
    with pytest.raises(ConfigError, match="does not accept 32x32 inputs.*strict_img_size=false"):
        check_input_sizes(SwinTransformer(**kw), [32, 64])
    check_input_sizes(SwinTransformer(strict_img_size=False, **kw), [32, 48, 64])  # padded to the window


@pytest.mark.parametrize("world, batch, workers", [(1, 96, 0), (2, 96, 2), (3, 7, 1), (4, 512, 0)])
def test_eval_loader_sees_every_sample_once(tmp_path_factory, world, batch, workers):
    from mae_curriculum.data.eval_loader import EvalLoader
    from mae_curriculum.data.index import load_index
    from mae_curriculum.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.getbasetemp() / "eval_split"
    if not (root / "val" / "_info.json").is_file():
        make_synthetic_dataset(root, 20, 101, 16, samples_per_shard=30, seed=0)
    index = load_index(root / "val")
    seen, steps = [], set()
    for rank in range(world):
        loader = EvalLoader(index, batch, world, rank, 16, workers)
        batches = list(loader)
        steps.add(len(batches))
        for b in batches:
            assert b["image"].shape == (batch, 3, 16, 16) and b["valid"].shape == (batch,)
            seen += b["id"][b["valid"]].tolist()
            assert (b["label"][~b["valid"]] == -1).all()
    assert len(steps) == 1  # every rank runs the same number of batches
    assert sorted(seen) == list(range(101))


def test_config_rules(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    base = [f"data.train_shards={tmp_path / 'train'}", f"data.val_shards={tmp_path / 'val'}"]
    with pytest.raises(ConfigError, match="finetune.pretrained must be set"):
        load_config(FinetuneConfig, None, base)
    with pytest.raises(ConfigError, match="finetune.pretrained: not found"):
        load_config(FinetuneConfig, None, [*base, "finetune.pretrained=/nonexistent/x.pth"])
    with pytest.raises(ConfigError, match="even train.batch_size"):
        load_config(FinetuneConfig, None, [*base, "mode=supervised", "train.batch_size=7"])
    with pytest.raises(ConfigError, match="mode is supervised"):
        load_config(FinetuneConfig, None, [*base, "mode=supervised", f"finetune.pretrained={tmp_path}"])
    with pytest.raises(ConfigError, match="optim.layer_decay"):
        load_config(FinetuneConfig, None, [*base, "mode=supervised", "optim.layer_decay=0"])
    cfg = load_config(FinetuneConfig, None, [*base, "mode=supervised"])
    assert cfg.data.crop_scale_min == 0.08 and cfg.optim.betas == [0.9, 0.999] and cfg.optim.min_lr == 1e-6


def test_paper_recipe_configs(tmp_path):
    (tmp_path / "d").mkdir()
    fix = [f"data.train_shards={tmp_path / 'd'}", f"data.val_shards={tmp_path / 'd'}"]
    pre = [f"finetune.pretrained={tmp_path / 'd'}"]
    expect = {"vit_b": (768, 12, 0.65, 0.1, 5e-4, 100), "vit_l": (1024, 24, 0.75, 0.2, 1e-3, 50),
              "vit_h": (1280, 32, 0.75, 0.3, 1e-3, 50)}
    for name, (dim, depth, ld, dp, blr, epochs) in expect.items():
        c = load_config(FinetuneConfig, ROOT / "configs" / f"finetune_{name}.yaml", fix + pre)
        assert (c.model.embed_dim, c.model.depth, c.optim.layer_decay, c.model.drop_path) == (dim, depth, ld, dp)
        assert (c.optim.blr, c.train.epochs, c.optim.warmup_epochs, c.optim.min_lr) == (blr, epochs, 5, 1e-6)
        assert (c.augment.mixup, c.augment.cutmix, c.augment.smoothing, c.augment.reprob) == (0.8, 1.0, 0.1, 0.25)
        assert c.model.global_pool == "avg" and c.model.head_init_std == 2e-5 and c.curriculum.max_magnitude == 9
        assert c.train.batch_size * c.train.grad_accum * 8 == 1024
        lp = load_config(FinetuneConfig, ROOT / "configs" / f"linprobe_{name}.yaml", fix + pre)
        assert (lp.mode, lp.optim.name, lp.optim.blr, lp.optim.weight_decay, lp.train.epochs) == \
            ("linprobe", "lars", 0.1, 0.0, 90)
        assert lp.train.batch_size * lp.train.grad_accum * 8 == 16384
    for name, sched in (("deit_s", "efficienttrain++-deit"), ("swin_t", "efficienttrain++"),
                        ("resnet50", "efficienttrain++")):
        c = load_config(FinetuneConfig, ROOT / "configs" / f"supervised_{name}.yaml", fix)
        # ET++'s 1.5x setting: a 200-epoch budget (in final-size epochs) replaces the 300-epoch baseline
        assert c.mode == "supervised" and c.curriculum.schedule == sched and c.train.epochs == 200
        assert c.train.batch_size * c.train.grad_accum * 8 == 4096 and c.optim.warmup_epochs == 0.2 * 200
        base = load_config(FinetuneConfig, ROOT / "configs" / f"supervised_{name}_baseline.yaml", fix)
        assert base.curriculum.schedule == "constant" and base.train.epochs == 300
    for name in ("finetune_demo", "supervised_demo"):
        load_config(FinetuneConfig, ROOT / "configs" / f"{name}.yaml", fix + (pre if name.startswith("finetune") else []))
