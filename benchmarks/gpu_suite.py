#!/usr/bin/env python
"""One GPU check: every GPU measurement the project needs, in one command (issue 14 item 5).

    python benchmarks/gpu_suite.py --out gpu_suite.json                 # on one H100 / H200: ViT-B/16, ~5-8 min
    python benchmarks/gpu_suite.py --quick --out /tmp/gpu_suite.json    # CPU smoke test (CI), tiny model

Parts (``--parts``, default all, in this order):

* ``model``: the trainer's own MAE step (``PretrainRun.train_step`` through DeepSpeed, via
  ``common.EngineTrainer`` / ``throughput.run_engine_mode``) at every size of the schedule (efficienttrain++:
  96 / 160 / 224 for ViT-B/16), micro-batch ``--batch`` at every size (the engine without micro-batch growth),
  eager and with ``train.compile`` (DeepSpeed ``engine.compile``, one graph per B): images/s, achieved TFLOP/s,
  MFU (``--peak-tflops``), peak memory; and the Fourier crop's share of the step (``fourier_crop`` final -> B on the
  same normalised batch, timed alone, over the eager step that contains it).
* ``loader``: the real ``ShardLoader`` (``--workers`` processes, as ``engine.pretrain`` builds it) feeding the eager
  engine step, per stage and per loader path (``--loader-paths``: ``exact`` = final-size crop, Fourier crop on the
  device; ``stage_sized`` = ``data.stage_sized_decode``; ``lanczos`` = ``curriculum.lowpass: lanczos``, batches at
  B; ``stage_sized_replay`` = stage-sized with ``curriculum.replay`` 4 / 2 / 1 by stage group;
  ``stage_sized_device_crop_replay`` = the same with ``data.crop: device``, the crops made by roi_align on the GPU
  in the main process, inside the timed loop): data-wait share of
  the loop (wait for the next batch / (wait + step)), images/s of the loop, then the loader
  alone (img/s and per worker), and from those the cores per GPU each stage needs at the measured model speed and
  the predicted inflation at ``--workers`` cores (``data_capacity.inflation``).
* ``decode``: ``data.decode: gpu`` (``data/gpu_decode.py``: workers ship JPEG bytes, nvJPEG + crop on the device)
  per stage at the stage-sized S, images/s. On a CPU the same code decodes on the CPU (flagged ``cpu_stand_in``).
* ``scripts``: the real ``pretrain.py`` (``--pretrain-config``, default configs/vit_b.yaml) and ``finetune.py``
  (``--finetune-config``, default configs/supervised_deit_s.yaml) as subprocesses on the shards, with a budget
  sized so the first stage change comes at step ``--change-step``: run 1 stops two steps before it (final
  checkpoint), run 2 resumes from that checkpoint (``--resume auto``) and trains across the stage change. Checks:
  exit 0 twice, "resumed from" in run 2's log, at least two curriculum sizes in TensorBoard. ``pretrain.py`` runs
  twice: as configured, and with the issue-14 loader (``data.crop=device``, ``data.stage_sized_decode=true``,
  ``curriculum.replay`` 4 / 2 / 1 by stage group), so the device crops run through a stage change and a resume on
  the GPU. The three run side by side, after the measurements (with ``--quick``: beside them, to keep the CI smoke
  test short).

Data: ``--shards DIR`` (a shard folder with labels), else the imagewoof subset in ``../shared/data`` (real
ImageNet JPEGs, short side 320; Imagenette when it is absent) is written once into ``--cache``, its images repeated
(``--repeat``, new keys) so that an epoch holds enough steps for ``--workers`` workers.

Output: one JSON (``--out``) with ``model`` / ``loader`` / ``decode`` / ``scripts`` / ``skipped`` / ``env`` /
``seconds`` per part (rewritten after each part; a part that raises is recorded under ``errors`` and the others
still run; exit status 1 if any part or script check failed), and a markdown summary (``--md``, default the
JSON's path with ``.md``) for docs/benchmarks.md. CUDA-only figures (MFU, peak memory, compiled step, nvJPEG)
are ``null`` on a CPU and listed in ``skipped`` with the reason.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (DEFAULT_PEAK_TFLOPS, ROOT, EngineTrainer, environment, flops_per_image, pick_device,  # noqa: E402
                    preset, print_table, sync, write_json)
from data_capacity import compute_shares, inflation, replay_by_size  # noqa: E402
from throughput import run_engine_mode  # noqa: E402

from mae_curriculum.curriculum.fourier import fourier_crop  # noqa: E402
from mae_curriculum.curriculum.schedule import build_schedule, replay_by_group  # noqa: E402
from mae_curriculum.data.index import load_index  # noqa: E402
from mae_curriculum.data.loader import ShardLoader, StreamSpec, stage_crop_size, steps_per_epoch  # noqa: E402
from mae_curriculum.data.transforms import AugmentConfig  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
PARTS = ("model", "loader", "decode", "scripts")
LOADER_PATHS = ("exact", "stage_sized", "lanczos", "stage_sized_replay", "stage_sized_device_crop_replay")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # configs' data.mean / std (engine.inputs.normalise)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_suite.json")
    p.add_argument("--md", default=None, help="markdown summary (default: --out with .md)")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--shards", type=Path, default=None, help="shard folder (default: written from ../shared/data)")
    p.add_argument("--val-shards", type=Path, default=None,
                   help="with --shards: what finetune.py evaluates on (default: --shards itself; keep it small)")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("MAE_BENCH_CACHE", "/tmp/mae_curriculum_bench")))
    p.add_argument("--images", type=int, default=1500, help="source JPEGs written when --shards is not given")
    p.add_argument("--repeat", type=int, default=0, help="copies of each source JPEG (0: enough for the loader part)")
    p.add_argument("--model", default="vit_b")
    p.add_argument("--schedule", default="efficienttrain++")
    p.add_argument("--batch", type=int, default=128, help="micro-batch of the model and loader parts")
    p.add_argument("--workers", type=int, default=12, help="loader worker processes (capped at the CPU count - 1)")
    p.add_argument("--loader-paths", default=",".join(LOADER_PATHS))
    p.add_argument("--replay", default="", help="loader part: replay factor per stage of the schedule for the *_replay "
                   "paths, comma-separated (default: the authors' 4 / 2 / 1 by stage group; configs/vit_b.yaml's loader "
                   "variant: 8,8,2,2,2,2,1,1,1,1)")
    p.add_argument("--loader-steps", type=int, default=24, help="timed loader+model steps per stage and path")
    p.add_argument("--loader-only-steps", type=int, default=16)
    p.add_argument("--decode-images", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="model part: eager only")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS, help="989: H100 SXM bf16 dense")
    p.add_argument("--pretrain-config", default=str(ROOT / "configs" / "vit_b.yaml"))
    p.add_argument("--finetune-config", default=str(ROOT / "configs" / "supervised_deit_s.yaml"))
    p.add_argument("--script-batch", type=int, default=64)
    p.add_argument("--change-step", type=int, default=6, help="scripts: the step of the first stage change")
    p.add_argument("--script-timeout", type=int, default=300)
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny model, a few steps, CPU-sized: the CI smoke test")
    a = p.parse_args(argv)
    a.dev = pick_device(a.device)
    if a.quick:
        a.model, a.batch, a.workers, a.images = "tiny", 8, 1, 48
        a.loader_steps, a.loader_only_steps, a.decode_images = 2, 2, 16
        a.warmup, a.iters, a.repeats = 1, 2, 1
        a.script_batch, a.change_step = 8, 4
        a.pretrain_config = str(ROOT / "configs" / "demo.yaml")
        a.finetune_config = str(ROOT / "configs" / "supervised_demo.yaml")
    a.workers = max(1, min(a.workers, (os.cpu_count() or 2) - 1))
    a.part_list = [x.strip() for x in a.parts.split(",") if x.strip()]
    a.path_list = [x.strip() for x in a.loader_paths.split(",") if x.strip()]
    if set(a.part_list) - set(PARTS) or set(a.path_list) - set(LOADER_PATHS) or not a.part_list:
        p.error(f"--parts from {PARTS}, --loader-paths from {LOADER_PATHS}")
    a.md = a.md or str(Path(a.out).with_suffix(".md"))
    return a


# --------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------


def _source_jpegs(n: int) -> tuple[list[tuple[bytes, str]], str]:
    """Up to ``n`` (JPEG bytes, class folder) from the imagewoof subset (or the first 4n of Imagenette's train
    split), taken round-robin over the classes (the archives hold one class after another)."""
    for name in ("imagewoof2-320-subset.tar.gz", "imagenette2-224.tar.gz"):
        tar = SHARED / name
        if not tar.is_file():
            continue
        by_class: dict[str, list[bytes]] = {}
        with tarfile.open(tar, "r|gz") as tf:
            for m in tf:
                parts = m.name.split("/")
                if m.isfile() and m.name.upper().endswith(".JPEG") and "/train/" in m.name:
                    by_class.setdefault(parts[-2], []).append(tf.extractfile(m).read())
                if name.startswith("imagenette") and sum(map(len, by_class.values())) >= 4 * n:
                    break
        rows = [list(zip(v, [c] * len(v))) for c, v in sorted(by_class.items())]
        out = [x for group in zip(*rows) for x in group] if rows else []
        return out[:n], name
    raise SystemExit(f"no image archive in {SHARED}: pass --shards DIR")


def ensure_shards(a) -> tuple[Path, Path, dict]:
    """(train shards, small val shards, description)."""
    from mae_curriculum.data.write_shards import Sample, write_samples

    if a.shards:
        return a.shards, a.val_shards or a.shards, {"shards": str(a.shards), "written": False}
    need = (max(a.warmup, 1) + a.loader_steps + a.loader_only_steps + 2 * a.workers + 2) * a.batch
    repeat = a.repeat or max(1, math.ceil(need / a.images))
    root = a.cache / f"gpu_suite-{a.images}x{repeat}"
    if not (root / "train" / "_info.json").is_file():
        jpegs, _ = _source_jpegs(a.images)
        classes = sorted({c for _, c in jpegs})
        tmp = Path(tempfile.mkdtemp(dir=a.cache if a.cache.is_dir() else None))
        train = (Sample(f"r{r}_{k:06d}", d, "jpg", classes.index(c)) for r in range(repeat)
                 for k, (d, c) in enumerate(jpegs))
        write_samples(train, tmp / "train", split="train", samples_per_shard=500, classes=classes)
        val = [Sample(f"v{k:06d}", d, "jpg", classes.index(c)) for k, (d, c) in enumerate(jpegs[: 4 * a.script_batch])]
        write_samples(val, tmp / "val", split="val", samples_per_shard=500, classes=classes)
        root.parent.mkdir(parents=True, exist_ok=True)
        if not root.exists():
            tmp.rename(root)
    index = load_index(root / "train")
    return root / "train", root / "val", {"shards": str(root), "written": True, "samples": index.num_samples,
                                          "repeat": repeat, "source_images": a.images}


# --------------------------------------------------------------------------------------------------------------
# model part
# --------------------------------------------------------------------------------------------------------------


def crop_times(a, cfg: dict, sizes: list[int]) -> dict[int, float]:
    """Seconds of ``fourier_crop(final -> B)`` on a normalised float batch of ``--batch`` on the device."""
    from common import time_steps

    final = cfg["img_size"]
    x = torch.rand(a.batch, 3, final, final, device=a.dev)
    return {b: (time_steps(lambda: fourier_crop(x, b), a.dev, 1, max(a.iters, 5), a.repeats)["median_s"]
                if b != final else 0.0) for b in sizes}


def model_part(a, cfg: dict, sizes: list[int], res: dict, skipped: dict) -> EngineTrainer:
    """Eager (and compiled) engine rows + the Fourier crop's share; returns the eager trainer (kept open)."""
    ns = SimpleNamespace(batch_at_224=a.batch, warmup=a.warmup, iters=a.iters, repeats=a.repeats, stat="median",
                         peak_tflops=a.peak_tflops)
    eager = EngineTrainer(cfg, a.batch, Path(tempfile.mkdtemp(prefix="gpu_suite_eager_")))
    rows, info = run_engine_mode(ns, cfg, sizes, a.dev, trainer=eager)
    crops = crop_times(a, cfg, sizes)
    for r in rows:
        r["crop_s"] = crops[r["size"]]
        r["crop_share"] = crops[r["size"]] / r["step_s"]
    res["model"] = {"eager": {"rows": rows, "info": info}}
    if a.no_compile:
        skipped["model.compiled"] = "--no-compile"
    elif a.dev.type != "cuda":
        skipped["model.compiled"] = "CUDA only (an inductor compile of every stage on a CPU takes minutes)"
    else:
        try:  # a compile failure must not cost the eager trainer the loader part needs
            tr = EngineTrainer(cfg, a.batch, Path(tempfile.mkdtemp(prefix="gpu_suite_compiled_")), compile=True)
            rows_c, info_c = run_engine_mode(ns, cfg, sizes, a.dev, compile=True, trainer=tr)
            tr.close()
            del tr
            res["model"]["compiled"] = {"rows": rows_c, "info": info_c}
        except Exception as e:  # noqa: BLE001 - reported in the JSON and the exit status
            res.setdefault("errors", {})["model.compiled"] = f"{type(e).__name__}: {e}"
        torch.cuda.empty_cache()
    if a.dev.type != "cuda":
        skipped["model.mfu"] = skipped["model.peak_memory"] = "CUDA only"
    return eager


