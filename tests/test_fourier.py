"""Mathematical properties of the EfficientTrain low-frequency crop (``fourier_crop``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mae_curriculum.curriculum import fourier_crop

# (source H, W) -> (target h, w): odd, even, mixed, non-square, and odd source sizes.
CASES = [
    ((24, 24), (9, 9)),
    ((24, 24), (10, 10)),
    ((24, 20), (10, 7)),
    ((21, 25), (8, 11)),
    ((16, 16), (2, 1)),
    ((15, 16), (15, 12)),
]


def _signed(n: int, source: int) -> Tensor:
    """Signed source frequencies kept by a crop to n: |k| <= n/2 (each bin once when n == source)."""
    return torch.arange(n) if n == source else torch.arange(-(n // 2), n // 2 + 1)


def _expected_spectrum(x: Tensor, h: int, w: int) -> Tensor:
    """Fourier-series coefficients the crop must have: source bins with |k|<=h/2, |l|<=w/2 folded mod (h, w)."""
    height, width = x.shape[-2:]
    spec = torch.fft.fft2(x.double(), norm="forward")
    ks, ls = _signed(h, height), _signed(w, width)
    rows = spec[..., ks % height, :]
    out_rows = torch.zeros(*spec.shape[:-2], h, width, dtype=spec.dtype).index_add_(-2, ks % h, rows)
    cols = out_rows[..., ls % width]
    return torch.zeros(*spec.shape[:-2], h, w, dtype=spec.dtype).index_add_(-1, ls % w, cols)


def _cosines(freqs: list[tuple[int, int]], grid_u: Tensor, grid_v: Tensor, size: tuple[int, int]) -> Tensor:
    """Evaluate sum_j a_j cos(2 pi (k_j u / H + l_j v / W) + phi_j) on a grid (fixed pseudo-random a, phi)."""
    gen = torch.Generator().manual_seed(7)
    height, width = size
    out = torch.zeros(grid_u.numel(), grid_v.numel(), dtype=torch.float64)
    for k, l in freqs:
        amp, phase = torch.rand(2, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 2 * math.pi])
        arg = 2 * math.pi * (k * grid_u[:, None] / height + l * grid_v[None, :] / width) + phase
        out += amp * torch.cos(arg)
    return out


def _band(h: int, w: int, closed: bool) -> list[tuple[int, int]]:
    """All frequency pairs (k, l >= 0) inside the band; ``closed`` includes the Nyquist frequencies h/2, w/2."""
    ks = [k for k in range(-h // 2 - 1, h // 2 + 2) if (abs(k) <= h / 2 if closed else abs(k) < h / 2)]
    ls = [l for l in range(0, w // 2 + 2) if (l <= w / 2 if closed else l < w / 2)]
    return [(k, l) for k in ks for l in ls]


def _zero_pad_upsample(y: Tensor, size: tuple[int, int]) -> Tensor:
    """Band-limited (trigonometric) upsampling: zero-pad the spectrum, splitting even Nyquist bins in halves."""
    spec = torch.fft.fft2(y.double(), norm="forward")
    for dim, target in ((-2, size[0]), (-1, size[1])):
        n = spec.shape[dim]
        ks = torch.arange(-(n // 2), (n + 1) // 2)
        weight = torch.ones(n, dtype=torch.float64)
        if n % 2 == 0:
            ks = torch.cat([ks, torch.tensor([n // 2])])
            weight = torch.cat([weight, torch.ones(1, dtype=torch.float64)])
            weight[0] = weight[-1] = 0.5
        src = spec.index_select(dim, ks % n) * weight.view([-1] + [1] * (-dim - 1))
        shape = list(spec.shape)
        shape[dim] = target
        spec = torch.zeros(shape, dtype=spec.dtype).index_add_(dim % spec.dim(), ks % target, src)
    return torch.fft.ifft2(spec, norm="forward").real


@pytest.mark.parametrize("src,dst", CASES)
def test_spectrum_is_scaled_central_block(src: tuple[int, int], dst: tuple[int, int]) -> None:
    """Proposition 1a, with the documented Nyquist sum for even sizes."""
    x = torch.randn(2, 3, *src, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = fourier_crop(x, dst)
    assert out.shape == (2, 3, *dst)
    got = torch.fft.fft2(out, norm="forward")
    torch.testing.assert_close(got, _expected_spectrum(x, *dst), rtol=0, atol=1e-12)


@pytest.mark.parametrize("src,dst", CASES)
def test_band_limited_image_is_sampled_exactly(src: tuple[int, int], dst: tuple[int, int]) -> None:
    """With no energy above (h/2, w/2), Nyquist included, the crop equals the image sampled on the coarse grid."""
    h, w = dst
    freqs = _band(h, w, closed=True)
    fine = _cosines(freqs, torch.arange(src[0]).double(), torch.arange(src[1]).double(), src)
    coarse_u = torch.arange(h).double() * src[0] / h
    coarse_v = torch.arange(w).double() * src[1] / w
    coarse = _cosines(freqs, coarse_u, coarse_v, src)
    torch.testing.assert_close(fourier_crop(fine, dst), coarse, rtol=0, atol=1e-10)


@pytest.mark.parametrize("src,dst", CASES)
def test_band_limited_image_survives_crop_and_upsample(src: tuple[int, int], dst: tuple[int, int]) -> None:
    """Strictly in-band frequencies, plus a zero-phase cosine at an even height's Nyquist frequency."""
    h, w = dst
    u, v = torch.arange(src[0]).double(), torch.arange(src[1]).double()
    x = _cosines(_band(h, w, closed=False), u, v, src)
    if h % 2 == 0:
        x = x + torch.cos(math.pi * h * u / src[0])[:, None]
    torch.testing.assert_close(_zero_pad_upsample(fourier_crop(x, dst), src), x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("src,dst", CASES)
def test_crop_inverts_zero_pad_upsampling(src: tuple[int, int], dst: tuple[int, int]) -> None:
    y = torch.randn(2, *dst, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(fourier_crop(_zero_pad_upsample(y, src), dst), y, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("antialias", [False, True])
def test_out_of_band_energy_changes_pixel_resize_but_not_crop(mode: str, antialias: bool) -> None:
    """Proposition 1b: the crop ignores frequencies outside the band; pixel-space resizing does not."""
    gen = torch.Generator().manual_seed(2)
    (height, width), (h, w) = (32, 28), (12, 11)
    x = torch.randn(1, 3, height, width, generator=gen, dtype=torch.float64)
    spec = torch.fft.fft2(torch.randn(1, 3, height, width, generator=gen, dtype=torch.float64))
    in_band = (_signed(h, height) % height)[:, None], (_signed(w, width) % width)[None, :]
    spec[..., in_band[0], in_band[1]] = 0
    noise = torch.fft.ifft2(spec).real
    assert noise.abs().max() > 0.5
    torch.testing.assert_close(fourier_crop(x + noise, (h, w)), fourier_crop(x, (h, w)), rtol=0, atol=1e-12)
    before = F.interpolate(x, size=(h, w), mode=mode, antialias=antialias, align_corners=False)
    after = F.interpolate(x + noise, size=(h, w), mode=mode, antialias=antialias, align_corners=False)
    assert (after - before).abs().max() > 0.05


@pytest.mark.parametrize("src,dst", CASES)
def test_channel_means_are_kept(src: tuple[int, int], dst: tuple[int, int]) -> None:
    x = torch.rand(4, 3, *src, generator=torch.Generator().manual_seed(3)) * 5 - 1
    out = fourier_crop(x, dst)
    torch.testing.assert_close(out.mean(dim=(-2, -1)), x.mean(dim=(-2, -1)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [160, 96, (112, 80)])
def test_float32_agrees_with_float64(size: int | tuple[int, int]) -> None:
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = fourier_crop(x, size)
    got = fourier_crop(x.float(), size)
    assert got.dtype == torch.float32 and ref.dtype == torch.float64
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_returns_same_dtype(dtype: torch.dtype) -> None:
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(5)).to(dtype)
    out = fourier_crop(x, 40)
    assert out.dtype == dtype and out.shape == (2, 3, 40, 40)
    ref = fourier_crop(x.float(), 40)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_full_size_returns_input_unchanged() -> None:
    x = torch.randn(2, 3, 20, 18)
    assert fourier_crop(x, (20, 18)) is x


def test_layouts_and_leading_dims_do_not_change_the_result() -> None:
    x = torch.randn(3, 4, 24, 20, generator=torch.Generator().manual_seed(6))
    ref = fourier_crop(x, (12, 10))
    channels_last = fourier_crop(x.contiguous(memory_format=torch.channels_last), (12, 10))
    torch.testing.assert_close(channels_last, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(fourier_crop(x[0, 1], (12, 10)), ref[0, 1], rtol=0, atol=1e-6)


def test_one_axis_only() -> None:
    """Cropping only the width keeps each row's column spectrum; the height axis is untouched."""
    x = torch.randn(2, 1, 12, 20, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = fourier_crop(x, (12, 7))
    torch.testing.assert_close(torch.fft.fft2(out, norm="forward"), _expected_spectrum(x, 12, 7), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "size,match",
    [((25, 10), "larger than the input"), ((10, 21), "larger than the input"), (0, ">= 1"),
     ((4, -1), ">= 1"), ((4, 4, 4), "pair of ints"), (8.0, "pair of ints"), ((4, True), "pair of ints")],
)
def test_bad_sizes_raise(size: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fourier_crop(torch.zeros(1, 3, 24, 20), size)  # type: ignore[arg-type]


@pytest.mark.parametrize("x", [torch.zeros(1, 3, 8, 8, dtype=torch.int64), torch.zeros(8), torch.zeros(1, 8, 8) * 1j])
def test_bad_inputs_raise(x: Tensor) -> None:
    with pytest.raises(ValueError, match="fourier_crop: x must"):
        fourier_crop(x, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: GPU and CPU paths are compared on a GPU machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [160, 96, (112, 75)])
def test_gpu_matches_cpu(dtype: torch.dtype, size: int | tuple[int, int]) -> None:
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(9)).to(dtype)
    cpu = fourier_crop(x, size)
    gpu = fourier_crop(x.cuda(), size)
    assert gpu.is_cuda and gpu.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((gpu.cpu().float() - cpu.float()).norm() / cpu.float().norm()).item() < tol
