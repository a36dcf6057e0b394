"""Smoke tests of the benchmark harnesses (benchmarks/*.py --quick): they run and write well-formed JSON.

These assert that the harness works, never how fast anything is (timings on a shared CPU mean nothing here).
"""

from __future__ import annotations

import math
import sys

import pytest

from conftest import ROOT, SHARED_DATA, read_json, run

BENCH = ROOT / "benchmarks"


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _check_env(res: dict) -> None:
    env = res["env"]
    assert env["torch"] and env["device"] in ("cpu", "cuda", "cuda:0") and env["threads"] >= 1


def _bench(script: str, tmp_path, *args: str) -> dict:
    out = tmp_path / f"{script}.json"
    r = run([sys.executable, str(BENCH / f"{script}.py"), "--quick", "--out", str(out), *args], timeout=240)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return read_json(out)


def test_curriculum_quick(tmp_path):
    res = _bench("curriculum", tmp_path, "--cache", str(tmp_path / "cache"))
    _check_env(res)
    assert res["benchmark"] == "curriculum" and res["model"]["preset"] == "tiny"
    sizes = {st for s in res["schedules"].values() for st in s["sizes"]}
    rows = res["step_times"]
    assert {r["size"] for r in rows} == sizes | {res["model"]["img_size"]}
    for r in rows:
        for k in ("step_s", "images_per_s", "flops_per_image", "achieved_gflops", "rel_time", "rel_flops"):
            assert _positive(r[k]), (k, r)
        assert 0 <= r["crop_share"] < 1 and r["crop_s"] >= 0
    for name in ("constant", "efficienttrain", "efficienttrain++"):
        m = res["model_only"][name]
        assert _positive(m["flops_speedup"]) and _positive(m["model_time_speedup"])
    assert res["model_only"]["constant"]["flops_speedup"] == pytest.approx(1.0)
    assert res["model_only"]["efficienttrain"]["flops_speedup"] > 1.0
    runs = {r["schedule"]: r for r in res["trainer_runs"]}
    assert set(runs) == {"constant", "efficienttrain++"}  # --quick: two trainer runs, side by side
    for r in runs.values():
        for k in ("flops", "samples", "steps", "loop_s", "process_s", "images_per_s", "predicted_speedup",
                  "measured_speedup"):
            assert _positive(r[k]), (k, r)
        assert r["loop_s"] < r["process_s"] and r["per_size"]
    assert runs["constant"]["predicted_speedup"] == 1.0 and runs["constant"]["measured_speedup"] == 1.0
    # ET++ counts compute: the same FLOP budget as constant (up to the last step's overshoot), more images
    assert runs["efficienttrain++"]["predicted_speedup"] == pytest.approx(1.0, abs=0.1)
    assert runs["efficienttrain++"]["samples"] > runs["constant"]["samples"]


def test_throughput_quick(tmp_path):
    res = _bench("throughput", tmp_path)
    _check_env(res)
    assert res["benchmark"] == "throughput" and set(res["modes"]) == {"engine", "optimized", "baseline"}
    assert res["modes"]["engine"]["loss_finite"]  # the trainer's own step, timed
    assert res["modes"]["optimized"]["sdpa"]["all_fused"] and res["modes"]["optimized"]["loss_finite"]
    assert res["modes"]["baseline"]["loss_finite"]
    final = res["model"]["img_size"]
    assert len(res["sizes"]) >= 2 and final in res["sizes"]
    for r in res["rows"]:
        for k in ("step_s", "images_per_s", "flops_per_image", "achieved_gflops", "scaling", "batch"):
            assert _positive(r[k]), (k, r)
        assert r["batch"] >= 8 if r["size"] < final else r["batch"] == 8  # batch scales by (final/B)^2
    opt = [r for r in res["rows"] if r["mode"] == "optimized"]
    assert all(r["graphs_compiled"] >= 1 for r in opt)  # one compile per new B (dynamic=False)
    assert res["modes"]["optimized"]["recompiles_total"] >= len(res["sizes"])
    assert all(r["graphs_compiled"] == 0 for r in res["rows"] if r["mode"] == "baseline")
    assert all(_positive(s["speedup"]) for s in res["speedup_optimized_over_baseline"])


@pytest.mark.skipif(not (SHARED_DATA / "imagenette2-224.tar.gz").is_file(), reason="Imagenette archive not present")
def test_end_to_end_quick(tmp_path):
    res = _bench("end_to_end", tmp_path, "--cache", str(tmp_path / "cache"))
    _check_env(res)
    assert res["benchmark"] == "end_to_end" and res["data"]["images"] == 400
    assert (tmp_path / "cache" / "imagenette2-224-train-first400" / "_info.json").is_file()
    assert len(res["stages"]) == 2
    for r in res["stages"]:
        for k in ("step_s", "loop_s", "images_per_s", "compute_only_s", "needed_images_per_s",
                  "loader_only_images_per_s", "gflops_per_image"):
            assert _positive(r[k]), (k, r)
        assert r["wait_s"] >= 0 and 0 <= r["wait_share"] < 1 and r["images"] == r["steps"] * r["batch"]