# --------------------------------------------------------------------------------------------------------------
# loader + model, loader alone, GPU decode
# --------------------------------------------------------------------------------------------------------------


def _plans(path: str, b: int, final: int, patch: int, steps: int) -> tuple[list[int] | None, list[int] | None]:
    """(crop sizes, Lanczos output sizes) of every step for a loader path at stage ``b`` (see engine.pretrain)."""
    if path == "exact" or b == final:
        return None, None
    if path.startswith("stage_sized"):
        return [stage_crop_size(b, final, patch)] * steps, None
    return None, [b] * steps  # lanczos: final-size crop, Lanczos to B in the worker


def _spec(index, a, final: int, workers: int, decode: str = "cpu", crop: str = "workers") -> StreamSpec:
    aug = AugmentConfig(size=final, scale=(0.2, 1.0), hflip=0.5, randaug_magnitude=-1.0)  # as engine.pretrain
    return StreamSpec(index, a.batch, 1, 0, workers, 0, 1000, aug, decode=decode, crop=crop)


def loader_part(a, cfg: dict, sizes: list[int], index, tr: EngineTrainer, res: dict, schedule) -> None:
    final, patch = cfg["img_size"], cfg["patch_size"]
    model_ips = {r["size"]: r["images_per_s"] for r in res["model"]["eager"]["rows"]}
    shares = compute_shares(schedule, lambda s: flops_per_image(cfg, s))
    out = {"workers": a.workers, "batch": a.batch, "paths": {}}
    replay = replay_by_size(schedule, [int(x) for x in a.replay.split(",")] if a.replay else replay_by_group(schedule))
    out["replay"] = [replay[st.size] for st in schedule.stages]
    for path in a.path_list:
        crop = "device" if "device_crop" in path else "workers"
        loader = ShardLoader(_spec(index, a, final, a.workers, crop=crop), pin_memory=a.dev.type == "cuda",
                             decode_device=a.dev)
        steps = loader.steps_in_epoch()
        rows = []
        try:
            for epoch, b in enumerate(sizes):
                crop, lanczos = _plans(path, b, final, patch, steps)
                r = replay[b] if path.endswith("replay") else 1
                loader.start_epoch(epoch, sizes=crop, out_sizes=lanczos, replays=[r] * steps if r > 1 else None)
                it = iter(loader)
                for _ in range(a.warmup):
                    tr.step(next(it)["image"], b)
                sync(a.dev)
                wait = work = 0.0
                images = 0
                for _ in range(a.loader_steps):
                    t0 = time.perf_counter()
                    batch = next(it)
                    t1 = time.perf_counter()
                    loss = tr.step(batch["image"], b)
                    bool(torch.isfinite(loss))  # the step ends here (the trainer syncs on a flag per step too)
                    t2 = time.perf_counter()
                    wait, work, images = wait + t1 - t0, work + t2 - t1, images + batch["image"].shape[0]
                shape = int(batch["image"].shape[-1])
                t0 = time.perf_counter()
                alone = sum(next(it)["image"].shape[0] for _ in range(a.loader_only_steps))
                loader_ips = alone / (time.perf_counter() - t0)
                per_core = loader_ips / a.workers
                rows.append({"size": b, "loader_output": shape, "replay": r, "wait_s": wait, "step_s": work,
                             "wait_share": wait / (wait + work), "images_per_s": images / (wait + work),
                             "loader_only_img_s": loader_ips, "per_core_img_s": per_core,
                             "model_img_s": model_ips[b], "cores_needed": model_ips[b] / per_core,
                             "compute_share": shares.get(b, 0.0)})
        finally:
            loader.close()
        out["paths"][path] = {"rows": rows, "inflation_at_workers": inflation(rows, a.workers)}
    res["loader"] = out


