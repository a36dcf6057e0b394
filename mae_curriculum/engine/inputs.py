"""Model inputs on the device: uint8 batches -> normalised float, low-pass cropped to a curriculum stage's size."""

from __future__ import annotations

import torch

from mae_curriculum.curriculum.fourier import fourier_crop


def normalise(images_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dev: torch.device) -> torch.Tensor:
    x = images_u8.to(dev, non_blocking=True).float().div_(255.0)
    return x.sub_(mean).div_(std)


def at_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size of the spectrum (EfficientTrain's low-frequency crop): a smaller image."""
    return x if x.shape[-1] == size else fourier_crop(x, size)
