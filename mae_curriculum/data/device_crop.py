"""Device crops (``data.crop: device``): the CPU workers decode, the training device crops and resizes.

The per-row CPU work of the worker path (bicubic resize, the copies around it) is what bounds a worker once replay
shares the decode between r crops (docs/benchmarks.md, issue 14). Here it moves to the device:

* **worker** (:meth:`~mae_curriculum.data.transforms.SampleTransform.regions`): reads the header, draws the r crop
  boxes and flips exactly as the worker path does (same per-sample seed, same draws in the same order), decodes the
  JPEG once (DCT-scaled when even the smallest box keeps twice the output size, the worker path's rule) and keeps
  only the union of the r boxes: the *canvas*, uint8 at the decoded resolution, no resize. The row of the first
  crop carries the canvas; the r - 1 rows after it carry only their boxes and flips.
* **collate** (:func:`collate_regions`): the canvases of a batch padded into one uint8 (G, H, W, 3) tensor (channels
  last, the decoders' layout: a copy of whole rows, ~8x faster than into channels first; edge pixels repeated once,
  then zeros),
  each row's canvas index, box (x1, y1, x2, y2 in canvas pixels) and flip.
* **device** (:class:`DeviceCropper`): one ``torchvision.ops.roi_align`` call (bilinear, adaptive sampling:
  ceil(box / S) samples per output pixel and axis, averaged: an area-like anti-alias filter) gives every row its
  S x S crop, rounded to uint8, then the flips. The batch is then the worker path's: ``image`` uint8 (N, 3, S, S).

Fidelity: roi_align is not the worker path's bicubic filter; what the model sees after the Fourier crop to B was
measured against the exact path (final-size bicubic crop -> Fourier crop to B) on the imagewoof JPEGs:
``tests/test_device_crop.py`` asserts >= 40 dB PSNR at every stage size, final included (docs/benchmarks.md gives
the figures). The boxes, flips and sample order are the worker path's, so determinism and the bitwise mid-epoch
resume hold as there (roi_align's forward is deterministic on a given device).
"""

from __future__ import annotations

import torch

from mae_curriculum.data.transport import shared_empty

CROP_MODES = ("workers", "device")
MAX_FLOAT_BYTES = 512 << 20  # canvases converted to float at once (more are cropped in chunks of groups)


def check_crop(mode: str) -> str:
    if mode not in CROP_MODES:
        raise ValueError(f"data.crop must be one of {CROP_MODES}, got {mode!r}")
    return mode


def collate_regions(rows: list[dict]) -> dict:
    """DataLoader ``collate_fn`` of the device-crop path. A row with ``canvas`` (uint8 (C, h, w), C = 1 or 3) starts
    a group; the rows after it without one crop the same canvas. ``box`` = (top, left, height, width) in canvas
    pixels, ``flip`` a bool."""
    if not rows or rows[0].get("canvas") is None:
        raise RuntimeError("a device-crop batch must begin with a row that carries its canvas")
    canvases = [r["canvas"] for r in rows if r.get("canvas") is not None]
    h = max(c.shape[1] for c in canvases)
    w = max(c.shape[2] for c in canvases)
    canvas = shared_empty((len(canvases), h, w, 3))  # channels last: the decoders' own layout, rows copy whole
    for k, c in enumerate(canvases):
        ch, cw = c.shape[1:]
        canvas[k, :ch, :cw] = c.permute(1, 2, 0)  # a greyscale canvas broadcasts to 3 channels
        # the padding: its first row / column repeats the canvas's edge (roi_align's bilinear samples may reach one
        # pixel past a box that ends at the canvas edge: the image's own edge, as at the padded tensor's), then 0
        if cw < w:
            canvas[k, :ch, cw] = canvas[k, :ch, cw - 1]
            canvas[k, :ch, cw + 1:] = 0
        if ch < h:
            canvas[k, ch] = canvas[k, ch - 1]
            canvas[k, ch + 1:] = 0
    group, boxes, g = [], [], -1
    for r in rows:
        g += r.get("canvas") is not None
        top, left, bh, bw = r["box"]
        group.append(g)
        boxes.append((left, top, left + bw, top + bh))
    return {
        "canvas": canvas, "group": torch.tensor(group, dtype=torch.int64),
        "box": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "flip": torch.tensor([bool(r["flip"]) for r in rows], dtype=torch.bool),
        "label": torch.tensor([int(r["label"]) for r in rows], dtype=torch.int64),
        "id": torch.tensor([int(r["id"]) for r in rows], dtype=torch.int64),
        "corrupt": torch.tensor([int(r["corrupt"]) for r in rows], dtype=torch.int64),
        "fresh": torch.tensor([int(r.get("fresh", 1)) for r in rows], dtype=torch.int64),
    }


def crop_regions(canvas: torch.Tensor, group: torch.Tensor, box: torch.Tensor, flip: torch.Tensor,
                 size: int) -> torch.Tensor:
    """uint8 canvases (G, H, W, 3) on the device + per row (group, box x1 y1 x2 y2, flip) -> uint8 (N, 3, size,
    size) on the device: roi_align (aligned, adaptive sampling), rounded, flipped where asked."""
    dev = canvas.device
    group, box, flip = group.to(dev), box.to(dev), flip.to(dev)
    per_group = canvas[0].numel() * 4 if len(canvas) else 1
    chunk = max(1, MAX_FLOAT_BYTES // max(1, per_group))
    if len(canvas) <= chunk:  # one call, no host sync
        out = _roi(canvas, group, box, size)
    else:  # bound the float copy of the canvases: groups in chunks
        out = torch.empty((len(group), 3, size, size), dtype=torch.uint8, device=dev)
        for g0 in range(0, len(canvas), chunk):
            rows = ((group >= g0) & (group < g0 + chunk)).nonzero().flatten()
            if len(rows):
                out[rows] = _roi(canvas[g0:g0 + chunk], group[rows] - g0, box[rows], size)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def _roi(canvas: torch.Tensor, group: torch.Tensor, box: torch.Tensor, size: int) -> torch.Tensor:
    from torchvision.ops import roi_align

    rois = torch.cat([group.to(torch.float32)[:, None], box], 1)
    x = roi_align(canvas.permute(0, 3, 1, 2).float(), rois, (size, size), spatial_scale=1.0, sampling_ratio=-1,
                  aligned=True)
    return x.round_().clamp_(0, 255).to(torch.uint8)


class DeviceCropper:
    """Turns a batch of :func:`collate_regions` into the worker path's batch ``{image, label, id, corrupt, fresh}``
    with ``image`` uint8 (N, 3, size, size) on ``device``."""

    def __init__(self, size: int, device: str | torch.device | None = None):
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.size = size

    def __call__(self, batch: dict, size: int | None = None) -> dict:
        """``size``: this batch's output size S (the loader's size plan; default the final size)."""
        canvas = batch["canvas"].to(self.device, non_blocking=True)
        image = crop_regions(canvas, batch["group"], batch["box"], batch["flip"], size or self.size)
        return {"image": image, **{k: batch[k] for k in ("label", "id", "corrupt", "fresh")}}


__all__ = ["CROP_MODES", "DeviceCropper", "check_crop", "collate_regions", "crop_regions"]