def decode_part(a, cfg: dict, sizes: list[int], index, res: dict, skipped: dict) -> None:
    final, patch = cfg["img_size"], cfg["patch_size"]
    dev = a.dev if a.dev.type == "cuda" else torch.device("cpu")
    if dev.type != "cuda":
        skipped["decode.nvjpeg"] = "CUDA only: the same code ran with decode_device=cpu (cpu_stand_in)"
    loader = ShardLoader(_spec(index, a, final, a.workers, decode="gpu"), decode_device=dev)
    steps = loader.steps_in_epoch()
    rows = []
    try:
        for epoch, b in enumerate(sizes):
            s = stage_crop_size(b, final, patch)
            loader.start_epoch(epoch, sizes=[s] * steps if s != final else None)
            it = iter(loader)
            next(it)  # workers started, first batch decoded (not timed)
            sync(dev)
            images, t0 = 0, time.perf_counter()
            while images < a.decode_images:
                batch = next(it, None)
                if batch is None:
                    break
                images += batch["image"].shape[0]
            sync(dev)
            dt = time.perf_counter() - t0
            rows.append({"size": b, "crop_size": s, "images": images, "img_s": images / dt,
                         "device": str(batch["image"].device), "fallback": loader.decoder.num_fallback,
                         "corrupt": loader.decoder.num_corrupt})
    finally:
        loader.close()
    res["decode"] = {"workers": a.workers, "cpu_stand_in": dev.type != "cuda", "rows": rows}


