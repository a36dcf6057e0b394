"""A procedural image data set for the demo and tests: 10 classes of parametric shapes and textures.

Each image has a random background (flat or gradient), random foreground colours, position, size, rotation
and mild noise, so the classes have real structure (edges, periodic textures, symmetric shapes) that an MAE
can learn to reconstruct and a classifier can learn to tell apart. Written as WebDataset shards with
``write_shards.write_samples``: ``<out>/train`` and ``<out>/val``.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ["circle", "square", "triangle", "star", "cross", "hstripes", "checker", "rings", "dots", "blob"]


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _contrasting(rng: np.random.Generator, bg: tuple[int, int, int]) -> tuple[int, int, int]:
    for _ in range(20):
        c = _colour(rng)
        if sum(abs(a - b) for a, b in zip(c, bg)) > 200:
            return c
    return tuple(255 - v for v in bg)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    a, b = np.array(_colour(rng), float), np.array(_colour(rng), float)
    if rng.random() < 0.5:
        b = a + (b - a) * 0.3  # mostly flat
    t = np.linspace(0, 1, size)[None, :, None]
    angle = rng.uniform(0, 2 * math.pi)
    g = (np.cos(angle) * t + np.sin(angle) * t.transpose(1, 0, 2)) / 2 + 0.5
    img = a + (b - a) * g
    return img, tuple(int(v) for v in img.mean((0, 1)))


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float | None = None) -> list[tuple]:
    pts = []
    k = 2 * n if inner else n
    for i in range(k):
        rr = r if (inner is None or i % 2 == 0) else r * inner
        a = rot + 2 * math.pi * i / k
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def render(cls: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One image of class ``cls`` (0..9) drawn at 4x and downsampled (anti-aliased)."""
    s = size * 4
    bg_arr, bg = _background(rng, s)
    img = Image.fromarray(bg_arr.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    fg = _contrasting(rng, bg)
    r = rng.uniform(0.18, 0.34) * s
    cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
    rot = rng.uniform(0, 2 * math.pi)
    name = CLASSES[cls]
    if name == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif name == "square":
        d.polygon(_polygon(cx, cy, r * 1.2, 4, rot), fill=fg)
    elif name == "triangle":
        d.polygon(_polygon(cx, cy, r * 1.3, 3, rot), fill=fg)
    elif name == "star":
        d.polygon(_polygon(cx, cy, r * 1.3, 5, rot, inner=0.45), fill=fg)
    elif name == "cross":
        w = r * 0.35
        for a in (rot, rot + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            pts = [(cx + dx * r * 1.2 + sx * dy * w, cy + dy * r * 1.2 - sx * dx * w) for sx in (-1, 1)]
            pts += [(cx - dx * r * 1.2 + sx * dy * w, cy - dy * r * 1.2 - sx * dx * w) for sx in (1, -1)]
            d.polygon(pts, fill=fg)
    elif name == "hstripes":
        period = rng.uniform(0.08, 0.16) * s
        for y in np.arange(rng.uniform(0, period), s, period):
            d.rectangle([0, y, s, y + period / 2], fill=fg)
        img = img.rotate(math.degrees(rot) % 60 - 30, resample=Image.BICUBIC, fillcolor=bg)
    elif name == "checker":
        period = rng.uniform(0.1, 0.2) * s
        off = rng.uniform(0, period, 2)
        for i, x in enumerate(np.arange(-period + off[0], s, period)):
            for j, y in enumerate(np.arange(-period + off[1], s, period)):
                if (i + j) % 2 == 0:
                    d.rectangle([x, y, x + period, y + period], fill=fg)
    elif name == "rings":
        period = rng.uniform(0.05, 0.09) * s
        for k in range(int(r * 1.6 / period), 0, -1):
            rr = k * period
            d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=fg if k % 2 else bg)
    elif name == "dots":
        period = rng.uniform(0.12, 0.2) * s
        dot = period * rng.uniform(0.2, 0.35)
        off = rng.uniform(0, period, 2)
        for x in np.arange(off[0], s, period):
            for y in np.arange(off[1], s, period):
                d.ellipse([x - dot, y - dot, x + dot, y + dot], fill=fg)
    elif name == "blob":
        blob = Image.new("L", (s, s), 0)
        ImageDraw.Draw(blob).ellipse([cx - r * 1.3, cy - r * 0.7, cx + r * 1.3, cy + r * 0.7], fill=255)
        blob = blob.rotate(math.degrees(rot), center=(cx, cy)).filter(ImageFilter.GaussianBlur(r * 0.3))
        img = Image.composite(Image.new("RGB", (s, s), fg), img, blob)
    else:  # pragma: no cover
        raise ValueError(cls)
    img = img.resize((size, size), Image.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 4.0, (size, size, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _samples(split: str, n: int, size: int, seed: int):
    from mae_curriculum.data.write_shards import Sample

    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    for i in range(n):
        cls = i % len(CLASSES)
        buf = io.BytesIO()
        render(cls, rng, size).save(buf, format="JPEG", quality=92)
        yield Sample(key=f"{split}_{i:07d}", image=buf.getvalue(), ext="jpg", cls=cls,
                     meta={"class": CLASSES[cls], "generator": "mae_curriculum.synthetic"})


def make_synthetic_dataset(root: str | Path, train_size: int = 3000, val_size: int = 500, size: int = 64,
                           samples_per_shard: int = 500, seed: int = 0) -> Path:
    """Write ``root/train`` and ``root/val`` shards (+ _info.json, class_index.json). Returns root."""
    from mae_curriculum.data.write_shards import write_samples

    root = Path(root)
    for split, n in (("train", train_size), ("val", val_size)):
        out = root / split
        out.mkdir(parents=True, exist_ok=True)
        write_samples(_samples(split, n, size, seed), out, split=split, samples_per_shard=samples_per_shard)
        (out / "class_index.json").write_text(json.dumps(CLASSES))
    return root
