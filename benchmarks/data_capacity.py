#!/usr/bin/env python
"""How many CPU cores per GPU does each curriculum stage need? (issue 14)

For a model preset and a schedule, per stage size B:

* ``per_core_img_s``: the REAL loader (``ShardLoader(StreamSpec(...))`` exactly as ``engine.pretrain`` builds it:
  tar reading, seeded shuffle buffer, per-sample seeding, decode + crop in the workers) at that stage's settings,
  in images/s per worker process. Path ``exact``: every step cropped at the final size (the Fourier crop to B runs
  on the device); path ``stage_sized`` (``data.stage_sized_decode``): the loader's size plan crops every step to
  ``S = stage_crop_size(B)`` (JPEG DCT scaling where the crop allows); paths ``replay`` and ``stage_sized_replay``:
  the same two with replay (``curriculum.replay``: each decoded image gives r crops, r consecutive rows of the
  batch; ``--replay``, one factor per stage, default the EfficientTrain++ authors' 4 / 2 / 1 for the lowest /
  middle / final stage sizes), images/s counting every row the model sees. Per worker count (``--workers``), a first
  iterator starts the (persistent) workers and is not timed; then a new epoch is iterated for ``--images`` images
  and images/s = images / time from ``iter()`` to the last batch (the pipeline fill included), divided by the
  workers. The stage's ``per_core_img_s`` is the lowest over the worker counts (conservative).
* ``demand_img_s``: images/s one GPU consumes at B: ``peak_tflops * 1e12 * mfu / flops(B)``, ``flops`` = the
  project's training FLOP count per image (``mae_flops_per_image``, forward + backward).
* ``cores_needed = demand_img_s / per_core_img_s``.

Inflation (predicted wall time of the whole schedule over its compute-bound time), with ``c = --cores-per-gpu``::

    inflation = sum_i  f_i * max(1, cores_needed_i / c)

where ``f_i`` is stage i's share of the run's compute (its progress fraction with ``accounting: compute``, e.g.
efficienttrain++; with ``accounting: epochs`` the fraction times flops(B_i), normalised): a stage takes
``f_i * T`` at the compute bound and ``f_i * T * cores_needed_i / c`` when ``c`` cores deliver its images, i.e.
max(compute time, data time) per stage, data and compute fully overlapped.

    python benchmarks/data_capacity.py --shards DIR --model vit_b --schedule efficienttrain++ --peak-tflops 989 \\
        --mfu 0.40 --workers 1,2 --images 1024 --cores-per-gpu 12 --out FILE.json
    python benchmarks/data_capacity.py --quick --shards DIR --out /tmp/capacity.json     # smoke test

Techniques one at a time: ``--paths exact,stage_sized,replay,stage_sized_replay``; with ``device_crop`` in a path's
name (``device_crop``, ``device_crop_replay``, ``stage_sized_device_crop_replay``, ...: ``data.crop: device``) the
workers decode and ship canvases, and the crop + resize is left to the device (``roi_align``, measured by
``benchmarks/gpu_suite.py`` on a GPU, not here): the rate counts rows as the workers hand them over. Every stage also
reports the uint8 bytes per image the workers hand over (``shipped_kb_per_image``) and what that is per second at the
GPU's demand (``shipped_gb_s_at_demand``: the host-to-device copy and its pinning in the main process).

JSON: ``{"stages": [{"size", "crop_size", "replay", "demand_img_s", "per_core_img_s", "cores_needed", "compute_share",
...}], "inflation", "env", "runs": [every (path, workers) measurement]}``; the top-level ``stages`` /
``inflation`` are those of the last path of ``--paths`` (default ``exact,stage_sized``: the stage-sized path), and
``by_path`` holds each path's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_PEAK_TFLOPS, environment, flops_per_image, preset, print_table, write_json  # noqa: E402

from mae_curriculum.curriculum.schedule import build_schedule, replay_by_group  # noqa: E402
from mae_curriculum.data.index import load_index  # noqa: E402
from mae_curriculum.data.loader import ShardLoader, StreamSpec, stage_crop_size  # noqa: E402
from mae_curriculum.data.transforms import AugmentConfig  # noqa: E402

PATHS = ("exact", "stage_sized", "replay", "stage_sized_replay", "device_crop", "stage_sized_device_crop",
         "device_crop_replay", "stage_sized_device_crop_replay")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=Path, required=True, help="a shard folder (*.tar + _info.json)")
    p.add_argument("--model", default="vit_b")
    p.add_argument("--img-size", type=int, default=0, help="final size (default: the preset's)")
    p.add_argument("--schedule", default="efficienttrain++")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS)
    p.add_argument("--mfu", type=float, default=0.40)
    p.add_argument("--cores-per-gpu", type=float, default=12.0)
    p.add_argument("--workers", default="1,2", help="comma-separated loader worker counts")
    p.add_argument("--paths", default="exact,stage_sized", help=f"comma-separated, from {PATHS}")
    p.add_argument("--images", type=int, default=1024, help="images timed per (stage, path, workers)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replay", default="", help="replay factor per stage of the schedule, comma-separated "
                   "(default: 4 / 2 / 1 for the lowest / middle / final sizes)")
    p.add_argument("--randaug", type=float, default=-1.0,
                   help="RandAugment magnitude in the workers (the supervised path of finetune.py; < 0: off, as MAE)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 worker, 48 images, batch 8")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    if a.quick:
        a.workers, a.images, a.batch, a.shuffle_buffer = "1", 48, 8, 64
    a.worker_counts = [int(w) for w in a.workers.split(",") if w.strip()]
    a.path_list = [x.strip() for x in a.paths.split(",") if x.strip()]
    bad = [x for x in a.path_list if x not in PATHS]
    if bad or not a.path_list or not a.worker_counts or min(a.worker_counts) < 1:
        p.error(f"--paths must be from {PATHS} and --workers >= 1")
    if a.randaug >= 0 and any("device_crop" in x for x in a.path_list):
        p.error("--randaug: RandAugment runs on each crop in the workers; the device_crop paths take none")
    return a


def compute_shares(schedule, flops) -> dict[int, float]:
    """Each stage size's share of the run's compute (stages of equal size summed)."""
    raw: dict[int, float] = {}
    for st in schedule.stages:
        w = st.end - st.start
        if schedule.accounting != "compute":
            w *= flops(st.size)
        raw[st.size] = raw.get(st.size, 0.0) + w
    total = sum(raw.values())
    return {b: v / total for b, v in raw.items()}


def inflation(stages: list[dict], cores_per_gpu: float) -> float:
    """sum_i share_i * max(1, cores_needed_i / cores_per_gpu) (see the module docstring)."""
    return sum(s["compute_share"] * max(1.0, s["cores_needed"] / cores_per_gpu) for s in stages)


def replay_by_size(schedule, replay: list[int]) -> dict[int, int]:
    """{B: r} from one factor per stage (stages of one size must share it)."""
    if len(replay) != len(schedule.stages):
        raise SystemExit(f"--replay needs one factor per stage: {len(schedule.stages)} for {schedule.name}")
    out: dict[int, int] = {}
    for st, r in zip(schedule.stages, replay):
        if out.setdefault(st.size, r) != r:
            raise SystemExit(f"--replay: the stages at B = {st.size} have different factors")
    return out


def measure(index, a, final: int, crop: int, workers: int, replay: int = 1, device_crop: bool = False,
            shipped: list | None = None) -> float:
    """Images/s (rows the model sees) of the real loader with ``workers`` workers, every step cropped to ``crop``
    (the final size: the exact path), each decoded image replayed ``replay`` times. ``device_crop``
    (``data.crop: device``): the workers ship canvases; the batches are counted as they leave the workers (the crop
    itself is the device's work, one ``roi_align`` per batch, not this machine's CPU). ``shipped`` gets the uint8
    bytes per row handed over by the workers."""
    spec = StreamSpec(index, a.batch, 1, 0, workers, a.seed, a.shuffle_buffer,
                      AugmentConfig(size=final, scale=(0.2, 1.0), hflip=0.5, randaug_magnitude=a.randaug),
                      crop="device" if device_crop else "workers")
    loader = ShardLoader(spec, decode_device="cpu")
    batches = loader.loader if device_crop else loader  # device crops: the batches as the workers hand them over
    pixels = "canvas" if device_crop else "image"
    try:
        sizes = None if crop == final else [crop] * loader.steps_in_epoch()
        replays = None if replay == 1 else [replay] * loader.steps_in_epoch()
        loader.start_epoch(0, sizes=sizes, replays=replays)
        for k, batch in enumerate(batches):  # start the persistent workers (not timed)
            assert device_crop or batch["image"].shape[-1] == crop, (batch["image"].shape, crop)
            if k + 1 >= workers:
                break
        images, epoch, nbytes = 0, 1, 0
        t0 = time.perf_counter()
        while images < a.images:
            loader.start_epoch(epoch, sizes=sizes, replays=replays)
            for batch in batches:
                images += len(batch["id"])
                nbytes += batch[pixels].numel()
                if images >= a.images:
                    break
            epoch += 1
        rate = images / (time.perf_counter() - t0)
        if shipped is not None:
            shipped.append(nbytes / images)
        return rate
    finally:
        loader.close()


def main(argv=None) -> int:
    a = parse_args(argv)
    cfg = preset(a.model, a.img_size or None)
    final, patch = cfg["img_size"], cfg["patch_size"]
    schedule = build_schedule(a.schedule, final_size=final, patch_size=patch)

    def flops(b: int) -> float:
        return flops_per_image(cfg, b)

    shares = compute_shares(schedule, flops)
    replay_list = [int(x) for x in a.replay.split(",")] if a.replay else replay_by_group(schedule)
    reps = replay_by_size(schedule, replay_list)
    index = load_index(a.shards)
    env_ = environment(torch.device("cpu"))
    runs, by_path = [], {}
    for path in a.path_list:
        stages = []
        for b in sorted(shares):
            crop = stage_crop_size(b, final, patch) if path.startswith("stage_sized") else final
            r = reps[b] if path.endswith("replay") else 1
            device = "device_crop" in path
            shipped: list[float] = []
            rates = {w: measure(index, a, final, crop, w, r, device, shipped) for w in a.worker_counts}
            demand = a.peak_tflops * 1e12 * a.mfu / flops(b)
            for w, v in rates.items():
                runs.append({"path": path, "size": b, "crop_size": crop, "replay": r, "workers": w, "img_s": v,
                             "per_core_img_s": v / w})
            per_core = min(v / w for w, v in rates.items())
            per_row = sum(shipped) / len(shipped)
            stages.append({"size": b, "crop_size": crop, "replay": r, "device_crop": device,
                           "demand_img_s": demand, "per_core_img_s": per_core, "cores_needed": demand / per_core,
                           "compute_share": shares[b], "gflops_per_image": flops(b) / 1e9,
                           "shipped_kb_per_image": per_row / 1e3, "shipped_gb_s_at_demand": per_row * demand / 1e9,
                           "per_core_by_workers": {str(w): v / w for w, v in rates.items()}})
        by_path[path] = {"stages": stages, "inflation": inflation(stages, a.cores_per_gpu)}
        print_table(stages, [("size", "B", "d"), ("crop_size", "S", "d"), ("replay", "r", "d"),
                             ("compute_share", "share", ".2f"), ("demand_img_s", "demand img/s", ".0f"), ("per_core_img_s", "img/s/core", ".0f"),
                             ("cores_needed", "cores/GPU", ".1f"), ("shipped_kb_per_image", "KB/img", ".0f"),
                             ("shipped_gb_s_at_demand", "GB/s", ".2f")],
                    title=f"{path}: inflation at {a.cores_per_gpu:g} cores/GPU = {by_path[path]['inflation']:.3f}")
    top = by_path[a.path_list[-1]]
    env_["loadavg_1min_end"] = environment(torch.device("cpu")).get("loadavg_1min")
    res = {"benchmark": "data_capacity", "stages": top["stages"], "inflation": top["inflation"],
           "path": a.path_list[-1], "by_path": by_path, "runs": runs, "env": env_,
           "settings": {"model": a.model, "final_size": final, "patch_size": patch, "schedule": a.schedule,
                        "peak_tflops": a.peak_tflops, "mfu": a.mfu, "cores_per_gpu": a.cores_per_gpu,
                        "workers": a.worker_counts, "images": a.images, "replay": replay_list, "randaug": a.randaug,
                        "batch": a.batch,
                        "shards": str(a.shards), "num_samples": index.num_samples, "quick": a.quick}}
    write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
