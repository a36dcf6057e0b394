#!/usr/bin/env python
"""Model-only training throughput per curriculum input size B: optimised path vs a plain baseline (issue 9).

For each B (96, 160, 192, 224 scaled to the final size) and a micro-batch of ``--batch-at-224`` scaled by
``(final/B)^2`` (equal pixels per step), time forward + backward + AdamW step on a batch already on the
device, for two ways of running the same MAE:

* ``optimized``: parameters in bf16 on CUDA (``--opt-dtype``; fp32 on the CPU by default), timm blocks on
  ``F.scaled_dot_product_attention`` (checked: ``fused_attn`` on every block), one ``torch.compile(model,
  dynamic=False)`` object for the run: each new B compiles once (counted with ``torch._dynamo`` counters:
  graphs compiled and the first step's time, per stage), AdamW(fused=True), no ``.item()`` per step.
* ``engine``: the trainer's own step, ``PretrainRun.train_step`` through DeepSpeed (uint8 batch at the final size
  -> normalise -> Fourier crop to B -> MAE -> the ranks' one collective -> backward/step), micro-batch fixed at
  ``--batch-at-224`` (the engine without micro-batch growth), precision ``auto``, eager.
* ``baseline``: the MAE paper's code path: fp32 parameters + autocast (fp16 with GradScaler on CUDA, bf16 on
  the CPU), no compile, default (foreach) AdamW, ``loss.item()`` + finiteness check after every step.

Reported per B: images/s, training FLOPs per image (``mae_flops_per_image``), achieved TFLOP/s and MFU (peak
``--peak-tflops``, default 989 = H100 bf16 dense; on the CPU achieved GFLOP/s only), and how images/s follows
FLOPs per image across B: ``scaling = (img/s(B) * FLOPs(B)) / (img/s(final) * FLOPs(final))``, i.e. achieved
FLOP/s relative to the final size (target: within 15 %, i.e. >= 0.85).

    python benchmarks/throughput.py --model vit_b --batch-at-224 256 --out results/throughput_h100.json
    python benchmarks/throughput.py --model demo --batch-at-224 64 --out results/throughput_cpu.json
    python benchmarks/throughput.py --quick --out /tmp/t.json      # smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (DEFAULT_PEAK_TFLOPS, StepConfig, Trainer, batch_for, environment,  # noqa: E402
                    dtype_from_name, flops_per_image, fused_adamw_supported, fused_attention_report, pick_device,
                    preset, print_table, scaled_sizes, set_threads, sync, time_steps, write_json)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="tiny | demo | vit_b | vit_l (default: vit_b on CUDA, demo on CPU)")
    p.add_argument("--img-size", type=int, default=None, help="final size (default: the preset's)")
    p.add_argument("--sizes", default="96,160,192,224", help="sizes at a 224 final size; scaled to the final size")
    p.add_argument("--batch-at-224", type=int, default=None,
                   help="micro-batch at the final size (scaled by (final/B)^2); default 256 on CUDA, 64 on CPU")
    p.add_argument("--modes", default="engine,optimized,baseline", help="comma-separated: engine, optimized, baseline")
    p.add_argument("--opt-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="optimized path's parameter dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--baseline-autocast", choices=("auto", "fp16", "bf16", "none"), default="auto",
                   help="baseline autocast dtype (auto: fp16 + GradScaler on CUDA, bf16 on CPU)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the optimized path")
    p.add_argument("--no-compile", action="store_true", help="optimized path without torch.compile")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                   help="device peak for MFU (default: H100 SXM bf16 dense 989; ignored on the CPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per size (the first one compiles)")
    p.add_argument("--iters", type=int, default=10, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks per size (median reported)")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="which per-block statistic the step time is (min: better on a shared, noisy machine)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny model, two sizes, eager dynamo backend: smoke test")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    dev = pick_device(a.device)
    if a.quick:
        a.model = a.model or "tiny"
        a.sizes = "160,224"
        a.warmup, a.iters, a.repeats = 2, 2, 1
        a.batch_at_224 = a.batch_at_224 or 8
        if a.compile_backend == "inductor":
            a.compile_backend = "eager"  # dynamo still traces, guards and recompiles; no code generation
    a.model = a.model or ("vit_b" if dev.type == "cuda" else "demo")
    a.batch_at_224 = a.batch_at_224 or (256 if dev.type == "cuda" else 64)
    return a


def _dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def mode_config(mode: str, a, dev: torch.device) -> StepConfig:
    cuda = dev.type == "cuda"
    if mode == "optimized":
        dt = a.opt_dtype if a.opt_dtype != "auto" else ("bf16" if cuda else "fp32")
        return StepConfig(param_dtype=dtype_from_name(dt), fused=fused_adamw_supported(dev), item_per_step=False,
                          compile=not a.no_compile, compile_backend=a.compile_backend)
    if mode == "baseline":
        ac = a.baseline_autocast if a.baseline_autocast != "auto" else ("fp16" if cuda else "bf16")
        return StepConfig(param_dtype=torch.float32, autocast=None if ac == "none" else dtype_from_name(ac),
                          grad_scaler=ac == "fp16", fused=False, item_per_step=True)
    raise SystemExit(f"unknown mode {mode!r} (engine, optimized, baseline)")


def describe(sc: StepConfig) -> str:
    parts = [f"params {str(sc.param_dtype).replace('torch.', '')}"]
    if sc.autocast is not None:
        parts.append(f"autocast {str(sc.autocast).replace('torch.', '')}" + (" + GradScaler" if sc.grad_scaler else ""))
    parts.append(f"compile({sc.compile_backend}, dynamic=False)" if sc.compile else "eager")
    parts.append("fused AdamW" if sc.fused else "foreach AdamW")
    parts.append(".item() per step" if sc.item_per_step else "no per-step sync")
    return ", ".join(parts)


def run_engine_mode(a, cfg: dict, sizes: list[int], dev: torch.device, compile: bool = False,
                    trainer=None) -> tuple[list[dict], dict]:
    """Rows of the ``engine`` mode (``compile``: ``train.compile``, DeepSpeed's ``engine.compile``, mode name
    ``engine_compiled``); ``trainer``: an EngineTrainer to reuse (left open), else one is made and closed."""
    import tempfile

    from common import EngineTrainer

    final = cfg["img_size"]
    mode = "engine_compiled" if compile else "engine"
    with tempfile.TemporaryDirectory() as tmp:
        tr = trainer or EngineTrainer(cfg, a.batch_at_224, Path(tmp), compile=compile)
        info = {"mode": mode, "description": f"PretrainRun.train_step (DeepSpeed, precision auto, "
                                             f"{'train.compile' if compile else 'eager'})",
                "sdpa": fused_attention_report(tr.model)}
        x = torch.randint(0, 256, (a.batch_at_224, 3, final, final), dtype=torch.uint8)
        rows = []
        for b in sizes:
            before = _dynamo_counts()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            t = time_steps(lambda: tr.step(x, b), dev, a.warmup, a.iters, a.repeats)
            after = _dynamo_counts()
            f = flops_per_image(cfg, b)
            step_s = t[f"{a.stat}_s"]
            ips = a.batch_at_224 / step_s
            rows.append({"mode": mode, "size": b, "batch": a.batch_at_224, "step_s": step_s, "step_ms": step_s * 1e3,
                         "stat": a.stat, "step_median_s": t["median_s"], "step_min_s": t["min_s"],
                         "blocks_s": t["blocks_s"], "first_step_s": t["first_call_s"], "images_per_s": ips,
                         "flops_per_image": f, "gflops_per_image": f / 1e9, "achieved_tflops": ips * f / 1e12,
                         "achieved_gflops": ips * f / 1e9,
                         "mfu": (ips * f / 1e12 / a.peak_tflops) if dev.type == "cuda" else None,
                         "graphs_compiled": after["graphs"] - before["graphs"],
                         "graph_breaks": after["graph_breaks"] - before["graph_breaks"]})
            if dev.type == "cuda":
                rows[-1]["max_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        sync(dev)
        info["loss_finite"] = bool(torch.isfinite(tr.loss_sum).item())
        if trainer is None:
            tr.close()
    _scaling(rows, final)
    info["recompiles_total"] = sum(r["graphs_compiled"] for r in rows)
    return rows, info


def _scaling(rows: list[dict], final: int) -> None:
    ref = next((r for r in rows if r["size"] == final), None)
    for r in rows:
        ref_rate = ref["images_per_s"] * ref["flops_per_image"] if ref else None
        r["scaling"] = r["images_per_s"] * r["flops_per_image"] / ref_rate if ref else None
        r["ideal_images_per_s"] = ref["images_per_s"] * ref["flops_per_image"] / r["flops_per_image"] if ref else None
        r["within_15pct"] = (abs(r["scaling"] - 1.0) <= 0.15) if ref else None


def run_mode(mode: str, a, cfg: dict, sizes: list[int], dev: torch.device) -> tuple[list[dict], dict]:
    if mode == "engine":
        return run_engine_mode(a, cfg, sizes, dev)
    sc = mode_config(mode, a, dev)
    tr = Trainer(cfg, dev, sc)
    info = {"mode": mode, "description": describe(sc), "sdpa": fused_attention_report(tr.model)}
    if sc.compile:
        import torch._dynamo as dynamo

        limit = max(8, 2 * len(sizes) + 2)
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), limit))
    final = cfg["img_size"]
    rows = []
    for b in sizes:
        batch = batch_for(b, final, a.batch_at_224)
        x = torch.randn(batch, 3, b, b, device=dev).to(sc.param_dtype)
        before = _dynamo_counts()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t = time_steps(lambda: tr.step(x), dev, a.warmup, a.iters, a.repeats)
        after = _dynamo_counts()
        f = flops_per_image(cfg, b)
        step_s = t[f"{a.stat}_s"]
        ips = batch / step_s
        row = {"mode": mode, "size": b, "batch": batch, "step_s": step_s, "step_ms": step_s * 1e3, "stat": a.stat,
               "step_median_s": t["median_s"], "step_min_s": t["min_s"], "blocks_s": t["blocks_s"],
               "first_step_s": t["first_call_s"], "images_per_s": ips, "flops_per_image": f,
               "gflops_per_image": f / 1e9, "achieved_tflops": ips * f / 1e12, "achieved_gflops": ips * f / 1e9,
               "mfu": (ips * f / 1e12 / a.peak_tflops) if dev.type == "cuda" else None,
               "graphs_compiled": after["graphs"] - before["graphs"],
               "graph_breaks": after["graph_breaks"] - before["graph_breaks"]}
        if dev.type == "cuda":
            row["max_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        rows.append(row)
    sync(dev)
    check = tr.last_item if sc.item_per_step else tr.loss_sum.item()  # one sync at the end
    info["loss_finite"] = bool(torch.isfinite(torch.tensor(check)))
    _scaling(rows, final)
    info["recompiles_total"] = sum(r["graphs_compiled"] for r in rows)
    tr = None  # frees the model before the next mode (a `del` confuses pyflakes about the lambda above)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows, info


DYNAMO_NOTE = ("dynamo ignores functools.lru_cache: MaskedAutoencoderViT.pos_embed_for's cached sin-cos tables are "
               "rebuilt inside the compiled graph (float64 arange/sin/cos on the CPU + a copy) at every step")


def main(argv=None) -> int:
    a = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")  # see DYNAMO_NOTE
    set_threads(a.threads)
    dev = pick_device(a.device)
    cfg = preset(a.model, a.img_size)
    final = cfg["img_size"]
    sizes = scaled_sizes(final, cfg["patch_size"], [int(s) for s in a.sizes.split(",")])
    if final not in sizes:
        sizes.append(final)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    print(f"# {a.model} MAE, final {final}px, sizes {sizes}, batch at {final}: {a.batch_at_224}, {dev}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    result = {"benchmark": "throughput", "env": environment(dev), "model": {"preset": a.model, **cfg},
              "args": vars(a), "sizes": sizes, "modes": {}, "rows": []}
    t0 = time.perf_counter()
    for mode in modes:
        rows, info = run_mode(mode, a, cfg, sizes, dev)
        result["modes"][mode] = info
        result["rows"] += rows
        print(f"\n## {mode}: {info['description']}; SDPA on {info['sdpa']['fused']}/{info['sdpa']['blocks']} blocks")
        cols = [("size", "B", "d"), ("batch", "batch", "d"), ("step_ms", "step ms", ".4g"),
                ("images_per_s", "img/s", ".1f"), ("gflops_per_image", "GFLOP/img", ".4g")]
        cols += ([("achieved_tflops", "TFLOP/s", ".1f"), ("mfu", "MFU", ".1%"), ("max_memory_gib", "GiB", ".1f")]
                 if dev.type == "cuda" else [("achieved_gflops", "GFLOP/s", ".1f")])
        cols += [("scaling", "FLOP/s vs final", ".2f"), ("within_15pct", "<=15%", ""),
                 ("graphs_compiled", "graphs", "d"), ("first_step_s", "1st step s", ".2f")]
        print_table(rows, cols)
    if any(info["description"].find("compile(") >= 0 for info in result["modes"].values()):
        result["notes"] = [DYNAMO_NOTE]
        print(f"\nnote: {DYNAMO_NOTE}")
    if {"optimized", "baseline"} <= set(modes):
        speed = []
        for b in sizes:
            o = next(r for r in result["rows"] if r["mode"] == "optimized" and r["size"] == b)
            base = next(r for r in result["rows"] if r["mode"] == "baseline" and r["size"] == b)
            speed.append({"size": b, "speedup": o["images_per_s"] / base["images_per_s"]})
        result["speedup_optimized_over_baseline"] = speed
        print_table(speed, [("size", "B", "d"), ("speedup", "optimized / baseline", ".2f")], title="\n## speed-up")
    result["seconds"] = time.perf_counter() - t0
    result["env"]["loadavg_1min_end"] = environment(dev).get("loadavg_1min")
    write_json(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
