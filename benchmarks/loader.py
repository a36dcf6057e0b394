#!/usr/bin/env python
"""Loader throughput on real JPEGs: our ShardLoader vs torchvision ImageFolder + DataLoader (issue 3).

Data: the Imagenette train split (9,469 JPEGs at 224x224, 242 of them greyscale) from
``../shared/data/imagenette2-224.tar.gz``, prepared once in ``--cache`` (outside the repo):

* ``imagenette2-224-train/``: WebDataset shards written with
  ``python -m mae_curriculum.data.write_shards <tar> <dir> --tar-subdir imagenette2-224-thunderInfy/train``;
* ``imagenette2-224-train-folder/``: the same train folder extracted as-is (ImageFolder layout).

``--quick`` (smoke test) uses only the first ``--quick-images`` images (both forms, ``...-first<N>``).

Both loaders do the same work per image: decode + RandomResizedCrop(size, scale 0.2-1, bicubic) + horizontal
flip + uint8 CHW tensor, batch ``--batch`` (64), persistent workers, prefetch 4:

* ours: ``ShardLoader(StreamSpec(..., AugmentConfig(size)))`` exactly as ``engine.pretrain`` builds it
  (tar reading, seeded shuffle buffer, per-sample seeding, decode in the workers);
* torchvision: ``ImageFolder(root, transform=Compose([RandomResizedCrop(size, scale=(0.2, 1),
  interpolation=BICUBIC), RandomHorizontalFlip(), PILToTensor()]))`` + ``DataLoader(shuffle=True,
  drop_last=True)`` (PIL decode; greyscale converted to RGB by ImageFolder's loader).

For each worker count and each of ``--repeats`` epochs, the first ``--warmup`` batches (worker start-up,
shuffle-buffer fill, page cache) are not timed; images/s is counted over the rest of the epoch and the median
over epochs is reported (every epoch's figure is in the JSON). The main process only counts the batches.
``per_image_us``: one process, one thread, decode + transform of single images (no loader), same images.

The curriculum note: the loader always crops at the FINAL size (the curriculum's lower resolutions are made on
the device by ``fourier_crop``), so ``--size`` is the final size (224 for ViT-B/16).

``--decode gpu`` adds our loader with GPU decode (``StreamSpec(decode="gpu")``: workers ship JPEG bytes +
crop params, nvJPEG decodes in the main process); it needs CUDA and is skipped (with the reason in the JSON)
without it.

    python benchmarks/loader.py --workers 1,2,4 --out results/loader_cpu.json
    python benchmarks/loader.py --workers 2,4,8 --decode cpu,gpu --out results/loader_h100.json
    python benchmarks/loader.py --quick --out /tmp/loader.json                 # smoke test
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import ROOT, environment, print_table, write_json  # noqa: E402

DEFAULT_TAR = ROOT.parent / "shared" / "data" / "imagenette2-224.tar.gz"
TAR_SUBDIR = "imagenette2-224-thunderInfy/train"
DEFAULT_CACHE = Path(os.environ.get("MAE_BENCH_CACHE", Path.home() / ".cache" / "mae_curriculum" / "bench"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tar", type=Path, default=DEFAULT_TAR, help="the Imagenette archive")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help="where the shards and the extracted folder are kept (outside the repo; "
                        "default $MAE_BENCH_CACHE or ~/.cache/mae_curriculum/bench)")
    p.add_argument("--workers", default="1,2,4", help="comma-separated DataLoader worker counts")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224, help="crop size = the curriculum's FINAL size")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="our loader's buffer (config default)")
    p.add_argument("--warmup", type=int, default=10, help="untimed batches at the start of every epoch")
    p.add_argument("--repeats", type=int, default=2, help="timed epochs per loader and worker count")
    p.add_argument("--decode", default="cpu", help="our loader's decode modes to measure: cpu, gpu or cpu,gpu")
    p.add_argument("--no-torchvision", action="store_true", help="skip the ImageFolder reference")
    p.add_argument("--per-image", type=int, default=1000, help="images for the per-image timing (0: skip)")
    p.add_argument("--write-workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    p.add_argument("--quick", action="store_true", help="smoke run: few images, 1,2 workers, 1 epoch")
    p.add_argument("--quick-images", type=int, default=512)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    a = p.parse_args(argv)
    a.limit = 0
    if a.quick:
        a.limit = a.quick_images
        a.warmup, a.repeats = min(a.warmup, 1), 1
        a.per_image = min(a.per_image, 100)
        if a.workers == p.get_default("workers"):
            a.workers = "1,2"
    a.worker_counts = [int(w) for w in a.workers.split(",") if w.strip()]
    a.decodes = [d.strip() for d in a.decode.split(",") if d.strip()]
    bad = [d for d in a.decodes if d not in ("cpu", "gpu")]
    if bad or not a.worker_counts or min(a.worker_counts) < 1:
        p.error("--workers: positive integers; --decode: cpu and/or gpu")
    return a


# --------------------------------------------------------------------------------------------------------------
# data: shards + extracted folder, made once in the cache
# --------------------------------------------------------------------------------------------------------------


def _image_members(tf: tarfile.TarFile):
    for m in tf:
        parts = m.name.split("/")
        if (m.isfile() and m.name.startswith(TAR_SUBDIR + "/") and len(parts) >= 4
                and parts[-1].lower().endswith((".jpeg", ".jpg"))):
            yield m, parts[-2], parts[-1]


def _prepare_subset(tar: Path, shards: Path, folder: Path, limit: int) -> None:
    """The first ``limit`` train images as shards and as an ImageFolder tree (one pass over the archive)."""
    from mae_curriculum.data.write_shards import Sample, write_samples

    def samples():
        n, classes = 0, {}
        with tarfile.open(tar, "r|*") as tf:
            for m, wnid, name in _image_members(tf):
                data = tf.extractfile(m).read()
                (folder / wnid).mkdir(parents=True, exist_ok=True)
                (folder / wnid / name).write_bytes(data)
                cls = classes.setdefault(wnid, len(classes))
                yield Sample(f"train_{n:08d}", data, "jpg", cls, {"path": m.name, "class": wnid})
                n += 1
                if n == limit:
                    return

    write_samples(samples(), shards, "train", samples_per_shard=max(64, limit // 4))


def _extract_folder(tar: Path, folder: Path) -> None:
    with tarfile.open(tar, "r|*") as tf:
        for m, wnid, name in _image_members(tf):
            (folder / wnid).mkdir(parents=True, exist_ok=True)
            (folder / wnid / name).write_bytes(tf.extractfile(m).read())


def ensure_data(a) -> tuple[Path, Path, dict]:
    """(shard folder, ImageFolder root, seconds spent preparing them now)."""
    if not a.tar.is_file():
        raise SystemExit(f"{a.tar} not found: pass --tar")
    tag = f"-first{a.limit}" if a.limit else ""
    shards, folder = a.cache / f"imagenette2-224-train{tag}", a.cache / f"imagenette2-224-train-folder{tag}"
    prep: dict[str, float] = {}
    a.cache.mkdir(parents=True, exist_ok=True)
    if a.limit:
        if not ((shards / "_info.json").is_file() and (folder / ".complete").is_file()):
            t0 = time.perf_counter()
            for d in (shards, folder):
                shutil.rmtree(d, ignore_errors=True)
            _prepare_subset(a.tar, shards, folder, a.limit)
            (folder / ".complete").write_text("")
            prep["subset_s"] = time.perf_counter() - t0
        return shards, folder, prep
    if not (shards / "_info.json").is_file():
        t0, tmp = time.perf_counter(), shards.with_name(shards.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "mae_curriculum.data.write_shards", str(a.tar), str(tmp), "--tar-subdir",
               TAR_SUBDIR, "--workers", str(a.write_workers), "--no-progress"]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            raise SystemExit(f"write_shards failed:\n{r.stderr[-3000:]}")
        shutil.rmtree(shards, ignore_errors=True)
        tmp.rename(shards)
        prep["write_shards_s"] = time.perf_counter() - t0
    if not (folder / ".complete").is_file():
        t0 = time.perf_counter()
        shutil.rmtree(folder, ignore_errors=True)
        _extract_folder(a.tar, folder)
        (folder / ".complete").write_text("")
        prep["extract_folder_s"] = time.perf_counter() - t0
    return shards, folder, prep


# --------------------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------------------


def _time_epoch(batches, warmup: int, sync) -> dict:
    """Skip ``warmup`` batches of the iterator, then count images/s over the rest."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    t0, n, steps = time.perf_counter(), 0, 0
    for b in it:
        n += len(b["id"] if isinstance(b, dict) else b[1])
        steps += 1
    sync()
    dt = time.perf_counter() - t0
    return {"images": n, "steps": steps, "seconds": dt, "images_per_s": n / dt if dt > 0 else float("nan")}


