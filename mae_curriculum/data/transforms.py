"""CPU-side decoding and augmentation of one sample, from encoded bytes to a uint8 CHW tensor.

Normalisation happens on the device (``engine/inputs.py``): the loader ships uint8, 4x less to copy.

A sample is processed in two parts, so that the optional GPU decode path (:mod:`.gpu_decode`) can split them
between a worker and the main process:

* :meth:`SampleTransform.params`: the crop box and the flip, drawn from the (per-sample seeded) RNGs using the
  image *header* only (size), in the same order as before: torch RNG for the box
  (``RandomResizedCrop.get_params``), then python's ``random`` for the flip (then RandAugment's draws);
* :meth:`SampleTransform.apply`: decode and :func:`resized_crop` (crop, bicubic resize, flip).

Decode: JPEGs (RGB or greyscale) are decoded with ``torchvision.io.decode_jpeg`` (libjpeg-turbo, the same
pixels as PIL, less overhead), or at reduced size with PIL ``draft`` when the crop is over twice the output
size; other formats and modes go through PIL. The resize is torch's uint8 bicubic with ``antialias=True``
(the PIL bicubic kernel, a = -0.5, ~6x faster than PIL's on this CPU); it works on a crop view of the
decoded image, so pixels outside the crop box never enter the filter (PIL's ``box`` lets them in at the
edges: outputs differ from the old PIL path by ~0.03 on average, only along the borders).
"""

from __future__ import annotations

import functools
import io
import math
import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:  # deprecated in torchvision 0.29 in favour of TorchCodec; without it, JPEGs are decoded by PIL (same pixels)
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as _tv_decode_jpeg
except ImportError:  # pragma: no cover - a torchvision without image ops
    ImageReadMode = _tv_decode_jpeg = None

Image.MAX_IMAGE_PIXELS = 178_956_970  # PIL's default bound; larger images are refused as decompression bombs
MIN_PIXEL_LIMIT = 40_000_000  # the auto limit never goes below this: 8000x5000 camera photos still decode
PIXELS_PER_OUTPUT_PIXEL = 256  # auto limit: 16x the training size on each side


def auto_max_pixels(size: int) -> int:
    """Largest image (w*h, read from the header) decoded for training at ``size``: decoding a PNG / WebP costs
    time and memory in proportion (a 13000x13000 PNG of 480 KiB took 5 s and 1.6 GiB)."""
    return max(MIN_PIXEL_LIMIT, PIXELS_PER_OUTPUT_PIXEL * size * size)


@dataclass(frozen=True)
class AugmentConfig:
    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    randaug_magnitude: float = -1.0  # < 0: no RandAugment (MAE pre-training); >= 0: timm RandAugment at m
    randaug_mstd: float = 0.5
    train: bool = True  # False: resize short side to size/0.875 then centre crop
    # curriculum.lowpass lanczos (EfficientTrain++'s released code): after the crop, flip and RandAugment, PIL
    # Lanczos resize to this size (the stage's B); 0 (or >= size): none, the output is size x size
    lowpass_size: int = 0


def open_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Open ``data`` (header only); ValueError if the header declares more than ``max_pixels`` pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
    w, h = img.size
    if max_pixels and w * h > max_pixels:
        raise ValueError(f"decompression bomb: {w}x{h} pixels, over the limit of {max_pixels}")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        arr = (arr / max(arr.max(), 1.0) * 255.0).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    return img.convert("RGB")


def _randaug(m: float, mstd: float):
    from timm.data.auto_augment import rand_augment_transform

    # timm parses the magnitude with int(): build at the integer part, then set the exact (curriculum) value.
    # interpolation: bicubic for the geometric ops (rotate, shear, translate), as timm's create_transform passes it
    # with interpolation="bicubic" (DeiT, MAE fine-tuning, EfficientTrain++); without it timm picks bilinear or
    # bicubic at random per op
    hparams = {"translate_const": 100, "img_mean": (124, 116, 104), "interpolation": Image.BICUBIC}
    ra = rand_augment_transform(f"rand-m{int(m)}-mstd{mstd:g}-inc1", hparams)
    for op in ra.ops:
        op.magnitude = m
    return ra


