#!/usr/bin/env python
"""Does the curriculum save wall time, and does the FLOP count predict how much? (issue 4)

Part ``step`` (model only): for every input size B used by the chosen schedules, the time of one training
step (forward + backward + AdamW step, data already on the device, the trainer's fixed micro-batch) and the
Fourier crop's share of a step (crop = ``fourier_crop`` from the final size to B on the same batch).

Part ``trainer``: a short run of each schedule through the real trainer (``python pretrain.py --config
configs/demo.yaml ...``, same budget ``train.epochs=E``, same data), then

* predicted speed-up = final.json ``flops`` of ``constant`` / of the schedule,
* measured speed-up = training-loop wall time of ``constant`` / of the schedule. The loop time is taken from
  the TensorBoard event times of the per-step scalars (``log.every_steps=1``): the sum of step-to-step
  intervals, plus the first step counted as the median step at its size (so start-up, DeepSpeed set-up, the
  final checkpoint, export and reconstruction grid are all excluded). DeepSpeed's one-time op build is done
  by a throw-away run first (``--no-warmup-run`` to skip).

A third column, "model-only" speed-up, combines the stage table (images per stage, ``epochs_per_stage``) with
the per-B step times of part ``step``: what the curriculum would save if nothing but the model ran.

    python benchmarks/curriculum.py --model demo --epochs 4 --out results/curriculum_cpu.json
    python benchmarks/curriculum.py --quick --out /tmp/c.json          # smoke test (tiny model, seconds)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (ROOT, StepConfig, Trainer, environment, flops_per_image, pick_device, preset,  # noqa: E402
                    print_table, set_threads, sync, time_steps, write_json)
from mae_curriculum.curriculum.fourier import fourier_crop  # noqa: E402
from mae_curriculum.curriculum.schedule import build_schedule, epochs_per_stage  # noqa: E402

DEFAULT_SCHEDULES = ("constant", "efficienttrain", "efficienttrain++")
DEFAULT_CACHE = Path(os.environ.get("MAE_BENCH_CACHE", "/tmp/mae_curriculum_bench"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="tiny | demo | vit_b | vit_l (default: vit_b on CUDA, demo on CPU)")
    p.add_argument("--img-size", type=int, default=None, help="final size (default: the preset's)")
    p.add_argument("--schedules", default=",".join(DEFAULT_SCHEDULES), help="comma-separated schedule names")
    p.add_argument("--trainer-schedules", default=None,
                   help="schedules for the trainer part (default: --schedules; --quick: constant,efficienttrain++)")
    p.add_argument("--part", choices=("all", "step", "trainer"), default="all")
    p.add_argument("--batch", type=int, default=None,
                   help="micro-batch (fixed across B, as in the trainer); default 64 (tiny: 16; vit_b/l: 128)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="part step: parameter dtype; auto = what the trainer uses (bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--warmup", type=int, default=3, help="part step: untimed steps per size")
    p.add_argument("--iters", type=int, default=5, help="part step: steps per timed block")
    p.add_argument("--repeats", type=int, default=3, help="part step: timed blocks per size (median reported)")
    p.add_argument("--epochs", type=float, default=4.0, help="part trainer: budget train.epochs=E for every schedule")
    p.add_argument("--data", default=None,
                   help="part trainer: train shard folder (default: the procedural demo set, made once in --cache)")
    p.add_argument("--train-size", type=int, default=None,
                   help="images in the generated demo set (default 3000, tiny: 480)")
    p.add_argument("--num-workers", type=int, default=None, help="part trainer: data.num_workers (default: config's)")
    p.add_argument("--override", action="append", default=[], help="extra key=value for pretrain.py (repeatable)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="folder for generated data and run outputs")
    p.add_argument("--no-warmup-run", action="store_true", help="skip the throw-away trainer run (op build)")
    p.add_argument("--jobs", type=int, default=1,
                   help="trainer runs at once; >1 only for smoke tests (the timings then mean nothing)")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="which per-block statistic the step time is (min: better on a shared, noisy machine)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch / OMP threads (0 = torch's default)")
    p.add_argument("--trainer-threads", type=int, default=0,
                   help="OMP_NUM_THREADS of the trainer runs (default: --threads, else torch's default)")
    p.add_argument("--quick", action="store_true", help="smallest settings, for the smoke test")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    if a.quick:
        a.model = a.model or "tiny"
        a.warmup, a.iters, a.repeats = 1, 2, 1
        a.epochs = min(a.epochs, 1.0)
        a.no_warmup_run = True
        a.trainer_schedules = a.trainer_schedules or "constant,efficienttrain++"
        a.jobs = max(a.jobs, 2)
        a.num_workers = 1 if a.num_workers is None else a.num_workers
        a.train_size = a.train_size or 240
        a.trainer_threads = a.trainer_threads or 1
    dev = pick_device(a.device)
    a.model = a.model or ("vit_b" if dev.type == "cuda" else "demo")
    if a.batch is None:
        a.batch = {"tiny": 16, "vit_b": 128, "vit_l": 64}.get(a.model, 64)
    if a.train_size is None:
        a.train_size = 480 if a.model == "tiny" else 3000
    return a


# --------------------------------------------------------------------------------------------------------------
# part 1: per-B step time and the crop's share
# --------------------------------------------------------------------------------------------------------------


def step_times(a, cfg: dict, sizes: list[int], dev: torch.device) -> list[dict]:
    final = cfg["img_size"]
    prec = a.precision if a.precision != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
    sc = StepConfig(param_dtype=torch.bfloat16 if prec == "bf16" else torch.float32, fused=dev.type == "cuda")
    tr = Trainer(cfg, dev, sc)
    x_full = torch.randn(a.batch, 3, final, final, device=dev)  # a normalised batch at the final size
    f_final = flops_per_image(cfg, final)
    rows = []
    for b in sizes:
        xb = fourier_crop(x_full, b).to(sc.param_dtype)
        t_step = time_steps(lambda: tr.step(xb), dev, a.warmup, a.iters, a.repeats)
        if b == final:
            t_crop = {"median_s": 0.0, "min_s": 0.0}
        else:
            t_crop = time_steps(lambda: fourier_crop(x_full, b), dev, 1, max(a.iters, 5), a.repeats)
        step_s, crop_s = t_step[f"{a.stat}_s"], t_crop[f"{a.stat}_s"]
        f = flops_per_image(cfg, b)
        rows.append({"size": b, "batch": a.batch, "precision": prec, "flops_per_image": f, "gflops_per_image": f / 1e9,
                     "step_s": step_s,
                     "stat": a.stat, "step_median_s": t_step["median_s"],
                     "step_min_s": t_step["min_s"], "step_blocks_s": t_step["blocks_s"], "crop_s": crop_s,
                     "step_ms": step_s * 1e3, "crop_ms": crop_s * 1e3, "crop_share": crop_s / (crop_s + step_s),
                     "images_per_s": a.batch / step_s, "achieved_gflops": f * a.batch / step_s / 1e9,
                     "rel_flops": f / f_final})
    t_final = next(r["step_s"] for r in rows if r["size"] == final) if final in sizes else None
    for r in rows:
        r["rel_time"] = r["step_s"] / t_final if t_final else None
        r["efficiency"] = r["rel_flops"] / r["rel_time"] if t_final else None  # FLOP/s vs the final size
    sync(dev)
    return rows


def model_only_speedups(schedules: dict, cfg: dict, rows: list[dict]) -> dict[str, dict]:
    """Per schedule: FLOPs and model-time (from the measured per-image step times) for one epoch of budget,
    and the speed-ups over ``constant`` (computed even if ``constant`` is not among the schedules)."""
    per_img = {r["size"]: r["step_s"] / r["batch"] for r in rows}
    fn = lambda s: flops_per_image(cfg, s)  # noqa: E731
    out = {}
    for name, sch in schedules.items():
        eps = epochs_per_stage(sch, 1.0, fn)
        out[name] = {"flops_per_epoch_image": sum(e * fn(st.size) for e, st in zip(eps, sch.stages)),
                     "model_s_per_epoch_image": sum(e * per_img[st.size] for e, st in zip(eps, sch.stages)),
                     "image_epochs": sum(eps)}
    final = cfg["img_size"]
    ref_f, ref_t = fn(final), per_img.get(final)
    for v in out.values():
        v["flops_speedup"] = ref_f / v["flops_per_epoch_image"]
        v["model_time_speedup"] = ref_t / v["model_s_per_epoch_image"] if ref_t else None
    return out


# --------------------------------------------------------------------------------------------------------------
# part 2: the real trainer
# --------------------------------------------------------------------------------------------------------------


def ensure_demo_data(a, cfg: dict) -> Path:
    """The procedural demo set at the preset's size, made once in the cache (returns the root)."""
    root = a.cache / f"synthetic_{cfg['img_size']}px_{a.train_size}"
    if not (root / "train" / "_info.json").is_file() or not (root / "val" / "_info.json").is_file():
        from mae_curriculum.data.synthetic import make_synthetic_dataset

        tmp = root.with_name(root.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        make_synthetic_dataset(tmp, train_size=a.train_size, val_size=64, size=cfg["img_size"],
                               samples_per_shard=max(100, a.train_size // 6), seed=0)
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return root


def trainer_cmd(a, cfg: dict, out: Path, schedule: str, train: Path, val: Path, extra: list[str]) -> list[str]:
    model = [f"model.{k}={v if not isinstance(v, bool) else str(v).lower()}" for k, v in cfg.items()]
    over = [f"output_dir={out}", f"curriculum.schedule={schedule}", f"train.epochs={a.epochs:g}",
            f"train.batch_size={a.batch}", f"data.train_shards={train}", f"data.val_shards={val}",
            "data.synthetic_if_missing=false", "log.progress_bar=false", "log.every_steps=1", "log.vis_every_epochs=0",
            "log.vis_num_images=2", "checkpoint.every_epochs=0", "checkpoint.every_minutes=0", "checkpoint.keep_last=1"]
    if a.num_workers is not None:
        over.append(f"data.num_workers={a.num_workers}")
    if a.model == "tiny":
        over += ["data.shuffle_buffer=64", "optim.warmup_epochs=0.5"]
    return [sys.executable, str(ROOT / "pretrain.py"), "--config", str(ROOT / "configs" / "demo.yaml"), *model,
            *over, *a.override, *extra]


def _env(a) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    threads = a.trainer_threads or a.threads
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def loop_timing(tb_dir: Path) -> dict:
    """Training-loop time from the per-step TensorBoard events (``curriculum/B`` at every step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    ev = sorted(acc.Scalars("curriculum/B"), key=lambda e: e.step)
    if len(ev) < 2:
        raise RuntimeError(f"{tb_dir}: fewer than 2 logged steps; is log.every_steps=1 in effect?")
    steps = [e.step for e in ev]
    if steps != list(range(steps[0], steps[0] + len(steps))):
        raise RuntimeError(f"{tb_dir}: steps are not logged at every step")
    by_size: dict[int, list[float]] = {}
    for prev, cur in zip(ev, ev[1:]):
        by_size.setdefault(int(cur.value), []).append(cur.wall_time - prev.wall_time)
    first_size = int(ev[0].value)
    same = by_size.get(first_size) or [d for v in by_size.values() for d in v]
    first = statistics.median(same)
    total = sum(d for v in by_size.values() for d in v) + first
    per_size = {str(s): {"steps": len(v) + (s == first_size), "median_step_s": statistics.median(v)}
                for s, v in sorted(by_size.items())}
    return {"loop_s": total, "steps_logged": len(ev), "first_step_estimate_s": first, "per_size": per_size}


def trainer_runs(a, cfg: dict, schedules: list[str]) -> list[dict]:
    if a.data:
        train = Path(a.data)
        val = train.parent / "val" if (train.parent / "val" / "_info.json").is_file() else train
    else:
        root = ensure_demo_data(a, cfg)
        train, val = root / "train", root / "val"
    runs_dir = a.cache / "runs"
    env = _env(a)
    if not a.no_warmup_run:  # builds / loads DeepSpeed's op and warms the page cache; not measured
        out = runs_dir / "warmup"
        shutil.rmtree(out, ignore_errors=True)
        r = subprocess.run(trainer_cmd(a, cfg, out, "constant", train, val, ["train.max_steps=2"]),
                           capture_output=True, text=True, cwd=ROOT, env=env)
        if r.returncode != 0:
            raise SystemExit(f"warm-up trainer run failed:\n{r.stderr[-3000:]}")
    procs: list[tuple[str, Path, subprocess.Popen, float]] = []
    results = {}

    def finish(name: str, out: Path, proc: subprocess.Popen, t0: float) -> None:
        stdout, stderr = proc.communicate()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"trainer run {name!r} failed ({proc.returncode}):\n{stderr[-3000:]}")
        import json

        final = json.loads((out / "final.json").read_text())
        timing = loop_timing(out / "tensorboard")
        results[name] = {"schedule": name, "flops": final["flops"], "samples": final["samples"],
                         "steps": final["step"], "final_loss": final["final_loss"], "process_s": wall, **timing,
                         "output_dir": str(out)}

    for name in schedules:
        out = runs_dir / name.replace("+", "p")
        shutil.rmtree(out, ignore_errors=True)
        cmd = trainer_cmd(a, cfg, out, name, train, val, [])
        procs.append((name, out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                  cwd=ROOT, env=env), time.perf_counter()))
        if len(procs) >= max(1, a.jobs):
            finish(*procs.pop(0))
    while procs:
        finish(*procs.pop(0))
    rows = [results[n] for n in schedules]
    ref = results.get("constant")
    for r in rows:
        r["images_per_s"] = r["samples"] / r["loop_s"]
        r["predicted_speedup"] = ref["flops"] / r["flops"] if ref else None
        r["measured_speedup"] = ref["loop_s"] / r["loop_s"] if ref else None
        r["measured_over_predicted"] = (r["measured_speedup"] / r["predicted_speedup"]) if ref else None
    return rows


# --------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    a = parse_args(argv)
    set_threads(a.threads)
    dev = pick_device(a.device)
    cfg = preset(a.model, a.img_size)
    final, patch = cfg["img_size"], cfg["patch_size"]
    names = [s.strip() for s in a.schedules.split(",") if s.strip()]
    schedules = {n: build_schedule(n, final_size=final, patch_size=patch) for n in names}
    sizes = sorted({st.size for s in schedules.values() for st in s.stages} | {final})
    result: dict = {"benchmark": "curriculum", "env": environment(dev), "model": {"preset": a.model, **cfg},
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                    "schedules": {n: {"sizes": s.sizes(), "accounting": s.accounting,
                                      "fractions": [st.end - st.start for st in s.stages]}
                                  for n, s in schedules.items()}}
    print(f"# {a.model} MAE, final {final}px, patch {patch}, micro-batch {a.batch}, {dev}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if a.part in ("all", "step"):
        rows = step_times(a, cfg, sizes, dev)
        result["step_times"] = rows
        print_table(rows, [("size", "B", "d"), ("batch", "batch", "d"), ("gflops_per_image", "GFLOP/img", ".4g"),
                           ("step_ms", "step ms", ".4g"), ("crop_ms", "crop ms", ".3g"),
                           ("crop_share", "crop %", ".1%"),
                           ("images_per_s", "img/s", ".1f"), ("achieved_gflops", "GFLOP/s", ".1f"),
                           ("rel_flops", "FLOPs rel", ".3f"), ("rel_time", "time rel", ".3f"),
                           ("efficiency", "FLOP/s rel", ".2f")],
                    title="\n## model step per input size B (forward+backward+AdamW, data on the device)")
        pred = model_only_speedups(schedules, cfg, rows)
        result["model_only"] = pred
        print_table([{"schedule": n, **v} for n, v in pred.items()],
                    [("schedule", "schedule", "s"), ("image_epochs", "img-epochs/E", ".2f"),
                     ("flops_speedup", "FLOPs speed-up", ".3f"), ("model_time_speedup", "model-time speed-up", ".3f")],
                    title="\n## predicted speed-up over constant, same budget E (model only)")
    if a.part in ("all", "trainer"):
        tnames = [s.strip() for s in (a.trainer_schedules or a.schedules).split(",") if s.strip()]
        rows = trainer_runs(a, cfg, tnames)
        result["trainer_runs"] = rows
        print_table(rows, [("schedule", "schedule", "s"), ("steps", "steps", "d"), ("samples", "images", "d"),
                           ("flops", "FLOPs", ".3e"), ("loop_s", "loop s", ".2f"), ("process_s", "process s", ".1f"),
                           ("images_per_s", "img/s", ".1f"), ("predicted_speedup", "pred. speed-up", ".3f"),
                           ("measured_speedup", "meas. speed-up", ".3f"),
                           ("measured_over_predicted", "meas/pred", ".2f")],
                    title=f"\n## real trainer, train.epochs={a.epochs:g} (loop time from per-step TensorBoard events)")
        if a.jobs > 1:
            print(f"note: --jobs {a.jobs}: runs overlapped; these timings are not meaningful")
    result["env"]["loadavg_1min_end"] = environment(dev).get("loadavg_1min")
    write_json(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