def time_ours(shards: Path, workers: int, a, decode: str) -> dict:
    from mae_curriculum.data.index import load_index
    from mae_curriculum.data.loader import ShardLoader, StreamSpec
    from mae_curriculum.data.transforms import AugmentConfig

    index = load_index(shards)
    aug = AugmentConfig(size=a.size, scale=(0.2, 1.0), hflip=0.5, randaug_magnitude=-1.0)  # as engine.pretrain
    spec = StreamSpec(index, a.batch, 1, 0, workers, 0, a.shuffle_buffer, aug, decode=decode)
    loader = ShardLoader(spec, pin_memory=False)
    sync = torch.cuda.synchronize if decode == "gpu" else (lambda: None)
    epochs = []
    try:
        for epoch in range(a.repeats):
            steps = loader.start_epoch(epoch)
            epochs.append(_time_epoch(loader, min(a.warmup, steps // 2), sync))
    finally:
        _close(loader.loader)
        del loader
        gc.collect()
    return {"epochs": epochs, "images_per_s": statistics.median(e["images_per_s"] for e in epochs)}


def time_torchvision(folder: Path, workers: int, a) -> dict:
    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    tf = T.Compose([T.RandomResizedCrop(a.size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(), T.PILToTensor()])
    ds = ImageFolder(str(folder), transform=tf)
    loader = DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=True, prefetch_factor=4, generator=torch.Generator().manual_seed(0))
    epochs = []
    try:
        for _ in range(a.repeats):
            epochs.append(_time_epoch(loader, min(a.warmup, len(loader) // 2), lambda: None))
    finally:
        _close(loader)
        del loader
        gc.collect()
    return {"epochs": epochs, "images_per_s": statistics.median(e["images_per_s"] for e in epochs)}


def _close(dl) -> None:
    """Shut persistent workers down now: a live iterator at interpreter exit would leave the exit waiting on
    workers that ignore SIGTERM (ShardLoader's workers do, by design)."""
    it = getattr(dl, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    dl._iterator = None


def per_image_times(shards: Path, folder: Path, a) -> dict:
    """One process, one thread: microseconds per image for our SampleTransform (bytes -> tensor, with the
    per-sample seeding) and for the torchvision transform on a PIL image opened from the same bytes."""
    import io

    import numpy as np
    from PIL import Image
    from torchvision import transforms as T

    from mae_curriculum.data.index import load_index
    from mae_curriculum.data.loader import read_raw
    from mae_curriculum.data.transforms import AugmentConfig, SampleTransform, seed_sample

    index = load_index(shards)
    n = min(a.per_image, index.num_samples)
    ids = np.linspace(0, index.num_samples - 1, n).astype(np.int64)
    datas = [s["jpg"] for _, s in read_raw(index, np.unique(ids), lambda e: None) if "jpg" in s]
    ours = SampleTransform(AugmentConfig(size=a.size))
    tv = T.Compose([T.RandomResizedCrop(a.size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(), T.PILToTensor()])

    def run_ours():
        for k, d in enumerate(datas):
            seed_sample(0, 0, k)
            ours(d)

    def run_tv():
        for d in datas:
            with Image.open(io.BytesIO(d)) as im:
                tv(im.convert("RGB"))  # what ImageFolder's pil_loader does

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = {}
        for name, fn in (("ours", run_ours), ("torchvision", run_tv)):
            fn()  # warm-up
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                runs.append((time.perf_counter() - t0) / len(datas) * 1e6)
            res[name] = {"min_us": min(runs), "median_us": statistics.median(runs), "runs_us": runs}
    finally:
        torch.set_num_threads(threads)
    return {"images": len(datas), **res}


# --------------------------------------------------------------------------------------------------------------


def _versions() -> dict:
    import numpy
    import PIL
    import torchvision
    import webdataset

    return {"torchvision": torchvision.__version__, "pillow": PIL.__version__, "numpy": numpy.__version__,
            "webdataset": getattr(webdataset, "__version__", "?")}


def main(argv=None) -> int:
    a = parse_args(argv)
    shards, folder, prep = ensure_data(a)
    from mae_curriculum.data.index import load_index

    num_images = load_index(shards).num_samples
    env = {**environment(torch.device("cuda" if torch.cuda.is_available() else "cpu")), **_versions()}
    print(f"{num_images} images, size {a.size}, batch {a.batch}, workers {a.worker_counts}, "
          f"{a.repeats} timed epoch(s) after {a.warmup} warm-up batches each; {env['cpu_count']} CPUs "
          f"({env['cpu']}), torch {env['torch']}, torchvision {env['torchvision']}, Pillow {env['pillow']}",
          flush=True)
    gpu_note = None
    decodes = list(a.decodes)
    if "gpu" in decodes and not torch.cuda.is_available():
        gpu_note = "not measured: no CUDA device on this machine"
        decodes.remove("gpu")
        print(f"GPU decode {gpu_note}", flush=True)

    rows = []
    for w in a.worker_counts:
        row: dict = {"workers": w}
        for dec in decodes:
            key = "ours" if dec == "cpu" else "ours_gpu_decode"
            r = time_ours(shards, w, a, dec)
            row[f"{key}_images_per_s"], row[f"{key}_epochs"] = r["images_per_s"], r["epochs"]
            print(f"  workers {w}: ours ({dec} decode) {r['images_per_s']:.0f} img/s", flush=True)
        if not a.no_torchvision:
            r = time_torchvision(folder, w, a)
            row["torchvision_images_per_s"], row["torchvision_epochs"] = r["images_per_s"], r["epochs"]
            print(f"  workers {w}: torchvision ImageFolder {r['images_per_s']:.0f} img/s", flush=True)
            if "ours_images_per_s" in row:
                row["ratio"] = row["ours_images_per_s"] / row["torchvision_images_per_s"]
            if "ours_gpu_decode_images_per_s" in row:
                row["ratio_gpu_decode"] = row["ours_gpu_decode_images_per_s"] / row["torchvision_images_per_s"]
        rows.append(row)

    per_image = per_image_times(shards, folder, a) if a.per_image > 0 else None

    columns = [("workers", "workers", "d")]
    if "cpu" in decodes:
        columns.append(("ours_images_per_s", "ours img/s", ".0f"))
    if "gpu" in decodes:
        columns.append(("ours_gpu_decode_images_per_s", "ours gpu-decode img/s", ".0f"))
    if not a.no_torchvision:
        columns.append(("torchvision_images_per_s", "torchvision img/s", ".0f"))
        if "cpu" in decodes:
            columns.append(("ratio", "ours/torchvision", ".2f"))
        if "gpu" in decodes:
            columns.append(("ratio_gpu_decode", "gpu-decode/torchvision", ".2f"))
    print()
    print_table(rows, columns, title=f"Loader throughput, Imagenette train ({num_images} JPEGs), size {a.size}, "
                                     f"batch {a.batch} (median of {a.repeats} epoch(s))")
    if per_image:
        o, t = per_image["ours"], per_image["torchvision"]
        print(f"per image, 1 process, 1 thread ({per_image['images']} images): ours {o['min_us']:.0f} us, "
              f"torchvision {t['min_us']:.0f} us (min of 3 passes)")
    if gpu_note:
        print(f"GPU decode: {gpu_note}")

    write_json(a.out, {
        "benchmark": "loader", "env": env,
        "config": {"size": a.size, "batch": a.batch, "workers": a.worker_counts, "repeats": a.repeats,
                   "warmup_batches": a.warmup, "shuffle_buffer": a.shuffle_buffer, "decode": a.decodes,
                   "quick": a.quick},
        "data": {"tar": str(a.tar), "shards": str(shards), "folder": str(folder), "images": num_images,
                 "prepare_s": prep},
        "rows": rows, "per_image_us": per_image,
        "gpu_decode": {"measured": "gpu" in decodes, "note": gpu_note},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