@contextmanager
def one_thread():
    """Run per-image tensor ops on one intra-op thread. Inside DataLoader workers torch already uses one; in
    a main process with several, an image-sized op (~150k elements) is split over OpenMP threads whose
    wake-up costs more than the op: SampleTransform took 6.2 ms instead of 0.41 ms per 224px image on the
    2-core CI machine. ``torch.set_num_threads`` is per calling thread under OpenMP and costs < 1 us."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def decode_jpeg(data, device: str | torch.device = "cpu", rgb: bool = False):
    """``torchvision.io.decode_jpeg`` (one uint8 1-D tensor or a list of them; ``device='cuda'`` decodes a list
    as one batch with nvJPEG) without its per-call deprecation warning. ``rgb``: greyscale comes out as 3
    channels (else as 1). Raises RuntimeError if torchvision has no image ops."""
    if _tv_decode_jpeg is None:
        raise RuntimeError("torchvision.io.decode_jpeg is not available in this torchvision")
    mode = ImageReadMode.RGB if rgb else ImageReadMode.UNCHANGED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _tv_decode_jpeg(data, mode=mode, device=device)


class CropParams(NamedTuple):
    """Where to crop (top, left, height, width, in pixels of the full-size image) and whether to flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


@functools.lru_cache(maxsize=64)
def _log_ratio(ratio: tuple[float, float]) -> tuple[float, float]:
    lo, hi = torch.log(torch.tensor(ratio)).tolist()  # float32, as RandomResizedCrop computes it
    return lo, hi