# --------------------------------------------------------------------------------------------------------------
# pretrain.py / finetune.py through a stage change, a checkpoint and a resume
# --------------------------------------------------------------------------------------------------------------

TINY_MAE = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=64", "model.depth=2", "model.num_heads=2",
            "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2"]
TINY_VIT = ["model.img_size=32", "model.patch_size=4", "model.embed_dim=32", "model.depth=1", "model.num_heads=2"]


def _epochs_for_change(cfg, script: str, batch: int, workers: int, n: int, change_step: int) -> float:
    """``train.epochs`` whose budget puts the first stage change at optimizer step ``change_step``."""
    from mae_curriculum.curriculum.flops import mae_flops_per_image
    from mae_curriculum.curriculum.schedule import schedule_for

    m = cfg.model
    sched = schedule_for(cfg.curriculum, m.img_size, m.patch_size)
    first = sched.stages[0].size
    boundary = next((st.start for st in sched.stages if st.size != first), None)
    if boundary is None:
        raise SystemExit(f"{script}: the schedule {sched.name} has no stage change")
    if sched.accounting != "compute":
        cost = lambda s: 1.0  # noqa: E731
    elif script == "pretrain":
        cost = lambda s: mae_flops_per_image(s, m.patch_size, m.embed_dim, m.depth, m.num_heads,  # noqa: E731
                                             m.decoder_embed_dim, m.decoder_depth, m.mlp_ratio, m.in_chans,
                                             m.mask_ratio)
    else:
        cost = lambda s: float(s * s)  # noqa: E731
    epoch_images = steps_per_epoch(n, 1, batch, workers, 1) * batch
    if epoch_images == 0:
        raise SystemExit(f"{script}: {n} samples are too few for batch {batch} x {workers} workers")
    return (change_step - 0.5) * batch * cost(first) / (boundary * epoch_images * cost(m.img_size))


