#!/usr/bin/env python
"""Real loader on real JPEGs + model, per curriculum stage: how much of a step is spent waiting for data? (issue 9)

Data: Imagenette (train, 9,469 JPEGs at 224x224) written once as shards into a cache folder outside the repo
with ``python -m mae_curriculum.data.write_shards <tar> <cache>/imagenette2-224-train --tar-subdir
imagenette2-224-thunderInfy/train --workers N`` (``--limit N`` writes only the first N images, in-process:
for smoke tests), or any shard folder given with ``--data``.

Per stage B (ET++'s sizes 96, 160, 224 scaled to the final size by default) the loop is the trainer's step
without DeepSpeed: the ``ShardLoader`` (same ``StreamSpec``/augmentation as ``engine.pretrain``: crops at the
FINAL size, RandAugment off) -> uint8 to the device -> normalise -> ``fourier_crop`` to B -> per-step seeded
noise -> MAE forward/backward -> AdamW. Each timed step is split at the device sync into

* ``wait``: time blocked in ``next(loader)`` (the data was not ready),
* ``step``: the rest (copy, normalise, crop, model, optimizer; synced at the end of the step).

``wait_share = wait / (wait + step)`` (target < 5 %). Two references per stage: ``compute_only`` (the same
steps on one batch kept on the device: what the loop would cost with infinitely fast data) and
``loader_only`` (the loader alone: images/s the workers can deliver), so ``needed_images_per_s`` (model
speed) can be compared with what the loader gives. The first ``--warmup`` steps of a stage (worker start-up,
first decode) are not timed.

    python benchmarks/end_to_end.py --model demo --num-workers 2 --out results/e2e_cpu.json
    python benchmarks/end_to_end.py --model vit_b --batch 128 --num-workers 10 --out results/e2e_h100.json
    python benchmarks/end_to_end.py --quick --out /tmp/e.json                 # smoke test
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (ROOT, StepConfig, Trainer, batch_for, environment, flops_per_image, pick_device,  # noqa: E402
                    preset, print_table, scaled_sizes, set_threads, sync, write_json)
from mae_curriculum.curriculum.fourier import fourier_crop  # noqa: E402

DEFAULT_TAR = ROOT.parent / "shared" / "data" / "imagenette2-224.tar.gz"
TAR_SUBDIR = "imagenette2-224-thunderInfy/train"
DEFAULT_CACHE = Path(os.environ.get("MAE_BENCH_CACHE", "/tmp/mae_curriculum_bench"))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="tiny | demo | vit_b | vit_l (default: vit_b on CUDA, demo on CPU)")
    p.add_argument("--img-size", type=int, default=None, help="final size = loader crop size (default: preset's)")
    p.add_argument("--sizes", default="96,160,224", help="stage sizes at a 224 final size (scaled)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch at every B, as in the trainer "
                   "(default 64; tiny 16; vit_b/l 128)")
    p.add_argument("--scale-batch", action="store_true",
                   help="micro-batch * (final/B)^2 at low B (ET++'s recipe) instead of a fixed one")
    p.add_argument("--num-workers", type=int, default=2, help="loader worker processes")
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20, help="timed steps per stage")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per stage")
    p.add_argument("--loader-steps", type=int, default=None, help="batches for the loader-only reference "
                   "(default --steps; 0 = skip)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="parameter dtype; auto = the trainer's (bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--data", default=None, help="train shard folder (default: Imagenette shards in --cache)")
    p.add_argument("--tar", type=Path, default=DEFAULT_TAR, help="Imagenette archive")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the shards are written (outside the repo)")
    p.add_argument("--write-workers", type=int, default=2, help="write_shards --workers")
    p.add_argument("--limit", type=int, default=0, help="write only the first N images (0 = all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the main process (0 = default)")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 stages, a few steps, 400 images")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    dev = pick_device(a.device)
    if a.quick:
        a.model = a.model or "tiny"
        a.sizes = "96,224"
        a.steps, a.warmup = 3, 1
        a.num_workers = 1
        a.shuffle_buffer = 32
        a.limit = a.limit or 400
    a.model = a.model or ("vit_b" if dev.type == "cuda" else "demo")
    if a.batch is None:
        a.batch = {"tiny": 16, "vit_b": 128, "vit_l": 64}.get(a.model, 64)
    if a.loader_steps is None:
        a.loader_steps = a.steps
    return a


# --------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------


def _write_subset(tar: Path, out: Path, limit: int) -> None:
    """The first ``limit`` images under TAR_SUBDIR as shards (validated like write_shards does)."""
    from mae_curriculum.data.imageio import BadImage, prepare_image
    from mae_curriculum.data.write_shards import Sample, write_samples

    def samples():
        n, classes = 0, {}
        with tarfile.open(tar, "r|*") as tf:
            for m in tf:
                parts = m.name.split("/")
                if not m.isfile() or not m.name.startswith(TAR_SUBDIR + "/") or len(parts) < 4:
                    continue
                if not parts[-1].lower().endswith((".jpeg", ".jpg")):
                    continue
                try:
                    prep = prepare_image(tf.extractfile(m).read())
                except BadImage:
                    continue
                cls = classes.setdefault(parts[-2], len(classes))
                yield Sample(f"train_{n:08d}", prep.data, prep.ext, cls, {"path": m.name, "class": parts[-2]})
                n += 1
                if n == limit:
                    return

    write_samples(samples(), out, "train", samples_per_shard=max(50, limit // 4))


def ensure_shards(a) -> tuple[Path, float | None]:
    if a.data:
        return Path(a.data), None
    if not a.tar.is_file():
        raise SystemExit(f"{a.tar} not found: pass --tar or --data")
    out = a.cache / (f"imagenette2-224-train-first{a.limit}" if a.limit else "imagenette2-224-train")
    if (out / "_info.json").is_file():
        return out, None
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    if a.limit:
        _write_subset(a.tar, tmp, a.limit)
    else:
        cmd = [sys.executable, "-m", "mae_curriculum.data.write_shards", str(a.tar), str(tmp),
               "--tar-subdir", TAR_SUBDIR, "--workers", str(a.write_workers)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            raise SystemExit(f"write_shards failed:\n{r.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out, time.perf_counter() - t0


def make_loader(index, batch: int, a, final: int):
    from mae_curriculum.data.loader import ShardLoader, StreamSpec
    from mae_curriculum.data.transforms import AugmentConfig

    aug = AugmentConfig(size=final, scale=(0.2, 1.0), hflip=0.5, randaug_magnitude=-1.0)  # as engine.pretrain
    spec = StreamSpec(index, batch, 1, 0, a.num_workers, 0, a.shuffle_buffer, aug)
    return ShardLoader(spec, pin_memory=torch.cuda.is_available())


def endless(loader):
    """Batches across epochs (a new epoch plan whenever one ends)."""
    epoch = 0
    while True:
        loader.start_epoch(epoch)
        for batch in loader:
            yield batch
        epoch += 1


# --------------------------------------------------------------------------------------------------------------
# one stage
# --------------------------------------------------------------------------------------------------------------


def run_stage(a, tr: Trainer, index, b: int, final: int, dev: torch.device, mean, std, micro_step: list) -> dict:
    batch = batch_for(b, final, a.batch) if a.scale_batch else a.batch
    loader = make_loader(index, batch, a, final)
    it = endless(loader)

    def step(images_u8: torch.Tensor) -> torch.Tensor:
        x = images_u8.to(dev, non_blocking=True).float().div_(255.0).sub_(mean).div_(std)  # engine.pretrain.normalise
        if b != x.shape[-1]:
            x = fourier_crop(x, b)
        micro_step[0] += 1
        g = torch.Generator(device=dev).manual_seed(micro_step[0] * 7919)  # as the trainer: one per step
        noise = torch.rand(x.shape[0], (b // tr.model.patch_size) ** 2, generator=g, device=dev)
        loss = tr.step(x.to(tr.input_dtype), noise)
        return loss

    for _ in range(a.warmup):
        step(next(it)["image"])
    sync(dev)
    wait = work = 0.0
    images = 0
    for _ in range(a.steps):
        t0 = time.perf_counter()
        data = next(it)
        t1 = time.perf_counter()
        loss = step(data["image"])
        bool(torch.isfinite(loss.detach()))  # the trainer syncs on a flag every step; the step ends here
        sync(dev)
        t2 = time.perf_counter()
        wait += t1 - t0
        work += t2 - t1
        images += data["image"].shape[0]
    loop = wait + work
    # reference 1: the same steps on one batch kept on the device (infinitely fast data)
    resident = data["image"].to(dev)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step(resident)
        bool(torch.isfinite(loss.detach()))
    sync(dev)
    compute = time.perf_counter() - t0
    # reference 2: the loader alone
    loader_ips = None
    if a.loader_steps:
        t0 = time.perf_counter()
        n = sum(next(it)["image"].shape[0] for _ in range(a.loader_steps))
        loader_ips = n / (time.perf_counter() - t0)
    del it, loader
    f = flops_per_image(tr.cfg, b)
    return {"size": b, "batch": batch, "steps": a.steps, "images": images, "wait_s": wait, "step_s": work,
            "loop_s": loop, "wait_share": wait / loop, "images_per_s": images / loop,
            "compute_only_s": compute, "needed_images_per_s": a.steps * batch / compute,
            "loop_vs_compute_overhead": max(0.0, loop - compute) / loop, "loader_only_images_per_s": loader_ips,
            "gflops_per_image": f / 1e9, "achieved_gflops": images / loop * f / 1e9,
            "meets_5pct": wait / loop < 0.05}


def main(argv=None) -> int:
    a = parse_args(argv)
    set_threads(a.threads)
    dev = pick_device(a.device)
    cfg = preset(a.model, a.img_size)
    final = cfg["img_size"]
    sizes = scaled_sizes(final, cfg["patch_size"], [int(s) for s in a.sizes.split(",")])
    shards, write_s = ensure_shards(a)
    from mae_curriculum.data.index import load_index

    index = load_index(shards)
    prec = a.precision if a.precision != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
    tr = Trainer(cfg, dev, StepConfig(param_dtype=torch.bfloat16 if prec == "bf16" else torch.float32,
                                      fused=dev.type == "cuda"))
    mean = torch.tensor(MEAN, device=dev).view(1, -1, 1, 1)
    std = torch.tensor(STD, device=dev).view(1, -1, 1, 1)
    print(f"# {a.model} MAE, loader crop {final}px, stages {sizes}, batch {a.batch}"
          f"{' scaled' if a.scale_batch else ''}, {a.num_workers} loader workers, {prec}, {dev}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; data {shards} ({index.num_samples} images)")
    micro_step = [0]
    rows = [run_stage(a, tr, index, b, final, dev, mean, std, micro_step) for b in sizes]
    print_table(rows, [("size", "B", "d"), ("batch", "batch", "d"), ("wait_s", "wait s", ".3f"),
                       ("step_s", "step s", ".3f"), ("wait_share", "wait %", ".1%"), ("meets_5pct", "<5%", ""),
                       ("images_per_s", "img/s", ".1f"), ("needed_images_per_s", "model img/s", ".1f"),
                       ("loader_only_images_per_s", "loader img/s", ".1f"),
                       ("loop_vs_compute_overhead", "loop vs compute", ".1%")],
                title="\n## per stage: data wait vs step (timed steps only)")
    result = {"benchmark": "end_to_end", "env": environment(dev), "model": {"preset": a.model, **cfg},
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "data": {"shards": str(shards), "images": index.num_samples, "write_s": write_s},
              "precision": prec, "stages": rows}
    result["env"]["loadavg_1min_end"] = environment(dev).get("loadavg_1min")
    write_json(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
