"""Image validation and conversion for the shard writer.

:func:`prepare_image` turns the raw bytes of one source file into the bytes stored in a shard:

* the image is fully decoded with PIL (``img.load()``), so empty, truncated, corrupt and non-image files
  raise :class:`BadImage` with a short reason instead of reaching training;
* images whose declared size exceeds ``max_pixels`` are refused *before* decoding
  ("decompression bomb: WxH pixels exceeds limit (N)");
* every image comes out as 3-channel 8-bit RGB. Greyscale (``1``, ``L``), palette (``P``), CMYK, YCbCr and
  16/32-bit (``I;16``, ``I``, ``F``, scaled 0..65535 -> 0..255) images are converted; images with alpha
  (``RGBA``, ``LA``, ``PA``, ``P`` with transparency) are composited over white;
* an RGB JPEG / PNG / WebP that needs neither conversion nor resizing is passed through byte-exact;
* otherwise it is re-encoded: lossy sources (JPEG, MPO, WebP) as JPEG (quality 95 after a mode conversion,
  90 after a resize), lossless ones (PNG, BMP, GIF, TIFF, ...) as PNG;
* with ``max_size`` the SHORT side is bounded (Lanczos, only ever downscaling).
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own hard limit (2 x MAX_IMAGE_PIXELS)
JPEG_QUALITY_CONVERT = 95
JPEG_QUALITY_RESIZE = 90
PASS_THROUGH = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
LOSSY_FORMATS = frozenset({"JPEG", "MPO", "WEBP"})
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


class BadImage(ValueError):
    """A file that cannot go into a shard; ``str(err)`` is the reason written to the report."""


@dataclass(frozen=True)
class Prepared:
    """The bytes to store for one image, their extension and the stored image size."""

    data: bytes
    ext: str
    width: int
    height: int
    reencoded: bool


@contextmanager
def _strict_pil() -> Iterator[None]:
    """Refuse truncated files and disable PIL's own bomb check (ours runs first, with its own limit)."""
    old_pixels, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old_pixels, old_truncated


def open_verified(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode ``data``; raise :class:`BadImage` for anything that is not a sane image."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    with _strict_pil():
        try:
            img = Image.open(io.BytesIO(data))
        except Image.UnidentifiedImageError:
            raise BadImage("not an image (format not recognised)") from None
        except Exception as e:  # noqa: BLE001 - any header parse failure is a bad file
            raise BadImage(f"unreadable header: {type(e).__name__}: {e}") from None
        w, h = img.size
        if w * h > max_pixels:
            raise BadImage(f"decompression bomb: {w}x{h} pixels exceeds limit ({max_pixels})")
        if w == 0 or h == 0:
            raise BadImage(f"empty image: {w}x{h} pixels")
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage(f"decompression bomb: {e}") from None
        except Exception as e:  # noqa: BLE001 - truncated / corrupt data
            raise BadImage(f"truncated or corrupt: {type(e).__name__}: {e}") from None
    return img


def _wide_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit ``L``, reading values as 0..65535 (16-bit range)."""
    arr = np.asarray(img, dtype=np.float64)
    arr = np.clip(arr, 0, 65535) / 257.0
    return Image.fromarray(np.rint(arr).astype(np.uint8), mode="L")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)


def to_rgb(img: Image.Image) -> tuple[Image.Image, bool]:
    """Return an 8-bit RGB version of ``img`` and whether a conversion was needed."""
    if img.mode == "RGB":
        return img, False
    if img.mode in WIDE_GREY_MODES:
        img = _wide_to_l(img)
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), True
    return img.convert("RGB"), True


def bounded_size(size: tuple[int, int], max_size: int | None) -> tuple[int, int] | None:
    """New (w, h) with the short side equal to ``max_size``, or None when no resize is needed."""
    w, h = size
    if not max_size or min(w, h) <= max_size:
        return None
    if w <= h:
        return max_size, max(1, round(h * max_size / w))
    return max(1, round(w * max_size / h)), max_size


def _encode(img: Image.Image, lossy: bool, quality: int, icc: bytes | None) -> tuple[bytes, str]:
    buf = io.BytesIO()
    extra = {"icc_profile": icc} if icc else {}
    if lossy:
        img.save(buf, format="JPEG", quality=quality, **extra)
        return buf.getvalue(), "jpg"
    img.save(buf, format="PNG", **extra)
    return buf.getvalue(), "png"


def prepare_image(
    data: bytes, max_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Prepared:
    """Validate ``data`` and return the bytes to store (see the module docstring for the rules)."""
    img = open_verified(data, max_pixels)
    fmt = img.format or ""
    icc = img.info.get("icc_profile") if img.mode == "RGB" else None  # a CMYK/grey profile would be wrong
    try:
        rgb, converted = to_rgb(img)
        target = bounded_size(rgb.size, max_size)
        if target is not None:
            rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    except Exception as e:  # noqa: BLE001 - e.g. a mode PIL cannot convert
        raise BadImage(f"cannot convert {img.mode} image to RGB: {type(e).__name__}: {e}") from None
    w, h = rgb.size
    if not converted and target is None and fmt in PASS_THROUGH:
        return Prepared(data, PASS_THROUGH[fmt], w, h, reencoded=False)
    quality = JPEG_QUALITY_RESIZE if target is not None else JPEG_QUALITY_CONVERT
    out, ext = _encode(rgb, fmt in LOSSY_FORMATS, quality, icc)
    return Prepared(out, ext, w, h, reencoded=True)
