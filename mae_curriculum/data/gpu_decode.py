"""Optional GPU decode path, for machines whose CPU cores cannot decode as fast as the GPUs train.

Enabled with ``StreamSpec(decode="gpu")`` (config ``data.decode: gpu``); the CPU path (``decode="cpu"``) stays
the default and is what CI runs end to end. Split of the work:

* **worker** (:func:`encode_sample`): reads the image header only (PIL, no pixel decoded), draws the crop box
  and flip exactly as the CPU path does (same per-sample seed, same RNG draws in the same order, see
  :meth:`~mae_curriculum.data.transforms.SampleTransform.params`), and ships the raw JPEG bytes + the params.
  Samples the GPU path does not handle are decoded on the CPU in the worker as before and shipped as images:
  non-JPEG files, JPEGs that are not RGB/greyscale (CMYK ...), and every sample while RandAugment is on (its
  ops are PIL ops). An unreadable header counts as corrupt in the worker, as on the CPU path.
* **collate** (:func:`collate_encoded`): one contiguous byte buffer + lengths for the JPEGs of a batch (one
  shared-memory transfer per batch, not one per image), params (N, 5) = (top, left, height, width, flip),
  and the CPU-decoded images with their batch positions.
* **main process** (:class:`BatchDecoder` / :func:`decode_crops`): ``torchvision.io.decode_jpeg(list,
  device=...)`` (one batched nvJPEG call on CUDA), then per sample
  :func:`~mae_curriculum.data.transforms.resized_crop` on the device (bicubic with PIL's kernel, flip), into
  one uint8 (N, 3, S, S) tensor on the device. A JPEG the device cannot decode is decoded on the CPU with the
  same params; one that fails there too is counted as corrupt (``corrupt = 1``) and replaced by a good sample
  of the same batch, so batch sizes and step counts stay equal on every rank.

Determinism and resume hold as on the CPU path: the params are a pure function of (seed, epoch, sample id),
and the decode + resize are deterministic on a given device. Pixels differ slightly from the CPU path's
(nvJPEG's IDCT / chroma upsampling; float vs fixed-point bicubic): within a few grey levels (checked by
``tests/test_gpu_decode.py`` on a GPU machine).
"""

from __future__ import annotations

import logging
from functools import partial

import torch

from contextlib import nullcontext

from mae_curriculum.data.transforms import (AugmentConfig, CropParams, SampleTransform, auto_max_pixels, decode_jpeg,
                                            one_thread, open_image, resized_crop)

log = logging.getLogger(__name__)

DECODE_MODES = ("cpu", "gpu")


# --------------------------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------------------------


def encode_sample(data: bytes, transform: SampleTransform) -> dict:
    """Worker side of one sample (call after ``seed_sample``): ``{"jpeg": bytes, "params": CropParams}`` for an
    RGB / greyscale JPEG and no RandAugment, else ``{"image": uint8 (3, S, S)}`` decoded here on the CPU.
    Raises (like ``SampleTransform``) when the header cannot be read."""
    img = open_image(data, transform.max_pixels)
    p = transform.params(img)
    if transform.randaugment or img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return {"image": transform.apply(img, data, p)}
    return {"jpeg": data, "params": p}


def collate_encoded(samples: list[dict], size: int) -> dict:
    """DataLoader ``collate_fn`` of the GPU path (see the module docstring for the fields)."""
    enc = [k for k, s in enumerate(samples) if "jpeg" in s]
    dec = [k for k, s in enumerate(samples) if "jpeg" not in s]
    lengths = [len(samples[k]["jpeg"]) for k in enc]
    if lengths:
        buf = torch.frombuffer(bytearray(b"".join(samples[k]["jpeg"] for k in enc)), dtype=torch.uint8)
    else:
        buf = torch.empty(0, dtype=torch.uint8)
    params = torch.tensor([list(samples[k]["params"]) for k in enc], dtype=torch.int64).reshape(-1, 5)
    images = (torch.stack([samples[k]["image"] for k in dec]) if dec
              else torch.empty((0, 3, size, size), dtype=torch.uint8))
    return {
        "jpeg": buf, "jpeg_lengths": torch.tensor(lengths, dtype=torch.int64),
        "jpeg_index": torch.tensor(enc, dtype=torch.int64), "params": params,
        "cpu_images": images, "cpu_index": torch.tensor(dec, dtype=torch.int64),
        "label": torch.tensor([int(s["label"]) for s in samples], dtype=torch.int64),
        "id": torch.tensor([int(s["id"]) for s in samples], dtype=torch.int64),
        "corrupt": torch.tensor([int(s["corrupt"]) for s in samples], dtype=torch.int64),
        "fresh": torch.tensor([int(s.get("fresh", 1)) for s in samples], dtype=torch.int64),
    }


def make_collate(size: int):
    return partial(collate_encoded, size=size)


# --------------------------------------------------------------------------------------------------------------
# main-process side
# --------------------------------------------------------------------------------------------------------------


def _as_params(p) -> CropParams:
    if isinstance(p, CropParams):
        return p
    t, l, h, w, f = (int(v) for v in p)
    return CropParams(t, l, h, w, bool(f))