# the script checks: pretrain.py as configured, pretrain.py with the issue-14 loader (device crops, stage-sized S,
# replay 4 / 2 / 1 by stage group: the roi_align path on the GPU through a stage change and a resume), finetune.py
SCRIPTS = ("pretrain", "pretrain_device_crop", "finetune")


def _device_crop_overrides(cfg) -> list[str]:
    from mae_curriculum.curriculum.schedule import replay_by_group, schedule_for

    replay = replay_by_group(schedule_for(cfg.curriculum, cfg.model.img_size, cfg.model.patch_size))
    return ["data.crop=device", "data.stage_sized_decode=true", f"curriculum.replay=[{', '.join(map(str, replay))}]"]


def script_cmds(a, script: str, train: Path, val: Path, out: Path) -> tuple[list[str], list[str], int]:
    from mae_curriculum.config import PretrainConfig, load_config
    from mae_curriculum.config_finetune import FinetuneConfig

    kind = "finetune" if script == "finetune" else "pretrain"
    config = a.pretrain_config if kind == "pretrain" else a.finetune_config
    over = [f"output_dir={out}", f"data.train_shards={train}", f"data.val_shards={val}",
            f"train.batch_size={a.script_batch}", "train.grad_accum=1", f"data.num_workers={a.workers}",
            "data.shuffle_buffer=256", "checkpoint.every_minutes=0", "checkpoint.every_epochs=0", "log.every_steps=1",
            "log.progress_bar=false"]
    if kind == "pretrain":
        over += ["log.vis_every_epochs=0"] + (TINY_MAE if a.quick else [])
        cfg = load_config(PretrainConfig, Path(config), over)
        if script == "pretrain_device_crop":
            over += _device_crop_overrides(cfg)
            cfg = load_config(PretrainConfig, Path(config), over)
    else:
        over += ["model.num_classes=0"] + (TINY_VIT if a.quick else [])
        cfg = load_config(FinetuneConfig, Path(config), over)
    n = load_index(train).num_samples
    epochs = _epochs_for_change(cfg, kind, a.script_batch, a.workers, n, a.change_step)
    base = [sys.executable, str(ROOT / f"{kind}.py"), "--config", config, *over, f"train.epochs={epochs!r}"]
    first = max(1, a.change_step - 2)
    return base + [f"train.max_steps={first}"], base + [f"train.max_steps={a.change_step + 2}"], first