def test_data_capacity_quick(tmp_path):
    from test_stage_sized import woof_shards

    shards = woof_shards(tmp_path / "shards", n=48)  # real imagewoof JPEGs (short side 320) when present
    res = _bench("data_capacity", tmp_path, "--shards", str(shards), "--paths",
                 "exact,stage_sized_replay,stage_sized_device_crop_replay,stage_sized")
    _check_env(res)
    assert res["benchmark"] == "data_capacity" and res["path"] == "stage_sized"
    assert set(res["by_path"]) == {"exact", "stage_sized", "stage_sized_replay", "stage_sized_device_crop_replay"}
    # device crops: the same plan, the workers ship canvases (the union of a group's boxes, uncropped): more bytes
    dev, cpu = res["by_path"]["stage_sized_device_crop_replay"]["stages"], res["by_path"]["stage_sized_replay"]["stages"]
    assert [s["replay"] for s in dev] == [4, 2, 1] and all(s["device_crop"] for s in dev)
    assert all(_positive(s["per_core_img_s"]) and s["shipped_kb_per_image"] > 0 for s in dev)
    assert dev[-1]["shipped_kb_per_image"] > cpu[-1]["shipped_kb_per_image"] == pytest.approx(3 * 224 * 224 / 1e3)
    # replay 4 / 2 / 1 (the default) at B = 96 / 160 / 224; none on the other paths
    assert [s["replay"] for s in res["by_path"]["stage_sized_replay"]["stages"]] == [4, 2, 1]
    assert {s["replay"] for s in res["stages"]} == {1}
    assert [s["size"] for s in res["stages"]] == [96, 160, 224]  # vit_b, efficienttrain++
    for s in res["stages"]:
        for k in ("size", "demand_img_s", "per_core_img_s", "cores_needed"):
            assert _positive(s[k]), (k, s)
        assert s["cores_needed"] == pytest.approx(s["demand_img_s"] / s["per_core_img_s"])
        assert s["size"] <= s["crop_size"] <= 224
    assert sum(s["compute_share"] for s in res["stages"]) == pytest.approx(1.0)
    assert [s["crop_size"] for s in res["by_path"]["exact"]["stages"]] == [224, 224, 224]
    assert res["inflation"] >= 1.0 and _positive(res["inflation"])


@pytest.mark.slow
@pytest.mark.skipif(not any((SHARED_DATA / n).is_file() for n in ("imagewoof2-320-subset.tar.gz",
                                                                  "imagenette2-224.tar.gz")),
                    reason="needs the imagewoof or Imagenette archive in ../shared/data")
def test_gpu_suite_quick(tmp_path):
    """The GPU check's code paths on a CPU: model (eager engine step + Fourier-crop share), real loader + model for
    the three loader paths, GPU decode (CPU stand-in), pretrain.py / finetune.py through a stage change, a
    checkpoint and a resume; CUDA-only figures null and listed as skipped; JSON + markdown written."""
    variant = [8, 8, 2, 2, 2, 2, 1, 1, 1, 1]  # configs/vit_b.yaml's loader variant (issue 14)
    res = _bench("gpu_suite", tmp_path, "--cache", str(tmp_path / "cache"), "--replay", ",".join(map(str, variant)))
    _check_env(res)
    assert res["loader"]["replay"] == variant
    assert res["benchmark"] == "gpu_suite" and res["settings"]["quick"] and "errors" not in res
    sizes = res["settings"]["sizes"]
    assert len(sizes) >= 2
    rows = res["model"]["eager"]["rows"]
    assert [r["size"] for r in rows] == sizes and all(_positive(r["images_per_s"]) for r in rows)
    assert all(0 <= r["crop_share"] < 1 for r in rows) and rows[-1]["crop_share"] == 0  # no crop at the final size
    from mae_curriculum.data.loader import stage_crop_size

    final, patch = max(sizes), res["settings"]["patch_size"]
    assert set(res["loader"]["paths"]) == {"exact", "stage_sized", "lanczos", "stage_sized_replay",
                                           "stage_sized_device_crop_replay"}
    for path, p in res["loader"]["paths"].items():
        for r in p["rows"]:
            assert 0 <= r["wait_share"] < 1 and _positive(r["loader_only_img_s"]) and _positive(r["cores_needed"])
            b = r["size"]
            assert r["loader_output"] == (b if path == "lanczos" else final if path == "exact"
                                          else stage_crop_size(b, final, patch))
            assert r["replay"] == (({min(sizes): 8, final: 1}.get(b, 2)) if path.endswith("replay") else 1)
        assert p["inflation_at_workers"] >= 1.0
    assert all(_positive(r["img_s"]) for r in res["decode"]["rows"]) and res["decode"]["cpu_stand_in"]
    dc = res["scripts"]["pretrain_device_crop"]["final"]
    assert dc["decoded"] < dc["samples"]  # replayed (the device crops ran with replay 4 / 2 / 1)
    for script in ("pretrain", "pretrain_device_crop", "finetune"):
        s = res["scripts"][script]
        assert s["ok"], s
        assert s["runs"][1]["resumed"] and len(s["sizes"]) >= 2  # the resumed run crossed the stage change
    if not torch_cuda():
        assert {"model.compiled", "model.mfu", "decode.nvjpeg"} <= set(res["skipped"])
        assert all(r["mfu"] is None for r in rows) and "compiled" not in res["model"]
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "| B | eager img/s" in md and "PASS" in md and "FAIL" not in md


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