def _decode_all(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode a list of JPEGs on ``device`` (RGB, uint8 CHW): one batched call, or one by one if it fails
    (to find the bad ones: they come back as None)."""
    if not datas:
        return []
    try:
        out = decode_jpeg(datas, device=device, rgb=True)
        return list(out) if isinstance(out, (list, tuple)) else [out]
    except (RuntimeError, ValueError):
        res: list[torch.Tensor | None] = []
        for d in datas:
            try:
                res.append(decode_jpeg(d, device=device, rgb=True))
            except (RuntimeError, ValueError):
                res.append(None)
        return res


def decode_crops(datas: list[torch.Tensor], params, size: int,
                 device: str | torch.device = "cuda") -> tuple[torch.Tensor, list[int]]:
    """Decode JPEGs (uint8 1-D CPU tensors of their bytes) on ``device`` and crop/resize/flip each with its
    params (CropParams or rows of (top, left, height, width, flip), in full-size pixels) to uint8 (3, size, size).

    Returns (images (N, 3, size, size) uint8 on ``device``, positions that failed to decode or whose decoded
    size does not fit the box: their rows are left uninitialised). ``device='cpu'`` runs the same code on the
    CPU (``torchvision.io.decode_jpeg`` on the CPU), which is how CI tests it."""
    device = torch.device(device)
    rows = [_as_params(p) for p in params]
    if len(rows) != len(datas):
        raise ValueError(f"{len(datas)} images but {len(rows)} crop params")
    out = torch.empty((len(datas), 3, size, size), dtype=torch.uint8, device=device)
    failed: list[int] = []
    with one_thread() if device.type == "cpu" else nullcontext():
        for k, (img, p) in enumerate(zip(_decode_all(list(datas), device), rows)):
            if img is None:
                failed.append(k)
                continue
            try:
                out[k] = resized_crop(img, (p.top, p.left, p.height, p.width), size, p.flip)
            except (ValueError, RuntimeError):
                failed.append(k)
    return out, failed


class BatchDecoder:
    """Turns a batch of :func:`collate_encoded` into the CPU path's batch ``{image, label, id, corrupt, fresh}`` with
    ``image`` uint8 (N, 3, size, size) on ``device`` (default: the current CUDA device)."""

    def __init__(self, size: int, device: str | torch.device | None = None):
        if device is None:
            if not torch.cuda.is_available():
                raise ValueError("data.decode=gpu needs a CUDA device (none is available); use data.decode=cpu")
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = torch.device(device)
        self.size = size
        self._cpus: dict[int, SampleTransform] = {}  # fallback decode with given params (no RNG), per output size
        self._cpu = self._cpu_at(size)
        self.num_fallback = 0  # JPEGs the device failed on but the CPU decoded
        self.num_corrupt = 0  # JPEGs neither could decode (replaced, counted in the batch's ``corrupt``)

    def _cpu_at(self, size: int) -> SampleTransform:
        if size not in self._cpus:  # the decompression-bomb bound stays the final size's
            self._cpus[size] = SampleTransform(AugmentConfig(size=size), max_pixels=auto_max_pixels(self.size))
        return self._cpus[size]

    def _cpu_decode(self, data: torch.Tensor, p: CropParams, size: int | None = None) -> torch.Tensor | None:
        raw = data.numpy().tobytes()
        cpu = self._cpu_at(size or self.size)
        try:
            with one_thread():
                return cpu.apply(open_image(raw, cpu.max_pixels), raw, p)
        except Exception as e:  # noqa: BLE001 - a corrupt sample must never stop training
            log.debug("corrupt JPEG in GPU decode: %s", e)
            return None

    def __call__(self, batch: dict, size: int | None = None) -> dict:
        """``size``: the output size of this batch (the loader's size plan; default the final size)."""
        n = len(batch["id"])
        size = size or self.size
        label, ids, corrupt = batch["label"].clone(), batch["id"].clone(), batch["corrupt"].clone()
        fresh = batch["fresh"].clone() if "fresh" in batch else 1 - corrupt
        image = torch.empty((n, 3, size, size), dtype=torch.uint8, device=self.device)
        cpu_index = batch["cpu_index"]
        if len(cpu_index):
            image[cpu_index.to(self.device)] = batch["cpu_images"].to(self.device, non_blocking=True)
        jpeg_index = batch["jpeg_index"].tolist()
        bad: list[int] = []
        if jpeg_index:
            datas = list(torch.split(batch["jpeg"], batch["jpeg_lengths"].tolist()))
            rows = [_as_params(r) for r in batch["params"].tolist()]
            crops, failed = decode_crops(datas, rows, size, self.device)
            image[torch.tensor(jpeg_index, device=self.device)] = crops
            for k in failed:
                fixed = self._cpu_decode(datas[k], rows[k], size)
                if fixed is None:
                    bad.append(jpeg_index[k])
                else:
                    self.num_fallback += 1
                    image[jpeg_index[k]] = fixed.to(self.device)
        if bad:
            good = [k for k in range(n) if k not in set(bad)]
            if not good:
                raise RuntimeError(f"none of the {n} images of a batch could be decoded")
            for k in bad:
                g = good[0]
                image[k], label[k], ids[k], corrupt[k], fresh[k] = image[g], label[g], ids[g], 1, 0
            self.num_corrupt += len(bad)
        return {"image": image, "label": label, "id": ids, "corrupt": corrupt, "fresh": fresh}


def check_decode(mode: str) -> str:
    if mode not in DECODE_MODES:
        raise ValueError(f"data.decode must be one of {DECODE_MODES}, got {mode!r}")
    return mode


__all__ = ["DECODE_MODES", "BatchDecoder", "collate_encoded", "decode_crops", "encode_sample", "make_collate",
           "check_decode"]