def _sizes_logged(out: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not (out / "tensorboard").is_dir():
        return []
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    if "curriculum/B" not in acc.Tags()["scalars"]:
        return []
    seen: list[int] = []
    for e in sorted(acc.Scalars("curriculum/B"), key=lambda e: e.step):
        if not seen or seen[-1] != int(e.value):
            seen.append(int(e.value))
    return seen


def run_script(a, script: str, train: Path, val: Path, work: Path, results: dict) -> None:
    out = work / script
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # this process's own (EngineTrainer)
        env.pop(k, None)
    if a.dev.type != "cuda":
        env["OMP_NUM_THREADS"] = "1"
    rec: dict = {"config": a.finetune_config if script == "finetune" else a.pretrain_config, "ok": False}
    try:
        first, second, stop = script_cmds(a, script, train, val, out)
        rec["runs"] = []
        for k, cmd in enumerate((first, second)):
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=a.script_timeout)
            rec["runs"].append({"returncode": r.returncode, "seconds": round(time.perf_counter() - t0, 2),
                                "resumed": "resumed from" in r.stderr,
                                "log_tail": r.stderr[-1500:] if r.returncode else ""})
            if r.returncode != 0:
                break
        rec["first_run_max_steps"] = stop
        rec["sizes"] = _sizes_logged(out)
        final = out / "final.json"
        if final.is_file():
            import json

            f = json.loads(final.read_text())
            rec["final"] = {k: f.get(k) for k in ("step", "steps", "samples", "decoded", "status", "loss",
                                                  "final_loss", "top1")}
        runs = rec["runs"]
        rec["ok"] = (len(runs) == 2 and all(r["returncode"] == 0 for r in runs) and runs[1]["resumed"]
                     and len(rec["sizes"]) >= 2)
    except (subprocess.TimeoutExpired, SystemExit, Exception) as e:  # noqa: BLE001 - reported, not fatal
        rec["error"] = f"{type(e).__name__}: {e}"
    results[script] = rec