def resized_crop_params(height: int, width: int, scale: tuple[float, float],
                        ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` for an image of ``height`` x ``width``: the same draws from torch's default
    generator in the same order, the same (top, left, height, width), with half the torch calls (one float and one
    int64 scratch tensor per call instead of new tensors per draw; ``randint`` is ``random_`` on an empty tensor).
    (With torchvision's draw, a constant box in its place took an in-process device-crop row at replay 8 from 0.29 to
    0.20 ms: the draw was the largest per-row cost after the decode.) Checked draw for draw,
    generator state included, by ``tests/test_device_crop.py``."""
    area = height * width
    lr0, lr1 = _log_ratio(tuple(ratio))
    f, n = torch.empty(1), torch.empty(1, dtype=torch.int64)
    for _ in range(10):
        target_area = area * f.uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(f.uniform_(lr0, lr1)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = n.random_(0, height - h + 1).item()
            j = n.random_(0, width - w + 1).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)  # the fallback: the central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_params(width: int, height: int, cfg: AugmentConfig) -> CropParams:
    """The crop box and flip of one sample for an image of ``width`` x ``height``: a pure function of the RNG
    state (torch's default generator for the box, exactly ``RandomResizedCrop.get_params``: see
    :func:`resized_crop_params`; python's
    ``random`` for the flip). Eval (``train=False``): the centre crop of a ``size/0.875`` resize, no flip."""
    if cfg.train:
        i, j, h, w = resized_crop_params(height, width, cfg.scale, cfg.ratio)
        flip = cfg.hflip > 0 and random.random() < cfg.hflip
    else:
        short = int(round(cfg.size / 0.875))
        crop = min(width, height) * cfg.size / short
        i, j = int(round((height - crop) / 2)), int(round((width - crop) / 2))
        h = w = int(round(crop))
        flip = False
    return CropParams(int(i), int(j), int(h), int(w), bool(flip))


def resized_crop(img: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool = False) -> torch.Tensor:
    """uint8 (C, H, W) image (C = 1 or 3, any strides, any device) -> its ``box`` (top, left, height, width)
    resized to uint8 (3, size, size), bicubic (PIL's kernel, ``antialias=True``), flipped if ``flip``.

    The CPU uses torch's uint8 kernel (fixed point, like PIL's); other devices resize in float32, then round."""
    i, j, h, w = box
    crop = img[:, i:i + h, j:j + w]
    if crop.shape[1:] != (h, w) or h < 1 or w < 1:
        raise ValueError(f"crop box {tuple(box)} outside the image {tuple(img.shape[1:])}")
    if (h, w) == (size, size):
        out = crop
    elif img.device.type == "cpu":
        # a dense channels-last crop takes the kernel's fast path (118 -> 70 us for a 224 output here)
        x = crop[None].contiguous(memory_format=torch.channels_last)
        out = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)[0]
    else:
        out = F.interpolate(crop[None].float(), size=(size, size), mode="bicubic", antialias=True)[0]
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    if flip:
        out = out.flip(-1)
    if out.shape[0] == 1:
        out = out.expand(3, size, size)
    return out.contiguous()


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB or L PIL image -> uint8 (C, H, W) view of an HWC array (C = 3 or 1)."""
    arr = torch.from_numpy(np.array(img, dtype=np.uint8))
    return arr.permute(2, 0, 1) if arr.ndim == 3 else arr[None]


class SampleTransform:
    """bytes -> uint8 (3, size, size). Random choices come from the python/torch RNGs, which the loader seeds
    per sample from (seed, epoch, sample id): a resumed run sees the same augmentation for the same sample."""

    def __init__(self, cfg: AugmentConfig, max_pixels: int = 0):
        self.cfg = cfg
        self.max_pixels = max_pixels or auto_max_pixels(cfg.size)  # see auto_max_pixels
        self._ra = _randaug(cfg.randaug_magnitude, cfg.randaug_mstd) if cfg.randaug_magnitude >= 0 else None

    @property
    def randaugment(self) -> bool:
        return self._ra is not None

    def params(self, img: Image.Image) -> CropParams:
        """Crop box and flip for ``img`` (only its header is read): see :func:`draw_params`."""
        return draw_params(img.size[0], img.size[1], self.cfg)

    def decode_many(self, img: Image.Image, data: bytes,
                    boxes: list[tuple[int, int, int, int]]) -> tuple[torch.Tensor, list[tuple]]:
        """One decode of ``img`` for several crop ``boxes`` (replay): uint8 (C, H', W') and the boxes in its
        pixels. A JPEG is decoded at 1/2, 1/4 or 1/8 scale when even the smallest box still has over twice the
        output size on its short side at that scale (the rule of a single box, applied to the smallest)."""
        cfg = self.cfg
        if img.format == "JPEG":
            short = min(min(h, w) for _, _, h, w in boxes)
            if short > 2 * cfg.size:
                # decode at 1/2, 1/4 or 1/8 scale while every crop still has >= size pixels on its short side
                w0, h0 = img.size
                factor = short / cfg.size
                img.draft("RGB", (math.ceil(w0 / factor), math.ceil(h0 / factor)))
                sx, sy = img.size[0] / w0, img.size[1] / h0
                boxes = [_scale_box(b, sx, sy, img.size) for b in boxes]
            elif img.mode in ("RGB", "L") and _tv_decode_jpeg is not None:
                t = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                if t.shape[0] in (1, 3) and tuple(t.shape[1:]) == (img.size[1], img.size[0]):
                    return t, list(boxes)
        if img.mode not in ("RGB", "L"):
            img = _to_rgb(img)
        return _pil_to_tensor(img), list(boxes)

    @property
    def out_size(self) -> int:
        """The side of what :meth:`apply` returns: ``lowpass_size`` when it is below ``size``, else ``size``."""
        b = self.cfg.lowpass_size
        return b if 0 < b < self.cfg.size else self.cfg.size

    def apply(self, img: Image.Image, data: bytes, p: CropParams) -> torch.Tensor:
        """Decode, crop, resize, flip (and RandAugment, then the Lanczos low-pass) with the drawn parameters ``p``."""
        return self.apply_many(img, data, [p])[0]

    def apply_many(self, img: Image.Image, data: bytes, ps: list[CropParams]) -> list[torch.Tensor]:
        """:meth:`apply` for several drawn parameters from one decode (replay): one output per entry of ``ps``,
        RandAugment drawn for each in turn."""
        t, boxes = self.decode_many(img, data, [(p.top, p.left, p.height, p.width) for p in ps])
        return [self._finish(resized_crop(t, box, self.cfg.size, p.flip)) for box, p in zip(boxes, ps)]

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        """RandAugment, then the Lanczos low-pass, of one cropped uint8 (3, size, size) image (where configured)."""
        lanczos = self.out_size != self.cfg.size
        if self._ra is not None or lanczos:
            pil = Image.fromarray(out.permute(1, 2, 0).numpy())
            if self._ra is not None:
                pil = self._ra(pil)
            if lanczos:  # torchvision's Resize(B, LANCZOS) on the square PIL image, as ET++'s code inserts it
                pil = pil.resize((self.out_size, self.out_size), Image.LANCZOS)
            out = torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return out

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.views(data, 1)[0]

    def views(self, data: bytes, n: int) -> list[torch.Tensor]:
        """``n`` independently drawn crops (box, flip, RandAugment) of one image, decoded once: replay's unit.
        With ``n == 1`` the single-crop path: :meth:`params`, then :meth:`apply` (the RNG draws in that order)."""
        img = open_image(data, self.max_pixels)
        ps = [self.params(img) for _ in range(n)]
        with one_thread():
            return self.apply_many(img, data, ps)

    def regions(self, data: bytes, n: int) -> tuple[torch.Tensor, list[tuple[int, int, int, int]], list[bool]]:
        """The device-crop path's unit (``data.crop: device``, :mod:`.device_crop`): the boxes and flips of
        :meth:`views` (same draws, same order), one decode (same DCT-scaling rule), and instead of the crops the
        *canvas*: the union of the ``n`` boxes at the decoded resolution, uint8 (C, h, w) (a view of the decoded image), with the boxes
        (top, left, height, width) in its pixels. No RandAugment nor Lanczos here (they are PIL ops on each crop)."""
        if self._ra is not None or self.out_size != self.cfg.size:
            raise ValueError("device crops need no RandAugment and no Lanczos low-pass in the workers")
        img = open_image(data, self.max_pixels)
        ps = [self.params(img) for _ in range(n)]
        with one_thread():
            t, boxes = self.decode_many(img, data, [(p.top, p.left, p.height, p.width) for p in ps])
            top, left = min(b[0] for b in boxes), min(b[1] for b in boxes)
            bottom, right = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
            canvas = t[:, top:bottom, left:right]  # a view: the collate copies it into the batch once
        if canvas.shape[1:] != (bottom - top, right - left) or canvas.numel() == 0:
            raise ValueError(f"crop boxes {boxes} outside the image {tuple(t.shape[1:])}")
        return canvas, [(i - top, j - left, h, w) for i, j, h, w in boxes], [p.flip for p in ps]


def _scale_box(box: tuple[int, int, int, int], sx: float, sy: float,
               size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``box`` (top, left, height, width) of a full-size image in the pixels of its ``size`` = (w, h) reduced decode:
    the edges rounded to the nearest reduced pixel (at most half a reduced pixel off)."""
    i, j, h, w = box
    top, left = min(round(i * sy), size[1] - 1), min(round(j * sx), size[0] - 1)
    bottom = min(max(round((i + h) * sy), top + 1), size[1])
    right = min(max(round((j + w) * sx), left + 1), size[0])
    return (top, left, bottom - top, right - left)


def lanczos_resize(images_u8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) CPU batch -> (N, 3, size, size) with PIL's Lanczos filter (``curriculum.lowpass:
    lanczos``'s operator, for images that do not come through the loader, e.g. the reconstruction grid)."""
    if images_u8.shape[-1] == size and images_u8.shape[-2] == size:
        return images_u8
    out = [np.array(Image.fromarray(x.permute(1, 2, 0).contiguous().numpy()).resize((size, size), Image.LANCZOS),
                    dtype=np.uint8) for x in images_u8.cpu()]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def seed_sample(seed: int, epoch: int, sample_id: int) -> None:
    """Seed python and torch RNGs for one sample's augmentation, independent of worker and position."""
    s = (seed * 1_000_003 + epoch * 7_919 + sample_id * 104_729) % (2**63 - 1)
    random.seed(s)
    # the CPU generator only: ``torch.manual_seed`` also (re)seeds every CUDA device (~75 us here, and in a
    # main-process loader it would reset the training's CUDA RNG at every sample); same CPU stream.
    torch.default_generator.manual_seed(s)
    np.random.seed(s % 2**32)  # timm's RandAugment picks its ops with numpy's global RNG
