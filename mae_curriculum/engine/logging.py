"""Rank-0 logging: console, TensorBoard scalars and reconstruction grids (PNG + TensorBoard image)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from mae_curriculum.engine import dist as D


def setup_console(level: int = logging.INFO) -> None:
    fmt = f"%(asctime)s [rank{D.rank()}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level if D.is_main() else logging.WARNING, format=fmt, stream=sys.stderr, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Scalars:
    """TensorBoard writer on rank 0; a no-op elsewhere."""

    def __init__(self, log_dir: Path | None):
        self.writer = None
        if log_dir is not None and D.is_main():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def add(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, float(v), step)

    def image(self, tag: str, img_chw: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, img_chw, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def reconstruction_grid(original: torch.Tensor, mask: torch.Tensor, recon: torch.Tensor, patch: int) -> torch.Tensor:
    """Rows: original | masked input | reconstruction | reconstruction with visible patches pasted.

    Inputs are (N, 3, H, W) in [0, 1] and mask (N, L) with 1 = removed. Returns a (3, H', W') image in [0, 1].
    """
    from torchvision.utils import make_grid

    n, _, h, w = original.shape
    gh, gw = h // patch, w // patch
    m = mask.reshape(n, 1, gh, gw).repeat_interleave(patch, 2).repeat_interleave(patch, 3).to(original.dtype)
    masked = original * (1 - m) + 0.5 * m
    pasted = original * (1 - m) + recon * m
    rows = torch.cat([original, masked, recon.clamp(0, 1), pasted.clamp(0, 1)], dim=0)
    return make_grid(rows, nrow=n, padding=2, pad_value=1.0)


def save_png(img_chw: torch.Tensor, path: Path) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(img_chw, str(path))
