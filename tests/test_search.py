"""The curriculum search (issue 17): Algorithm 1 against synthetic accuracy functions with known answers, the
proxy commands the configs accept, and a --quick end-to-end search that a second invocation does not repeat."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT, run
from mae_curriculum.curriculum.search import (Candidate, Proxy, Score, candidate_sizes, search, staircase_search,
                                              threshold)


class Oracle:
    """A synthetic accuracy: 80 % minus a penalty for every stage below that stage's known minimum size."""

    def __init__(self, minimum, budget_floor=1.0, noise=None):
        self.minimum, self.budget_floor, self.noise, self.calls = minimum, budget_floor, noise, []

    def __call__(self, c: Candidate) -> Score:
        assert c not in self.calls, f"{c} evaluated twice"
        self.calls.append(c)
        bad = sum(s < m for s, m in zip(c.sizes, self.minimum)) + (c.budget < self.budget_floor)
        acc = 80.0 - 5.0 * bad
        if self.noise is not None:
            acc += self.noise.get(c.sizes, 0.0)
        return Score(acc, 0.5 if self.noise is not None else None)


def test_accuracy_mode_finds_the_known_staircase_in_few_runs():
    sizes = [96, 128, 160, 192, 224]
    for minimum in ([96, 128, 160, 224], [160, 160, 192, 224], [224] * 4, [96] * 3 + [224]):
        oracle = Oracle(minimum)
        res = search("accuracy", 4, sizes, oracle)
        assert res["sizes"] == tuple(minimum) and res["budget"] == 1.0
        assert oracle.calls[0] == Candidate((224,) * 4)  # the baseline first
        # N + a few runs: at most baseline + (stages - 1) rejected + (sizes - 1) accepted
        assert len(oracle.calls) <= 1 + 3 + 4
        assert all(c.sizes == tuple(sorted(c.sizes)) for c in oracle.calls), "staircases never go down"


def test_within_one_standard_error_of_the_baseline_is_accepted_and_ties_go_to_the_smaller_size():
    # the baseline is 80 +- 0.5: a candidate 0.4 below it passes, one 0.6 below it fails
    noise = {(96, 224): -0.6, (128, 224): -0.4, (160, 224): 0.0}
    oracle = Oracle([96, 224], noise=noise)
    bar = threshold(Score(80.0, 0.5), 0.0)
    assert bar == pytest.approx(79.5)
    stair = staircase_search(2, [96, 128, 160, 224], oracle, bar)
    assert stair == (128, 224)  # 96 rejected (0.6 below), 128 accepted although 160 is as good
    assert [c.sizes[0] for c in oracle.calls] == [160, 128, 96], "walks down, stops at the first rejection"
    assert threshold(Score(80.0, None), 1.0) == 79.0  # one seed: the tolerance only


def test_compute_mode_shrinks_the_budget_until_the_threshold_fails():
    oracle = Oracle([96, 160, 224], budget_floor=0.6)
    res = search("compute", 3, [96, 160, 224], oracle, budgets=[0.5, 0.8, 0.67, 1.0, 0.4])
    assert res["sizes"] == (96, 160, 224)
    assert res["budget"] == 0.67
    tried = [c.budget for c in oracle.calls if c.budget != 1.0]
    assert tried == [0.8, 0.67, 0.5], "largest first, stops at the first failure"


def test_candidate_sizes_are_scaled_like_the_built_in_schedules_and_fit_the_patch():
    assert candidate_sizes([96, 128, 160, 192, 224], 224, 16) == [96, 128, 160, 192, 224]
    assert candidate_sizes([96, 128, 160, 192, 224], 80, 8) == [32, 48, 56, 72, 80]
    assert candidate_sizes([96], 80, 8) == [32, 80]  # the final size is always a candidate
    with pytest.raises(ValueError, match="multiples of the patch"):
        candidate_sizes([100, 224], 224, 16)


def test_the_proxy_commands_are_configs_the_trainers_accept(tmp_path, demo_data):
    from mae_curriculum.config import PretrainConfig, load_config
    from mae_curriculum.config_finetune import FinetuneConfig
    from mae_curriculum.curriculum.search import read_config

    over = ["model.img_size=80", "train.epochs=4", f"data.train_shards={demo_data / 'train'}",
            f"data.val_shards={demo_data / 'val'}"]
    data = read_config(ROOT / "configs" / "demo.yaml", over)
    p = Proxy(ROOT / "configs" / "demo.yaml", data, over, "compute", tmp_path, ROOT / "configs" / "finetune_demo.yaml")
    cmd = p.train_cmd(Candidate((32, 56, 80), 0.5), 3, tmp_path / "t")
    i = cmd.index("--config")
    cfg = load_config(PretrainConfig, cmd[i + 1], cmd[i + 2:])
    assert [s["size"] for s in cfg.curriculum.stages] == [32, 56, 80] and cfg.curriculum.accounting == "compute"
    assert cfg.train.epochs == 2.0 and cfg.train.seed == 3 and cfg.model.img_size == 80
    (tmp_path / "enc").mkdir()
    cmd = p.probe_cmd(3, tmp_path / "enc", tmp_path / "p")
    i = cmd.index("--config")
    probe = load_config(FinetuneConfig, cmd[i + 1], cmd[i + 2:])
    assert probe.mode == "linprobe" and probe.model.img_size == 80 and probe.data.train_shards == cfg.data.train_shards
    # accuracy mode on a supervised config: the candidate carries EfficientTrain's RandAugment ramp, so a staircase
    # with efficienttrain's sizes is exactly the efficienttrain schedule
    from mae_curriculum.curriculum.schedule import build_schedule

    sup = ROOT / "configs" / "supervised_demo.yaml"
    over = ["model.img_size=32", "model.patch_size=4", f"data.train_shards={demo_data / 'train'}",
            f"data.val_shards={demo_data / 'val'}"]
    p = Proxy(sup, read_config(sup, over), over, "epochs", tmp_path)
    et = build_schedule("efficienttrain", final_size=32, patch_size=4, max_magnitude=5.0)
    cmd = p.train_cmd(Candidate(tuple(st.size for st in et.stages), 1.0), 0, tmp_path / "s")
    i = cmd.index("--config")
    cfg = load_config(FinetuneConfig, cmd[i + 1], cmd[i + 2:])
    from mae_curriculum.curriculum.schedule import schedule_for

    mine = schedule_for(cfg.curriculum, 32, 4)
    assert [(st.size, st.magnitude, st.start, st.end) for st in mine.stages] == [
        (st.size, st.magnitude, st.start, st.end) for st in et.stages]


