"""CPU-side decoding and augmentation of one sample, from encoded bytes to a uint8 CHW tensor.

Normalisation happens on the device (see ``engine.batch``): the loader ships uint8, 4x less to copy.
JPEGs are decoded at reduced size (PIL ``draft``) when the random crop allows it.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

Image.MAX_IMAGE_PIXELS = 178_956_970  # PIL's default bound; larger images are refused as decompression bombs


@dataclass(frozen=True)
class AugmentConfig:
    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    randaug_magnitude: float = -1.0  # < 0: no RandAugment (MAE pre-training); >= 0: timm RandAugment at m
    randaug_mstd: float = 0.5
    train: bool = True  # False: resize short side to size/0.875 then centre crop


def open_image(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        img.size  # header parsed
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

    return rand_augment_transform(f"rand-m{m:g}-mstd{mstd:g}-inc1", {"translate_const": 100, "img_mean": (124, 116, 104)})


class SampleTransform:
    """bytes -> uint8 (3, size, size). Random choices come from the python/torch RNGs, which the loader seeds
    per sample from (seed, epoch, sample id): a resumed run sees the same augmentation for the same sample."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg
        self._ra = _randaug(cfg.randaug_magnitude, cfg.randaug_mstd) if cfg.randaug_magnitude >= 0 else None

    def __call__(self, data: bytes) -> torch.Tensor:
        cfg = self.cfg
        img = open_image(data)
        w0, h0 = img.size
        if cfg.train:
            i, j, h, w = RandomResizedCrop.get_params(img, list(cfg.scale), list(cfg.ratio))
        else:
            short = int(round(cfg.size / 0.875))
            s = min(w0, h0)
            crop = s * cfg.size / short
            i, j, h, w = int(round((h0 - crop) / 2)), int(round((w0 - crop) / 2)), int(round(crop)), int(round(crop))
        if img.format == "JPEG" and min(h, w) > 2 * cfg.size:
            # decode at 1/2, 1/4 or 1/8 scale while the crop still has >= size pixels on its short side
            factor = min(h, w) / cfg.size
            img.draft("RGB", (math.ceil(w0 / factor), math.ceil(h0 / factor)))
            sx, sy = img.size[0] / w0, img.size[1] / h0
            i, j, h, w = int(i * sy), int(j * sx), max(1, int(h * sy)), max(1, int(w * sx))
        img = _to_rgb(img)
        img = img.resize((cfg.size, cfg.size), Image.BICUBIC, box=(j, i, j + w, i + h))
        if cfg.train and cfg.hflip > 0 and random.random() < cfg.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self._ra is not None:
            img = self._ra(img)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def seed_sample(seed: int, epoch: int, sample_id: int) -> None:
    """Seed python and torch RNGs for one sample's augmentation, independent of worker and position."""
    s = (seed * 1_000_003 + epoch * 7_919 + sample_id * 104_729) % (2**63 - 1)
    random.seed(s)
    torch.manual_seed(s)
