"""benchmarks/time_to_accuracy.py (issue 15): the --quick harness end to end (real pretrain.py / finetune.py runs),
restartability (a second invocation skips finished cells), and its pure pieces (statistics, headline, cells);
plus the two fidelity details of the MAE pre-training recipe: weight decay on cls/mask tokens (a) and the loss
target from the fp32 pixels under bf16 (b)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, run

SCRIPT = ROOT / "benchmarks" / "time_to_accuracy.py"


def _module():
    if "time_to_accuracy" not in sys.modules:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        spec = importlib.util.spec_from_file_location("time_to_accuracy", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["time_to_accuracy"] = mod  # before running it: its dataclass looks its module up
        spec.loader.exec_module(mod)
    return sys.modules["time_to_accuracy"]


# --------------------------------------------------------------------------------------------------------------
# the harness, end to end
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    from mae_curriculum.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("tta_data")
    make_synthetic_dataset(root, train_size=160, val_size=64, size=32, samples_per_shard=80, seed=0)
    return root


def _quick(data: Path, out: Path):
    t0 = time.perf_counter()
    r = run([sys.executable, str(SCRIPT), "--quick", "--train", str(data / "train"), "--val", str(data / "val"),
             "--out", str(out)], timeout=400)
    return r, time.perf_counter() - t0


@pytest.mark.slow
def test_quick_run_records_every_cell_then_skips_finished_cells(tmp_path, small_data):
    out = tmp_path / "tta"
    r, first_s = _quick(small_data, out)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads((out / "time_to_accuracy.json").read_text())
    png = out / "time_to_accuracy.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    cells = res["cells"]
    assert {(c["schedule"], c["budget"], c["seed"]) for c in cells} == {
        (s, b, 0) for s in ("constant", "efficienttrain++") for b in (1.0, 2.0)}
    for c in cells:
        assert c["pretrain_finished"] and c["linprobe_finished"] and c["finetune_finished"], c
        for k in ("pretrain_pflops", "pretrain_wall_s", "pretrain_process_s", "pretrain_images", "linprobe_process_s",
                  "finetune_process_s"):
            assert c[k] > 0, (k, c)
        for k in ("linprobe_top1", "finetune_top1"):
            assert 0.0 <= c[k] <= 100.0, (k, c)
        assert c["pretrain_logged_steps"] == c["pretrain_steps"]  # log.every_steps=1: one event per step
    # per schedule, the pre-training compute follows the budget (2 epochs ~ twice 1 epoch), and ET++ (compute
    # accounting) spends the same FLOPs as constant for more images at low resolution
    by = {(c["schedule"], c["budget"]): c for c in cells}
    for s in ("constant", "efficienttrain++"):
        assert by[(s, 2.0)]["pretrain_pflops"] == pytest.approx(2 * by[(s, 1.0)]["pretrain_pflops"], rel=0.1)
        assert by[(s, 2.0)]["pretrain_images"] > by[(s, 1.0)]["pretrain_images"]
    for b in (1.0, 2.0):
        assert by[("efficienttrain++", b)]["pretrain_pflops"] == pytest.approx(by[("constant", b)]["pretrain_pflops"],
                                                                              rel=0.1)
        assert by[("efficienttrain++", b)]["pretrain_images"] > 1.3 * by[("constant", b)]["pretrain_images"]
    rows = res["summary"]
    assert len(rows) == 4 and all(r["linprobe_top1_n"] == 1 and r["linprobe_top1_se"] is None for r in rows)
    assert [h["metric"] for h in res["headline"]] == ["linprobe_top1", "finetune_top1"]
    assert all("reference" in h and h["reference"]["budget"] == 2.0 for h in res["headline"])
    assert "efficienttrain++" in r.stdout and "## headline" in r.stdout
    assert res["schedules"]["efficienttrain++"]["min_grid"] == 2  # the tiny 32 px / patch 8 model

    finals = sorted(out.glob("cells/*/*/final.json"))
    assert len(finals) == 12
    mtimes = {p: p.stat().st_mtime_ns for p in finals}
    r2, second_s = _quick(small_data, out)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "pretrain ..." not in r2.stdout and "linprobe ..." not in r2.stdout  # nothing ran again
    assert {p: p.stat().st_mtime_ns for p in finals} == mtimes
    assert second_s < first_s / 2, (first_s, second_s)
    res2 = json.loads((out / "time_to_accuracy.json").read_text())
    assert [c["linprobe_top1"] for c in res2["cells"]] == [c["linprobe_top1"] for c in cells]
    assert [c["pretrain_attempts"] for c in res2["cells"]] == [1, 1, 1, 1]


# --------------------------------------------------------------------------------------------------------------
# pure pieces
# --------------------------------------------------------------------------------------------------------------


def _row(schedule, budget, top1, se, pflops, wall):
    return {"schedule": schedule, "budget": budget, "linprobe_top1_mean": top1, "linprobe_top1_se": se,
            "pretrain_pflops_mean": pflops, "pretrain_wall_s_mean": wall}


def test_headline_is_the_smallest_etpp_budget_within_one_se_of_constant_at_its_largest_budget():
    m = _module()
    rows = [_row("constant", 8, 50.0, 1.0, 8.0, 800.0), _row("constant", 4, 45.0, 1.0, 4.0, 400.0),
            _row("efficienttrain++", 8, 51.0, 0.5, 8.0, 900.0), _row("efficienttrain++", 4, 49.2, 0.5, 4.0, 450.0),
            _row("efficienttrain++", 2, 48.9, 0.5, 2.0, 225.0)]
    h = m.headline(rows, "linprobe_top1")
    assert h["found"] and h["budget"] == 4 and h["threshold"] == 49.0
    assert h["compute_ratio"] == pytest.approx(2.0) and h["wall_ratio"] == pytest.approx(800 / 450)
    assert "compute ratio 2.00x, wall-time ratio 1.78x" in m.headline_text(h)
    rows[3]["linprobe_top1_mean"] = 48.0  # no budget under 8 reaches 49.0 any more
    h = m.headline(rows, "linprobe_top1")
    assert h["found"] and h["budget"] == 8 and h["compute_ratio"] == pytest.approx(1.0)
    h = m.headline([r for r in rows if r["budget"] < 8 or r["schedule"] == "constant"], "linprobe_top1")
    assert not h["found"] and "no efficienttrain++ budget reaches" in m.headline_text(h)
    assert not m.headline(rows[:2], "linprobe_top1")["found"]


def test_mean_and_standard_error_over_seeds():
    m = _module()
    mean, se = m.mean_se([70.0, 72.0, 74.0])
    assert mean == 72.0 and se == pytest.approx(2.0 / math.sqrt(3))
    assert m.mean_se([70.0]) == (70.0, None) and m.mean_se([]) == (None, None)
    rows = m.summarise([{"schedule": "constant", "budget": 4.0, "seed": s, "linprobe_top1": v, "pretrain_pflops": 1.0}
                        for s, v in ((0, 70.0), (1, 74.0))])
    assert rows[0]["linprobe_top1_mean"] == 72.0 and rows[0]["linprobe_top1_se"] == pytest.approx(2.0)
    assert rows[0]["seeds"] == [0, 1] and rows[0]["finetune_top1_mean"] is None


def test_cells_model_and_grid_check():
    m = _module()
    a = m.parse_args(["--train", "t", "--val", "v", "--out", "o", "--schedules", "constant,efficienttrain++",
                      "--budgets", "8,2,4", "--seeds", "0,1", "--schedule-seeds", "efficienttrain++=0"])
    cells = m.make_cells(a)
    assert [c.name for c in cells[:3]] == ["constant_e2_s0", "efficienttrainpp_e2_s0", "constant_e4_s0"]
    assert len(cells) == 3 * 2 + 3 and all(c.seed == 0 for c in cells if c.schedule == "efficienttrain++")
    model = m.resolve_model("imagenette")  # the default model of a real run
    info = m.schedule_info(["constant", "efficienttrain", "efficienttrain++"], model, allow_small=False)
    assert info["efficienttrain++"]["sizes"][0] == 32 and info["efficienttrain++"]["min_grid"] == 4
    assert m.resolve_model("demo,img_size=96,norm_pix_loss=false") == {**m.MODEL_PRESETS["demo"], "img_size": 96,
                                                                      "norm_pix_loss": False, "preset": "demo"}
    with pytest.raises(SystemExit, match="3x3 grid"):  # 64 px / patch 8: ET++ starts at 24 px
        m.schedule_info(["efficienttrain++"], m.resolve_model("demo"), allow_small=False)
    with pytest.raises(SystemExit, match="not key=value"):
        m.resolve_model("demo,decoder=3")


def test_replay_schedule_cells_run_the_base_schedule_with_the_authors_replay(tmp_path):
    """``efficienttrain++:replay``: the pre-training command runs efficienttrain++ with replay 4 / 2 / 1 by stage
    group, a config the loader accepts; its cells and folders have their own name."""
    from mae_curriculum.config import PretrainConfig, load_config

    m = _module()
    a = m.parse_args(["--train", str(tmp_path), "--val", str(tmp_path), "--out", "o", "--schedules",
                      "efficienttrain++,efficienttrain++:replay", "--budgets", "2", "--seeds", "0"])
    cells = m.make_cells(a)
    assert [c.name for c in cells] == ["efficienttrainpp_e2_s0", "efficienttrainpp-replay_e2_s0"]
    model = m.resolve_model("imagenette")
    info = m.schedule_info([c.schedule for c in cells], model, allow_small=False)
    assert info["efficienttrain++:replay"]["replay"] == [4, 4, 2, 2, 2, 2, 1, 1, 1, 1]
    assert "replay" not in info["efficienttrain++"]
    cmds = [m.pretrain_cmd(a, model, c, tmp_path / c.name) for c in cells]
    overrides = [x for x in cmds[1][cmds[1].index("--config") + 2:]]
    cfg = load_config(PretrainConfig, m.ROOT / "configs" / "demo.yaml", overrides)
    assert cfg.curriculum.schedule == "efficienttrain++" and cfg.curriculum.replay == [4, 4, 2, 2, 2, 2, 1, 1, 1, 1]
    assert not any(x.startswith("curriculum.replay") for x in cmds[0])


# --------------------------------------------------------------------------------------------------------------
# fidelity details of the official MAE recipe
# --------------------------------------------------------------------------------------------------------------


def _tiny_mae(**kw):
    from mae_curriculum.models.mae import MaskedAutoencoderViT

    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=2)
    return MaskedAutoencoderViT(**{**args, **kw})


def test_mae_weight_decay_groups_follow_the_official_add_weight_decay():
    """(a) main_pretrain.py: timm 0.3.2 add_weight_decay with no skip list -> no decay on biases and 1-D params,
    decay on everything else, cls_token and mask_token (3-D) included."""
    from mae_curriculum.engine.optim import mae_param_groups

    model = _tiny_mae()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = mae_param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05]
    no_decay = {names[id(p)] for p in groups[0]["params"]}
    decay = {names[id(p)] for p in groups[1]["params"]}
    assert {"cls_token", "mask_token", "patch_embed.proj.weight", "decoder_pred.weight"} <= decay
    assert {"norm.weight", "norm.bias", "decoder_norm.weight", "patch_embed.proj.bias"} <= no_decay
    assert all(n.endswith(".bias") or model.get_parameter(n).ndim == 1 for n in no_decay)
    assert all(model.get_parameter(n).ndim > 1 and not n.endswith(".bias") for n in decay)
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    # official reference: the same partition
    ref_decay = {n for n, p in model.named_parameters() if not (len(p.shape) == 1 or n.endswith(".bias"))}
    assert decay == ref_decay


def test_bf16_loss_target_comes_from_the_fp32_pixels():
    """(b) the encoder gets bf16 images, the norm-pix target is computed from the fp32 ones (the official AMP loop);
    without ``target`` the model is unchanged (target from its input)."""
    torch.manual_seed(0)
    model = _tiny_mae(norm_pix_loss=True).to(torch.bfloat16)
    x = torch.randn(4, 3, 32, 32)
    xb = x.to(torch.bfloat16)
    noise = torch.rand(4, 16)
    loss_fp32t, per_fp32t, pred, mask = model(xb, 0.75, noise, target=x)
    loss_bf16t, _, pred2, mask2 = model(xb, 0.75, noise)
    assert torch.equal(pred, pred2) and torch.equal(mask, mask2)
    assert loss_fp32t.dtype == torch.float32 and loss_fp32t.item() != loss_bf16t.item()

    def reference(imgs):  # MAE's forward_loss by hand, in fp32
        t = imgs.float().reshape(4, 3, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(4, 16, 192)
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
        per_patch = ((pred.float() - t) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum(), (per_patch * mask).sum(1) / mask.sum(1)

    ref, ref_per = reference(x)
    assert torch.allclose(loss_fp32t, ref, rtol=1e-6, atol=0) and torch.allclose(per_fp32t, ref_per, rtol=1e-6)
    assert torch.allclose(loss_bf16t, reference(xb)[0], rtol=1e-6, atol=0)
    assert not torch.allclose(loss_fp32t, reference(xb)[0], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="does not match"):
        model(xb, 0.75, noise, target=x[:, :, :16, :16])


class _Forwarded(Exception):
    pass


def test_train_step_feeds_the_engine_bf16_images_and_the_fp32_target():
    """(b) in the trainer: PretrainRun.train_step passes x in the run's dtype and ``target`` = the fp32 x."""
    from mae_curriculum.engine.pretrain import MicroBatch, PretrainRun

    seen = {}

    def engine(x, mask_ratio, noise, target=None):
        seen.update(x=x, target=target)
        raise _Forwarded

    cfg = SimpleNamespace(model=SimpleNamespace(patch_size=8, mask_ratio=0.75),
                          curriculum=SimpleNamespace(lowpass="fourier"))
    fake = SimpleNamespace(cfg=cfg, dtype=torch.bfloat16, dev=torch.device("cpu"), engine=engine,
                           mean=torch.zeros(1, 3, 1, 1), std=torch.ones(1, 3, 1, 1),
                           prepare_grid=lambda size: None, masking_noise=lambda keys, n: torch.rand(2, n))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mb = MicroBatch(images=images, ids=torch.arange(2), corrupt=0, keys=[(0, 0)])
    with pytest.raises(_Forwarded):
        PretrainRun.train_step(fake, mb, SimpleNamespace(size=32, index=0))
    assert seen["x"].dtype == torch.bfloat16 and seen["target"].dtype == torch.float32
    assert torch.equal(seen["target"], images.float() / 255.0)
    assert torch.equal(seen["x"], seen["target"].to(torch.bfloat16))


def test_loop_seconds_sums_step_intervals_and_ignores_a_suspension(tmp_path):
    """Loop time = the step-to-step intervals (+ one median for the first step); a process stopped for minutes
    (SIGSTOP, a suspended job) counts one median interval there, not the pause."""
    from torch.utils.tensorboard import SummaryWriter

    tta = _module()
    stamps = [1000.0 + 2.0 * i for i in range(10)] + [1000.0 + 18.0 + 600.0 + 2.0 * i for i in range(5)]
    w = SummaryWriter(str(tmp_path))
    for step, t in enumerate(stamps):
        w.add_scalar("curriculum/B", 32, step, walltime=t)
    w.close()
    seconds, events = tta.loop_seconds(tmp_path)
    assert events == 15
    assert seconds == pytest.approx(15 * 2.0)  # 14 intervals of 2 s (the 602 s one counted as 2 s) + the first step