def start_scripts(a, train: Path, val: Path, res: dict):
    """Start both scripts' runs (threads); the returned function waits for them and records the results."""
    work = Path(tempfile.mkdtemp(prefix="gpu_suite_scripts_"))
    results: dict = {}
    threads = [threading.Thread(target=run_script, args=(a, s, train, val, work, results))
               for s in SCRIPTS]
    t0 = time.perf_counter()
    for t in threads:
        t.start()

    def join() -> None:
        for t in threads:
            t.join()
        res["scripts"] = {**results, "workdir": str(work)}
        res["seconds"]["scripts"] = time.perf_counter() - t0

    return join


# --------------------------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------------------------


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(res: dict) -> str:
    env = res["env"]
    lines = [f"### GPU suite: {env.get('gpu', env['device'])}, torch {env['torch']}, "
             f"{res['settings']['model']} / {res['settings']['schedule']}, batch {res['settings']['batch']}"
             f"{' (--quick)' if res['settings']['quick'] else ''}", ""]
    if "model" in res:
        comp = {r["size"]: r for r in res["model"].get("compiled", {}).get("rows", [])}
        lines += ["| B | eager img/s | eager MFU | compiled img/s | compiled MFU | peak GiB | Fourier crop share |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["model"]["eager"]["rows"]:
            c = comp.get(r["size"], {})
            peak = max(r.get("max_memory_gib") or 0, c.get("max_memory_gib") or 0) or None
            lines.append(f"| {r['size']} | {_f(r['images_per_s'], '.0f')} | {_f(r['mfu'], '.1%')} | "
                         f"{_f(c.get('images_per_s'), '.0f')} | {_f(c.get('mfu'), '.1%')} | {_f(peak, '.1f')} | "
                         f"{_f(r['crop_share'], '.1%')} |")
        lines.append("")
    if "loader" in res:
        lo = res["loader"]
        lines += [f"Loader + model ({lo['workers']} workers, batch {lo['batch']}): data-wait share of the loop",
                  "", "| path | B | loader output | wait share | loop img/s | loader alone img/s | img/s/core | "
                  "cores/GPU needed |", "|---|---|---|---|---|---|---|---|"]
        for path, p in lo["paths"].items():
            for r in p["rows"]:
                lines.append(f"| {path} | {r['size']} | {r['loader_output']} | {r['wait_share']:.1%} | "
                             f"{r['images_per_s']:.0f} | {r['loader_only_img_s']:.0f} | {r['per_core_img_s']:.0f} | "
                             f"{r['cores_needed']:.1f} |")
        lines += ["", "Predicted inflation at the worker count: " + ", ".join(
            f"{k} {v['inflation_at_workers']:.3f}" for k, v in lo["paths"].items()), ""]
    if "decode" in res:
        d = res["decode"]
        lines += [f"data.decode gpu{' (CPU stand-in)' if d['cpu_stand_in'] else ''}, {d['workers']} workers: "
                  + ", ".join(f"B {r['size']} (S {r['crop_size']}) {r['img_s']:.0f} img/s" for r in d["rows"]), ""]
    if "scripts" in res:
        for s in SCRIPTS:
            r = res["scripts"].get(s, {})
            runs = r.get("runs", [])
            name = "pretrain.py` with device crops + replay" if s == "pretrain_device_crop" else f"{s}.py`"
            lines.append(f"- `{name} ({Path(r.get('config', '?')).name}): {'PASS' if r.get('ok') else 'FAIL'}; "
                         f"sizes {r.get('sizes')}, runs {[x['returncode'] for x in runs]} in "
                         f"{[x['seconds'] for x in runs]} s, resumed {bool(runs[1:] and runs[1]['resumed'])}"
                         + (f"; {r['error']}" if "error" in r else ""))
        lines.append("")
    for name, err in res.get("errors", {}).items():
        lines += [f"**Part {name} failed:** `{err.splitlines()[0]}`", ""]
    if res["skipped"]:
        lines += ["Skipped: " + "; ".join(f"{k}: {v}" for k, v in res["skipped"].items()), ""]
    lines.append("Seconds per part: " + ", ".join(f"{k} {v:.0f}" for k, v in res["seconds"].items()))
    return "\n".join(lines) + "\n"


def _guarded(name: str, res: dict, a, fn):
    """Run one part; an exception is recorded (``errors``), the JSON so far written, and the suite goes on: a
    lent GPU's minutes are too scarce to lose every figure to one failing part."""
    t = time.perf_counter()
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported in the JSON and the exit status
        import traceback

        res.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
        print(f"part {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    finally:
        res["seconds"][name] = time.perf_counter() - t
        write_json(a.out, res)  # what is measured so far survives a later crash or timeout


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    cfg = preset(a.model)
    final = cfg["img_size"]
    schedule = build_schedule(a.schedule, final_size=final, patch_size=cfg["patch_size"])
    sizes = sorted(set(schedule.sizes()) | {final})
    res: dict = {"benchmark": "gpu_suite", "env": environment(a.dev), "skipped": {}, "seconds": {},
                 "settings": {"model": a.model, "schedule": a.schedule, "sizes": sizes, "batch": a.batch,
                              "patch_size": cfg["patch_size"], "workers": a.workers, "quick": a.quick,
                              "peak_tflops": a.peak_tflops, "parts": a.part_list, "loader_paths": a.path_list}}
    if a.dev.type != "cuda":
        res["skipped"]["cuda"] = f"no CUDA device: CUDA-only figures are null (device {a.dev})"
    a.cache.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    train, val, res["data"] = ensure_shards(a)
    index = load_index(train)
    res["seconds"]["data"] = time.perf_counter() - t
    join_scripts = None
    if "scripts" in a.part_list and a.quick:  # CI: the scripts run beside the in-process parts (timings mean nothing)
        join_scripts = start_scripts(a, train, val, res)
    tr = None
    if "model" in a.part_list or "loader" in a.part_list:
        tr = _guarded("model", res, a, lambda: model_part(a, cfg, sizes, res, res["skipped"]))
        if "model" in res:
            print_table(res["model"]["eager"]["rows"], [("size", "B", "d"), ("images_per_s", "eager img/s", ".1f"),
                                                       ("mfu", "MFU", ".1%"), ("crop_share", "crop share", ".1%")])
    if "loader" in a.part_list and tr is not None:
        _guarded("loader", res, a, lambda: loader_part(a, cfg, sizes, index, tr, res, schedule))
    if tr is not None:
        tr.close()
        del tr
        if a.dev.type == "cuda":
            torch.cuda.empty_cache()
    if "decode" in a.part_list:
        _guarded("decode", res, a, lambda: decode_part(a, cfg, sizes, index, res, res["skipped"]))
    if "scripts" in a.part_list:  # on a GPU after the measurements, which they would disturb
        (join_scripts or start_scripts(a, train, val, res))()
    res["seconds"]["total"] = time.perf_counter() - t_start
    res["env"]["loadavg_1min_end"] = environment(a.dev).get("loadavg_1min")
    write_json(a.out, res)
    md = markdown(res)
    Path(a.md).write_text(md)
    print(md)
    ok = "errors" not in res and all(res.get("scripts", {}).get(s, {}).get("ok", True) for s in SCRIPTS)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
