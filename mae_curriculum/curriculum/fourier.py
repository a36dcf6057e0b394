"""Low-frequency cropping in the Fourier domain (EfficientTrain, Proposition 1).

``fourier_crop`` keeps only the lowest ``h x w`` frequencies of a batch of images and returns them as a
smaller real image: ``X_c = F^-1(C(F(x)))``, where ``C`` takes the central block of the centred spectrum.

Conventions (both axes are treated independently and identically):

* Coefficients are Fourier-series coefficients (forward transform divided by ``H*W``), so the scale factor
  ``(h*w)/(H*W)`` of the paper is built in and every channel keeps its mean (DC) exactly.
* Odd target size ``h``: the output keeps the source frequencies ``-(h-1)/2 .. (h-1)/2``: exactly the
  central block, with no ambiguity.
* Even target size ``h`` (smaller than ``H``): the output keeps ``-(h/2-1) .. h/2-1`` unchanged, and its
  Nyquist bin ``h/2`` receives the SUM of the source bins ``+h/2`` and ``-h/2`` (the two frequencies that
  alias onto it on the coarse grid). This is ``scipy.signal.resample``'s convention; the result is exactly
  real, it is the left inverse of zero-pad upsampling that splits a Nyquist bin in two halves, and for any
  image with no energy above ``h/2`` the crop equals its trigonometric interpolant sampled on the coarse
  grid. (The official EfficientTrain v1 code keeps only the ``-h/2`` bin and takes the real part, which
  amounts to the AVERAGE of the two bins; the two differ only on the Nyquist row/column. EfficientTrain++'s
  code uses no spectrum: a PIL Lanczos resize in the loader; docs/recipe_etpp.md compares the three.)

Together: output bin ``(k mod h, l mod w)`` = sum of source coefficients at signed frequencies ``(k, l)``
with ``|k| <= h/2`` and ``|l| <= w/2``. An axis whose size is unchanged is left untouched.

The work is one real FFT along the width of the full batch, one complex FFT along the height of the already
cropped columns, and the two inverse transforms on the small spectrum, all batched, with no host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fourier_crop"]


def _target_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """Normalise ``size`` to ``(h, w)``; raise ``ValueError`` for anything but one or two positive ints."""
    pair = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in pair):
        raise ValueError(f"fourier_crop: size must be an int or a pair of ints, got {size!r}")
    if min(pair) < 1:
        raise ValueError(f"fourier_crop: size must be >= 1, got {size!r}")
    return pair[0], pair[1]


def _crop_axis(spec: Tensor, target: int, dim: int) -> Tensor:
    """Crop a full (two-sided, unshifted) spectrum along ``dim`` to ``target`` bins.

    Keeps signed frequencies ``|k| <= target/2``; for an even target the ``+target/2`` and ``-target/2``
    source bins are summed into the target's Nyquist bin.
    """
    source = spec.shape[dim]
    half = target // 2
    if target % 2:
        low = spec.narrow(dim, 0, half + 1)
        high = spec.narrow(dim, source - half, half)
        return torch.cat([low, high], dim=dim)
    low = spec.narrow(dim, 0, half)
    nyquist = spec.narrow(dim, half, 1) + spec.narrow(dim, source - half, 1)
    high = spec.narrow(dim, source - half + 1, half - 1)
    return torch.cat([low, nyquist, high], dim=dim)


def _crop_half_axis(spec: Tensor, target: int) -> Tensor:
    """Crop the last (one-sided, ``rfft``) axis of a real image's spectrum to ``target`` output pixels.

    Keeps bins ``0 .. target//2``. For an even target, the Nyquist bin becomes ``X[+t/2] + X[-t/2]``; for a
    real row ``X[-t/2] = conj(X[+t/2])``, so the sum is ``2 * Re(X[+t/2])``.
    """
    half = target // 2
    if target % 2:
        return spec[..., : half + 1]
    nyquist = 2.0 * spec[..., half : half + 1].real
    return torch.cat([spec[..., :half], nyquist.to(spec.dtype)], dim=-1)


def fourier_crop(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Return the low-frequency ``h x w`` version of ``x`` (EfficientTrain's Fourier-domain crop).

    Args:
        x: real floating tensor ``(..., H, W)``, usually a batch ``(N, C, H, W)``; any device and dtype.
        size: target ``h`` (square) or ``(h, w)``, with ``1 <= h <= H`` and ``1 <= w <= W``.

    Returns:
        Tensor ``(..., h, w)`` in ``x``'s dtype whose spectrum is exactly the central ``h x w`` block of
        ``x``'s spectrum scaled by ``(h*w)/(H*W)`` (per-channel means are kept). For even sizes the Nyquist
        row/column holds the sum of the ``+`` and ``-`` Nyquist source bins (see the module docstring).
        Computed in float32 (float64 for float64 input), since half-precision cuFFT only accepts
        power-of-two sizes. ``x`` itself is returned when ``(h, w) == (H, W)``.

    Raises:
        ValueError: for a non-floating or complex ``x``, fewer than 2 dims, or a size outside ``[1, H] x [1, W]``.
    """
    if not torch.is_floating_point(x):
        raise ValueError(f"fourier_crop: x must be a real floating tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"fourier_crop: x must have at least 2 dims (..., H, W), got shape {tuple(x.shape)}")
    h, w = _target_size(size)
    height, width = x.shape[-2], x.shape[-1]
    if h > height or w > width:
        raise ValueError(f"fourier_crop: size {(h, w)} is larger than the input {(height, width)}")
    if (h, w) == (height, width):
        return x
    work = x if x.dtype == torch.float64 else x.float()
    spec = torch.fft.rfft(work, dim=-1, norm="forward")
    if w < width:
        spec = _crop_half_axis(spec, w)
    if h < height:
        spec = torch.fft.fft(spec, dim=-2, norm="forward")
        spec = _crop_axis(spec, h, dim=-2)
        spec = torch.fft.ifft(spec, dim=-2, norm="forward")
    out = torch.fft.irfft(spec, n=w, dim=-1, norm="forward")
    return out.to(x.dtype)
