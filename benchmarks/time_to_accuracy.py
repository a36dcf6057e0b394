#!/usr/bin/env python
"""Time to accuracy: does the curriculum buy MAE the same accuracy for less compute? (issue 15)

For every cell (schedule, budget in final-size epochs, seed):

1. MAE pre-training: ``python pretrain.py --config configs/demo.yaml`` with the model, schedule, budget
   (``train.epochs``) and seed of the cell, on ``--train`` (``--val`` only feeds the reconstruction images);
2. a linear probe of the pre-trained encoder (``finetune.py`` ``mode=linprobe``, centre crop, cached features,
   LARS on a BatchNorm + Linear head over the cls token), trained on ``--train``, evaluated on ``--val``;
3. a short end-to-end fine-tune (``finetune.py`` ``mode=finetune``, the demo fine-tune recipe), same data.

Every run is a separate real process with its own folder under ``OUT/cells/<cell>/``; a run whose folder holds
``final.json`` is finished and is skipped, so the harness can be stopped and started again (an unfinished
pre-training or fine-tune continues from its last checkpoint: ``--resume auto``, the default).

Per cell it records the pre-training PFLOPs (``final.json`` ``flops``), the pre-training wall time (training
loop: the sum of step-to-step intervals of the per-step TensorBoard events, start-up excluded; and the whole
processes as the harness saw them), and the linear-probe and fine-tune top-1 on ``--val`` (the final weights,
not the best epoch). It writes ``OUT/time_to_accuracy.json`` (cells + mean and standard error over seeds per
(schedule, budget)) and ``OUT/time_to_accuracy.png`` (top-1 against pre-training PFLOPs and against wall
seconds, one line per schedule, error bars = standard error over seeds) and prints the headline: the smallest
efficienttrain++ budget whose accuracy is within one standard error of constant at the largest budget.

    python benchmarks/time_to_accuracy.py --train .bench/imagenette/train --val .bench/imagenette/val \\
        --out .bench/tta_imagenette                         # defaults: see docs/bench_time_to_accuracy.md
    python benchmarks/time_to_accuracy.py --quick --train D/train --val D/val --out /tmp/tta   # smoke test
    python benchmarks/time_to_accuracy.py --report-only --out .bench/tta_imagenette   # tables/plot so far
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import PRESETS, ROOT, environment, print_table, write_json  # noqa: E402
from mae_curriculum.curriculum.processes import Children, child_env  # noqa: E402
from mae_curriculum.curriculum.schedule import build_schedule, replay_by_group  # noqa: E402

# The default model for a real run (Imagenette on a CPU): the demo MAE (encoder 192-d x 6, decoder 128-d x 2) at
# 80 px with 8-px patches. 80 is the smallest final size with 8-px patches whose efficienttrain++ stages keep
# at least a 4x4 patch grid (96/224 of 80 -> 32 px = 4x4; 64 px would give 24 px = 3x3) and whose stages keep
# the paper's ratios (32/56/80 vs 96/160/224). See docs/bench_time_to_accuracy.md.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    **PRESETS,
    "imagenette": dict(img_size=80, patch_size=8, embed_dim=192, depth=6, num_heads=3, decoder_embed_dim=128,
                       decoder_depth=2, decoder_num_heads=4, norm_pix_loss=True),
}
MAE_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
            "decoder_num_heads", "norm_pix_loss", "mask_ratio", "mlp_ratio")
ENCODER_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")  # what finetune.py takes
DEFAULT_SCHEDULES = "constant,efficienttrain,efficienttrain++"
DEFAULT_BUDGETS = "4,2,1"
MIN_GRID = 4  # patches per side at the smallest curriculum stage
RESULT_NAME = "time_to_accuracy"
STAGES = ("pretrain", "linprobe", "finetune")
SUSPENDED_S = 120.0  # a step-to-step interval longer than this (and 20x the median): the process was suspended


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, help="train shard folder (pre-training, probe and fine-tune training)")
    p.add_argument("--val", type=Path, help="val shard folder (probe and fine-tune top-1)")
    p.add_argument("--out", type=Path, required=True, help="output folder (cells/, the JSON and the PNG)")
    p.add_argument("--schedules", default=DEFAULT_SCHEDULES,
                   help="comma-separated curriculum schedules; NAME:replay = NAME with curriculum.replay 4 / 2 / 1 "
                   "by stage group")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help="pre-training budgets, train.epochs at the final size")
    p.add_argument("--seeds", default="0,1", help="seeds of every schedule (train.seed of all three runs)")
    p.add_argument("--schedule-seeds", action="append", default=[], metavar="NAME=S1,S2",
                   help="seeds for one schedule instead of --seeds (repeatable), e.g. efficienttrain=0")
    p.add_argument("--model", default=None,
                   help="preset (tiny | demo | imagenette | vit_b | vit_l; default imagenette, --quick: tiny), "
                        "optionally followed by ,key=value model overrides, e.g. 'demo,img_size=80'")
    p.add_argument("--batch", type=int, default=None, help="pre-training train.batch_size (default 64; quick 16)")
    p.add_argument("--warmup-frac", type=float, default=0.1,
                   help="pre-training LR warm-up as a fraction of each budget (optim.warmup_epochs = frac x E)")
    p.add_argument("--evals", default="linprobe,finetune", help="which evaluations to run per encoder")
    p.add_argument("--lp-epochs", type=float, default=None, help="linear probe epochs on cached features (default 20)")
    p.add_argument("--lp-lr", type=float, default=6.4,
                   help="linear probe LARS lr (absolute; MAE's blr 0.1 at its global batch 16384)")
    p.add_argument("--lp-batch", type=int, default=128)
    p.add_argument("--ft-epochs", type=float, default=None, help="fine-tune epochs (default 1)")
    p.add_argument("--ft-batch", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=None, help="data.num_workers of every run (default 1)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of every run (0 = torch's default)")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells at once (each runs its three stages in turn); >1 shares the CPU: wall times then "
                        "include the contention")
    p.add_argument("--pretrain-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--linprobe-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--finetune-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--allow-small-grid", action="store_true",
                   help=f"allow a smallest stage under {MIN_GRID}x{MIN_GRID} patches (the --quick tiny model has 2x2)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: tables, JSON and plot from OUT/cells (the cells of the last run, OUT/plan.json)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny model, constant + efficienttrain++, budgets 2,1, one seed, short evals")
    a = p.parse_args(argv)
    if a.quick:
        a.model = a.model or "tiny"
        if a.schedules == DEFAULT_SCHEDULES:
            a.schedules = "constant,efficienttrain++"
        if a.budgets == DEFAULT_BUDGETS:
            a.budgets = "2,1"
        if a.seeds == "0,1":
            a.seeds = "0"
        a.batch = a.batch or 16
        a.lp_epochs = 5 if a.lp_epochs is None else a.lp_epochs
        a.ft_epochs = 1 if a.ft_epochs is None else a.ft_epochs
        a.threads = a.threads or 1
        a.jobs = max(a.jobs, 2)
        a.allow_small_grid = True
    a.model = a.model or "imagenette"
    a.batch = a.batch or 64
    a.lp_epochs = 20 if a.lp_epochs is None else a.lp_epochs
    a.ft_epochs = 1 if a.ft_epochs is None else a.ft_epochs
    a.num_workers = 1 if a.num_workers is None else a.num_workers
    if not a.report_only and (a.train is None or a.val is None):
        p.error("--train and --val are required (unless --report-only)")
    return a


# --------------------------------------------------------------------------------------------------------------
# model, schedules, cells
# --------------------------------------------------------------------------------------------------------------


def _value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def resolve_model(spec: str) -> dict[str, Any]:
    """``preset[,key=value...]`` or ``key=value[,...]`` (on the default preset) -> the MAE model keys."""
    parts = [s.strip() for s in spec.split(",") if s.strip()]
    name = "imagenette"
    if parts and "=" not in parts[0]:
        name = parts.pop(0)
    if name not in MODEL_PRESETS:
        raise SystemExit(f"unknown model preset {name!r}; choose from {', '.join(MODEL_PRESETS)}")
    cfg = dict(MODEL_PRESETS[name])
    for kv in parts:
        k, sep, v = kv.partition("=")
        k = k.removeprefix("model.")
        if not sep or k not in MAE_KEYS:
            raise SystemExit(f"--model: {kv!r} is not key=value with a key among {', '.join(MAE_KEYS)}")
        cfg[k] = _value(v)
    cfg["preset"] = name
    return cfg


# e.g. efficienttrain++:replay = that schedule with curriculum.replay 4 / 2 / 1 by stage group
REPLAY_SUFFIX = ":replay"


def base_schedule(name: str) -> tuple[str, bool]:
    """``NAME`` or ``NAME:replay`` -> (NAME, whether the cell replays)."""
    return (name[: -len(REPLAY_SUFFIX)], True) if name.endswith(REPLAY_SUFFIX) else (name, False)


def replay_overrides(name: str, model: dict[str, Any]) -> list[str]:
    """``curriculum.replay=[...]`` for a ``NAME:replay`` schedule (the authors' 4 / 2 / 1, ``replay_by_group``)."""
    base, replay = base_schedule(name)
    if not replay:
        return []
    r = replay_by_group(build_schedule(base, final_size=model["img_size"], patch_size=model["patch_size"]))
    return [f"curriculum.replay=[{', '.join(map(str, r))}]"]


def schedule_info(names: list[str], model: dict[str, Any], allow_small: bool) -> dict[str, dict]:
    final, patch = model["img_size"], model["patch_size"]
    out = {}
    for n in names:
        base, replay = base_schedule(n)
        s = build_schedule(base, final_size=final, patch_size=patch)
        grid = min(s.sizes()) // patch
        out[n] = {"sizes": s.sizes(), "accounting": s.accounting, "min_grid": grid,
                  **({"replay": replay_by_group(s)} if replay else {})}
        if grid < MIN_GRID and not allow_small:
            raise SystemExit(f"schedule {n} at {final} px / patch {patch}: smallest stage {min(s.sizes())} px is a "
                             f"{grid}x{grid} grid (< {MIN_GRID}x{MIN_GRID}); choose a larger final size or a smaller "
                             "patch, or pass --allow-small-grid")
    return out


@dataclass(frozen=True)
class Cell:
    schedule: str
    budget: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.schedule.replace('+', 'p').replace(':', '-')}_e{self.budget:g}_s{self.seed}"


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def make_cells(a) -> list[Cell]:
    """Seed-major order (all schedules and budgets of the first seed first), smallest budget first: a run stopped
    early still has whole comparisons."""
    names = [s.strip() for s in a.schedules.split(",") if s.strip()]
    seeds = {n: _ints(a.seeds) for n in names}
    for item in a.schedule_seeds:
        n, sep, v = item.partition("=")
        if not sep or n not in seeds:
            raise SystemExit(f"--schedule-seeds {item!r}: expected NAME=S1,S2 with NAME among {', '.join(names)}")
        seeds[n] = _ints(v)
    budgets = sorted(set(_floats(a.budgets)))
    if not budgets or min(budgets) <= 0:
        raise SystemExit("--budgets: positive numbers expected")
    all_seeds = sorted({s for v in seeds.values() for s in v})
    return [Cell(n, b, s) for s in all_seeds for b in budgets for n in names if s in seeds[n]]


