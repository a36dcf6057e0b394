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


def lowpass(x: torch.Tensor, size: int, operator: str = "fourier") -> torch.Tensor:
    """The model input at the stage's ``size`` under ``curriculum.lowpass``: ``fourier`` crops the spectrum here
    (:func:`at_size`); ``lanczos`` batches were resized to ``size`` by the loader's workers, so one that arrives
    at another size means the size plan is out of step (ValueError), never a silent Fourier crop."""
    if operator == "fourier":
        return at_size(x, size)
    if x.shape[-1] != size or x.shape[-2] != size:
        raise ValueError(f"curriculum.lowpass lanczos: the loader delivered {tuple(x.shape[-2:])} px for a stage "
                         f"at {size} px (size plan out of step)")
    return x