SUPERVISED_TINY = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=1",
                   "model.num_heads=2", "train.epochs=1", "train.batch_size=32", "data.num_workers=1",
                   "data.shuffle_buffer=64", "eval.every_epochs=1000", "checkpoint.every_epochs=0",
                   "log.every_steps=50"]


def test_quick_search_end_to_end_resumes_without_repeating_a_run(tmp_path, demo_data):
    from mae_curriculum.config_finetune import FinetuneConfig
    from mae_curriculum.config import load_config

    out = tmp_path / "search"
    cmd = [sys.executable, "-m", "mae_curriculum.curriculum.search", "--config",
           str(ROOT / "configs" / "supervised_demo.yaml"), "--mode", "compute", "--quick", "--out", str(out),
           *SUPERVISED_TINY, f"data.train_shards={demo_data / 'train'}", f"data.val_shards={demo_data / 'val'}",
           f"output_dir={tmp_path / 'unused'}"]
    r = run(cmd, timeout=400)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    summary = json.loads((out / "search.json").read_text())
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == len(summary["candidates"]) >= 3  # baseline, >= 1 staircase, >= 1 budget candidate
    assert summary["sizes"] == [16, 32] and summary["stages"] == 2
    base = summary["candidates"][0]
    assert base["baseline"] and base["sizes"] == [32, 32] and base["pflops"] > 0
    # the chosen schedule is a config the trainer accepts, and its stages are what the search decided
    yaml_text = (out / "schedule.yaml").read_text()
    (tmp_path / "cfg.yaml").write_text((ROOT / "configs" / "supervised_demo.yaml").read_text().replace(
        "curriculum:\n  schedule: efficienttrain++\n  max_magnitude: 5\n", "") + yaml_text.split("train:")[0])
    cfg = load_config(FinetuneConfig, tmp_path / "cfg.yaml", [f"data.train_shards={demo_data / 'train'}",
                                                             f"data.val_shards={demo_data / 'val'}"])
    assert [s["size"] for s in cfg.curriculum.stages] == summary["result"]["sizes"]
    # with ET++'s RandAugment ramp (compute mode), up to the config's max_magnitude, as every proxy ran
    assert [s["magnitude"] for s in cfg.curriculum.stages] == [0.0, 5.0] and cfg.curriculum.max_magnitude == 5.0
    assert (out / "search.png").stat().st_size > 0 and "| candidate" in (out / "search.md").read_text()
    # each proxy ran as a real run with its own stage sizes: a low-resolution candidate spends fewer FLOPs per image
    for c in summary["candidates"]:
        final = json.loads((out / "runs" / f"{c['candidate']}_s0" / "train" / "final.json").read_text())
        assert final["schedule"] == "custom" and final["flops"] / 1e15 == pytest.approx(c["pflops"])
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/train/final.json")}
    r2 = run(cmd, timeout=200)
    assert r2.returncode == 0, (r2.stdout[-3000:], r2.stderr[-3000:])
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/train/final.json")} == stamps, "a finished run was redone"
    assert json.loads((out / "search.json").read_text())["result"] == summary["result"]


def test_bad_inputs_fail_in_one_line(tmp_path, capsys):
    from mae_curriculum.curriculum.search import main

    def err(*args):
        code = main(["--out", str(tmp_path / "o"), *args])
        e = capsys.readouterr().err
        assert e.strip().count("\n") == 0 and "Traceback" not in e, e
        return code, e

    code, e = err("--config", str(ROOT / "configs" / "demo.yaml"))
    assert code == 2 and "--probe-config" in e
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &x [1, 2]\nb: *x\nmodel: {img_size: 32, patch_size: 8}\n")
    code, e = err("--config", str(bomb), "--probe-config", str(bomb))
    assert code == 2 and "aliases" in e
    code, e = err("--config", str(ROOT / "configs" / "supervised_demo.yaml"), "--sizes", "100,x")
    assert code == 2 and "--sizes" in e
    # a proxy run that refuses its config: the search says so in one line and exits 2
    code, e = err("--config", str(ROOT / "configs" / "supervised_demo.yaml"), "--quick", "optim.blr=-1")
    assert code == 2 and "refused its config" in e and "optim.blr" in e