# --------------------------------------------------------------------------------------------------------------
# the three runs of a cell
# --------------------------------------------------------------------------------------------------------------


def _kv(prefix: str, cfg: dict[str, Any], keys) -> list[str]:
    return [f"{prefix}.{k}={str(cfg[k]).lower() if isinstance(cfg[k], bool) else cfg[k]}" for k in keys if k in cfg]


def _common(a, seed: int) -> list[str]:
    return [f"data.train_shards={a.train}", f"data.val_shards={a.val}", f"data.num_workers={a.num_workers}",
            f"train.seed={seed}", "log.progress_bar=false"]


def pretrain_cmd(a, model: dict[str, Any], cell: Cell, out: Path) -> list[str]:
    over = [f"output_dir={out}", f"curriculum.schedule={base_schedule(cell.schedule)[0]}",
            *replay_overrides(cell.schedule, model), f"train.epochs={cell.budget:g}",
            f"train.batch_size={a.batch}", f"optim.warmup_epochs={a.warmup_frac * cell.budget:g}",
            "data.synthetic_if_missing=false", "log.every_steps=1", "log.vis_every_epochs=0", "log.vis_num_images=4",
            "checkpoint.every_epochs=1", "checkpoint.every_minutes=10", "checkpoint.keep_last=1"]
    if a.quick:
        over += ["data.shuffle_buffer=64", "optim.blr=1e-2", "checkpoint.every_epochs=0"]
    return [sys.executable, str(ROOT / "pretrain.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
            *_kv("model", model, MAE_KEYS), *_common(a, cell.seed), *over, *a.pretrain_override]


def linprobe_cmd(a, model: dict[str, Any], cell: Cell, out: Path, encoder: Path) -> list[str]:
    # the MAE linear probe (frozen encoder, cls token, BatchNorm + Linear, LARS, no weight decay) on features
    # extracted once from centre crops; lr as tests/test_finetune.py: MAE's LARS lr at its batch of 16384
    over = [f"output_dir={out}", "mode=linprobe", f"finetune.pretrained={encoder}", "model.global_pool=token",
            "model.drop_path=0", "augment.crop=center", "linprobe.cache_features=true", "optim.name=lars",
            f"optim.lr={a.lp_lr:g}", "optim.weight_decay=0", "optim.layer_decay=1.0",
            f"optim.warmup_epochs={max(0.1 * a.lp_epochs, 0.5):g}", "optim.min_lr=0",
            f"train.epochs={a.lp_epochs:g}", f"train.batch_size={a.lp_batch}", "eval.every_epochs=1000",
            "checkpoint.every_epochs=0", "checkpoint.every_minutes=0", "log.every_steps=50"]
    return [sys.executable, str(ROOT / "finetune.py"), "--config", str(ROOT / "configs" / "finetune_demo.yaml"),
            *_kv("model", model, ENCODER_KEYS), *_common(a, cell.seed), *over, *a.linprobe_override]


def finetune_cmd(a, model: dict[str, Any], cell: Cell, out: Path, encoder: Path) -> list[str]:
    over = [f"output_dir={out}", "mode=finetune", f"finetune.pretrained={encoder}",
            f"train.epochs={a.ft_epochs:g}", f"train.batch_size={a.ft_batch}",
            f"optim.warmup_epochs={0.2 * a.ft_epochs:g}", "eval.every_epochs=1000", "checkpoint.every_epochs=1",
            "checkpoint.every_minutes=10", "checkpoint.keep_last=1", "log.every_steps=50"]
    if a.quick:
        over += ["data.shuffle_buffer=64", "checkpoint.every_epochs=0", "checkpoint.every_minutes=0"]
    return [sys.executable, str(ROOT / "finetune.py"), "--config", str(ROOT / "configs" / "finetune_demo.yaml"),
            *_kv("model", model, ENCODER_KEYS), *_common(a, cell.seed), *over, *a.finetune_override]


_print_lock = threading.Lock()
_children = Children()  # the running stages (all threads) and the stop flag
_stop = _children.stop


def say(msg: str) -> None:
    with _print_lock:
        print(msg, flush=True)


def _on_stop_signal(signum, frame) -> None:
    """SIGTERM / SIGINT: start nothing new; the running stages get SIGTERM, so a pre-training or fine-tune saves a
    checkpoint and exits 75 (the next invocation resumes it). The stages run in their own sessions: a Ctrl-C at
    the terminal reaches them only through here."""
    if not _stop.is_set():
        say(f"signal {signum}: stopping the running stages (they save a checkpoint); run again to continue")
    _children.terminate()


def _attempts_file(cell_dir: Path) -> Path:
    return cell_dir / "attempts.jsonl"


def _still_running(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` if that process still runs this stage (an earlier harness killed with SIGKILL)."""
    try:
        pid, out = pid_file.read_text().split("\n", 1)
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        return None
    return int(pid) if out.strip() and out.strip() in cmdline else None


def run_stage(a, cell: Cell, cell_dir: Path, stage: str, cmd: list[str]) -> bool:
    """Run one stage unless its folder holds final.json; True when finished. Each attempt (process wall time,
    CPU time, exit status) is appended to the cell's attempts.jsonl; the output goes to <stage>.log."""
    out = cell_dir / stage
    if (out / "final.json").is_file():
        return True
    if _stop.is_set():
        return False
    cell_dir.mkdir(parents=True, exist_ok=True)
    pid_file = cell_dir / f"{stage}.pid"
    other = _still_running(pid_file)
    if other is not None:
        say(f"[{cell.name}] {stage}: process {other} of an earlier invocation still runs it; skipped this time")
        return False
    say(f"[{cell.name}] {stage} ...")
    rc, wall, cpu = _children.run(cmd, cell_dir / f"{stage}.log", child_env(a.threads), cwd=ROOT,
                                  on_start=lambda proc: pid_file.write_text(f"{proc.pid}\n{out}\n"))
    t0 = time.time() - wall
    pid_file.unlink(missing_ok=True)
    with open(_attempts_file(cell_dir), "a") as f:
        f.write(json.dumps({"stage": stage, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "rc": rc,
                            "start": t0}) + "\n")
    ok = rc == 0 and (out / "final.json").is_file()
    status = "done" if ok else ("stopped, resumes on the next run" if _stop.is_set() else
                                f"FAILED (exit {rc}, see {cell_dir / (stage + '.log')})")
    say(f"[{cell.name}] {stage} {status} in {wall:.1f} s")
    return ok


def run_cell(a, model: dict[str, Any], cell: Cell) -> bool:
    d = a.out / "cells" / cell.name
    if not run_stage(a, cell, d, "pretrain", pretrain_cmd(a, model, cell, d / "pretrain")):
        return False
    encoder = d / "pretrain" / "export"
    ok = True
    if "linprobe" in a.eval_list:
        ok &= run_stage(a, cell, d, "linprobe", linprobe_cmd(a, model, cell, d / "linprobe", encoder))
    if "finetune" in a.eval_list:
        ok &= run_stage(a, cell, d, "finetune", finetune_cmd(a, model, cell, d / "finetune", encoder))
    return ok


# --------------------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------------------


def loop_seconds(tb_dir: Path) -> tuple[float, int] | None:
    """Training-loop wall time of a pre-training from its per-step TensorBoard events (``log.every_steps=1``):
    per process (events file), the sum of step-to-step intervals plus the first step counted as the median
    interval; summed over processes (a resumed run also counts the steps it re-did). An interval over
    ``SUSPENDED_S`` and over 20x the median (the process was stopped, e.g. SIGSTOP / a suspended job) counts as the
    median. Returns (seconds, events)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    total, n = 0.0, 0
    for f in sorted(tb_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        if "curriculum/B" not in acc.Tags()["scalars"]:
            continue
        ev = sorted(acc.Scalars("curriculum/B"), key=lambda e: e.wall_time)
        n += len(ev)
        if len(ev) < 2:
            continue
        gaps = [b.wall_time - a.wall_time for a, b in zip(ev, ev[1:])]
        med = statistics.median(gaps)
        total += sum(med if g > max(SUSPENDED_S, 20 * med) else g for g in gaps) + med
    return (total, n) if n else None


def _read(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def cell_result(a, cell: Cell) -> dict[str, Any]:
    d = a.out / "cells" / cell.name
    r: dict[str, Any] = {"cell": cell.name, "schedule": cell.schedule, "budget": cell.budget, "seed": cell.seed,
                         "dir": str(d)}
    attempts = []
    if _attempts_file(d).is_file():
        attempts = [json.loads(line) for line in _attempts_file(d).read_text().splitlines() if line.strip()]
    for stage in STAGES:
        mine = [x for x in attempts if x["stage"] == stage]
        r[f"{stage}_attempts"] = len(mine)
        r[f"{stage}_process_s"] = round(sum(x["wall_s"] for x in mine), 3) if mine else None
        known = mine and all("cpu_s" in x for x in mine)
        r[f"{stage}_cpu_s"] = round(sum(x["cpu_s"] for x in mine), 3) if known else None
    pre = _read(d / "pretrain" / "final.json")
    r["pretrain_finished"] = pre is not None
    if pre:
        r.update(pretrain_pflops=pre["flops"] / 1e15, pretrain_images=pre["samples"], pretrain_steps=pre["step"],
                 pretrain_decoded=pre.get("decoded"), pretrain_final_loss=pre.get("final_loss"))
        lt = loop_seconds(d / "pretrain" / "tensorboard")
        r["pretrain_wall_s"] = round(lt[0], 3) if lt else None
        r["pretrain_logged_steps"] = lt[1] if lt else None
    for stage in ("linprobe", "finetune"):
        fin = _read(d / stage / "final.json")
        r[f"{stage}_finished"] = fin is not None
        if fin:
            r[f"{stage}_top1"] = fin["top1"]
            r[f"{stage}_best_top1"] = fin.get("best_top1")
            r[f"{stage}_wall_s"] = fin.get("wall_time_s")
    return r


METRICS = ("pretrain_pflops", "pretrain_wall_s", "pretrain_process_s", "pretrain_cpu_s", "linprobe_cpu_s",
           "finetune_cpu_s", "linprobe_top1", "finetune_top1")


def mean_se(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    m = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return m, se


def summarise(cells: list[dict]) -> list[dict]:
    groups: dict[tuple[str, float], list[dict]] = {}
    for c in cells:
        groups.setdefault((c["schedule"], c["budget"]), []).append(c)
    rows = []
    for (sched, budget), cs in groups.items():
        row: dict[str, Any] = {"schedule": sched, "budget": budget, "seeds": sorted(c["seed"] for c in cs),
                               "n_seeds": len(cs)}
        for k in METRICS:
            vals = [c[k] for c in cs if c.get(k) is not None]
            row[f"{k}_n"] = len(vals)
            row[f"{k}_mean"], row[f"{k}_se"] = mean_se(vals)
        rows.append(row)
    return rows


def headline(rows: list[dict], metric: str) -> dict[str, Any]:
    """The smallest efficienttrain++ budget whose mean ``metric`` >= constant's at its largest budget minus one
    standard error of constant there (0 when constant has one seed); with compute and wall-time ratios."""
    const = [r for r in rows if r["schedule"] == "constant" and r[f"{metric}_mean"] is not None]
    etpp = [r for r in rows if r["schedule"] == "efficienttrain++" and r[f"{metric}_mean"] is not None]
    if not const or not etpp:
        return {"metric": metric, "found": False, "reason": "needs constant and efficienttrain++ results"}
    ref = max(const, key=lambda r: r["budget"])
    threshold = ref[f"{metric}_mean"] - (ref[f"{metric}_se"] or 0.0)
    out = {"metric": metric, "reference": {"schedule": "constant", "budget": ref["budget"],
                                           "top1_mean": ref[f"{metric}_mean"], "top1_se": ref[f"{metric}_se"],
                                           "pflops": ref["pretrain_pflops_mean"], "wall_s": ref["pretrain_wall_s_mean"],
                                           "cpu_s": ref.get("pretrain_cpu_s_mean")},
           "threshold": threshold}
    ok = sorted((r for r in etpp if r[f"{metric}_mean"] >= threshold), key=lambda r: r["budget"])
    if not ok:
        best = max(etpp, key=lambda r: r[f"{metric}_mean"])
        out.update(found=False, best_efficienttrain_pp={"budget": best["budget"], "top1_mean": best[f"{metric}_mean"]})
        return out
    r = ok[0]

    def ratio(x, y):
        return x / y if x and y else None

    out.update(found=True, budget=r["budget"], top1_mean=r[f"{metric}_mean"], top1_se=r[f"{metric}_se"],
               pflops=r["pretrain_pflops_mean"], wall_s=r["pretrain_wall_s_mean"], cpu_s=r.get("pretrain_cpu_s_mean"),
               compute_ratio=ratio(ref["pretrain_pflops_mean"], r["pretrain_pflops_mean"]),
               wall_ratio=ratio(ref["pretrain_wall_s_mean"], r["pretrain_wall_s_mean"]),
               cpu_ratio=ratio(ref.get("pretrain_cpu_s_mean"), r.get("pretrain_cpu_s_mean")))
    return out


def headline_text(h: dict) -> str:
    name = {"linprobe_top1": "linear probe", "finetune_top1": "fine-tune"}[h["metric"]]
    if "reference" not in h:
        return f"{name}: no headline ({h['reason']})"
    ref = h["reference"]
    se = f" +- {ref['top1_se']:.2f}" if ref["top1_se"] is not None else " (one seed: no spread)"
    base = f"{name}: constant at {ref['budget']:g} epochs = {ref['top1_mean']:.2f}%{se}"
    if not h["found"]:
        b = h["best_efficienttrain_pp"]
        return (f"{base}; no efficienttrain++ budget reaches {h['threshold']:.2f}% (best: {b['top1_mean']:.2f}% "
                f"at {b['budget']:g} epochs)")
    fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    return (f"{base}; efficienttrain++ reaches it at {h['budget']:g} epochs ({h['top1_mean']:.2f}%): compute ratio "
            f"{fmt(h['compute_ratio'])}, wall-time ratio {fmt(h['wall_ratio'])} (CPU-time ratio "
            f"{fmt(h.get('cpu_ratio'))}; constant / efficienttrain++, > 1 = a saving)")


def plot(rows: list[dict], heads: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    evals = [m for m in ("linprobe_top1", "finetune_top1") if any(r[f"{m}_mean"] is not None for r in rows)]
    evals = evals or ["linprobe_top1"]
    fig, axes = plt.subplots(len(evals), 2, figsize=(11, 4.2 * len(evals)), squeeze=False)
    for i, metric in enumerate(evals):
        for j, (xk, xlabel) in enumerate((("pretrain_pflops", "pre-training PFLOPs"),
                                          ("pretrain_wall_s", "pre-training wall seconds (training loop)"))):
            ax = axes[i][j]
            for sched in dict.fromkeys(r["schedule"] for r in rows):
                pts = sorted((r for r in rows if r["schedule"] == sched and r[f"{metric}_mean"] is not None
                              and r[f"{xk}_mean"] is not None), key=lambda r: r["budget"])
                if not pts:
                    continue
                ax.errorbar([r[f"{xk}_mean"] for r in pts], [r[f"{metric}_mean"] for r in pts],
                            xerr=[r[f"{xk}_se"] or 0.0 for r in pts], yerr=[r[f"{metric}_se"] or 0.0 for r in pts],
                            marker="o", capsize=3, label=sched)
                for r in pts:
                    ax.annotate(f"{r['budget']:g}", (r[f"{xk}_mean"], r[f"{metric}_mean"]), fontsize=7,
                                textcoords="offset points", xytext=(4, 4))
            h = next((h for h in heads if h["metric"] == metric and "threshold" in h), None)
            if h is not None:  # what efficienttrain++ has to reach for the headline
                ax.axhline(h["threshold"], color="grey", ls="--", lw=1,
                           label=f"constant @ {h['reference']['budget']:g} ep. - 1 SE")
            xs = [r[f"{xk}_mean"] for r in rows if r[f"{xk}_mean"]]
            if xs and max(xs) / min(xs) >= 3:  # budgets a factor apart: evenly spaced on a log axis
                ax.set_xscale("log")
            else:
                ax.xaxis.set_major_locator(MaxNLocator(5))
                ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4), useOffset=False)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(("linear-probe" if metric == "linprobe_top1" else "fine-tune") + " top-1 (%)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(title + "\n(labels: budget in final-size epochs; error bars: standard error over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _data_name(train: Path | None) -> str:
    if train is None:
        return "?"
    p = Path(train).resolve()
    return f"{p.parent.name}/{p.name}"


def report(a, model: dict[str, Any], cells: list[Cell], sched_info: dict, timing: dict) -> dict:
    results = [cell_result(a, c) for c in cells]
    rows = summarise(results)
    heads = [headline(rows, m) for m in ("linprobe_top1", "finetune_top1")]
    print_table(results, [("cell", "cell", "s"), ("pretrain_pflops", "PFLOPs", ".4g"),
                          ("pretrain_images", "images", "d"), ("pretrain_wall_s", "loop s", ".1f"),
                          ("pretrain_process_s", "process s", ".1f"), ("pretrain_cpu_s", "CPU s", ".1f"),
                          ("pretrain_final_loss", "loss", ".4f"),
                          ("linprobe_top1", "LP top-1", ".2f"), ("finetune_top1", "FT top-1", ".2f")],
                title="\n## cells")
    print_table(rows, [("schedule", "schedule", "s"), ("budget", "epochs", "g"), ("n_seeds", "seeds", "d"),
                       ("pretrain_pflops_mean", "PFLOPs", ".4g"), ("pretrain_wall_s_mean", "loop s", ".1f"),
                       ("pretrain_wall_s_se", "+-se", ".1f"), ("pretrain_cpu_s_mean", "CPU s", ".1f"),
                       ("linprobe_top1_mean", "LP top-1", ".2f"), ("linprobe_top1_se", "+-se", ".2f"),
                       ("finetune_top1_mean", "FT top-1", ".2f"), ("finetune_top1_se", "+-se", ".2f")],
                title="\n## per schedule and budget (mean, standard error over seeds)")
    print("\n## headline")
    for h in heads:
        print(headline_text(h))
    result = {"benchmark": RESULT_NAME, "env": environment(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "model": model, "schedules": sched_info, "timing": timing, "cells": results, "summary": rows,
              "headline": heads, "headline_text": [headline_text(h) for h in heads]}
    write_json(a.out / f"{RESULT_NAME}.json", result)
    if any(r["pretrain_pflops_mean"] is not None for r in rows):
        png = a.out / f"{RESULT_NAME}.png"
        plot(rows, heads, png, f"MAE time to accuracy: {model['preset']} model, {model['img_size']} px, patch "
                        f"{model['patch_size']}, data {_data_name(a.train)}")
        print(f"wrote {png}")
    return result


def main(argv=None) -> int:
    a = parse_args(argv)
    a.eval_list = [e.strip() for e in a.evals.split(",") if e.strip()]
    bad = [e for e in a.eval_list if e not in ("linprobe", "finetune")]
    if bad:
        raise SystemExit(f"--evals: unknown {bad}; choose from linprobe, finetune")
    plan = a.out / "plan.json"  # what the last run was asked for: --report-only reports on the same cells
    keys = ("schedules", "budgets", "seeds", "schedule_seeds", "model", "train", "val")
    if a.report_only and plan.is_file():
        for k, v in json.loads(plan.read_text()).items():
            if k in keys:
                setattr(a, k, Path(v) if k in ("train", "val") and v else v)
    model = resolve_model(a.model)
    names = [s.strip() for s in a.schedules.split(",") if s.strip()]
    sched_info = schedule_info(names, model, a.allow_small_grid)
    cells = make_cells(a)
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        plan.write_text(json.dumps({k: str(getattr(a, k)) if isinstance(getattr(a, k), Path) else getattr(a, k)
                                    for k in keys}, indent=1) + "\n")
    print(f"# MAE time to accuracy: model {model['preset']} ({model['img_size']} px, patch {model['patch_size']}), "
          f"{len(cells)} cells: schedules {names}, budgets {sorted(set(_floats(a.budgets)))}, "
          f"evals {a.eval_list}, jobs {a.jobs}, OMP threads {a.threads or 'default'}")
    for n, s in sched_info.items():
        print(f"#   {n}: sizes {s['sizes']} (smallest grid {s['min_grid']}x{s['min_grid']}), accounting {s['accounting']}")
    t0 = time.time()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    failed: list[str] = []
    if not a.report_only:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _on_stop_signal)
        with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
            for cell, ok in zip(cells, pool.map(lambda c: run_cell(a, model, c), cells)):
                if not ok:
                    failed.append(cell.name)
    timing = {"harness_s": round(time.time() - t0, 3), "failed_cells": failed, "loadavg_1min_start": load_start}
    report(a, model, cells, sched_info, timing)
    if _stop.is_set():
        print(f"harness time {timing['harness_s']:.1f} s; stopped by a signal: run the same command again to continue")
        return 75
    print(f"harness time {timing['harness_s']:.1f} s" + (f"; FAILED cells: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
