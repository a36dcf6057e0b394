"""Loader cases tests/test_loader.py does not cover: odd image formats written straight into a shard (bypassing
the writer's conversion), a shard truncated in the middle, non-image bytes under an image suffix, the crop
parameters vs torchvision's, and the main-process (``workers=0``) thread guard. Real CIFAR-10 JPEGs as content."""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae_curriculum.data.index import load_index
from test_loader import cifar_images, write_shards
from mae_curriculum.data.loader import ShardLoader, StreamSpec, steps_per_epoch
from mae_curriculum.data.transforms import AugmentConfig, SampleTransform, draw_params, seed_sample

SIZE = 32


@pytest.fixture(scope="module")
def cifar() -> list[bytes]:
    return [img for img, _ in cifar_images(64)]


def write_raw_shards(folder: Path, samples: list[tuple[str, bytes]], lengths: list[int]) -> None:
    """Shards of (suffix, bytes) samples written as-is (no conversion), with label = position % 10."""
    write_shards(folder, [(data, i % 10, ext) for i, (ext, data) in enumerate(samples)], lengths)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def odd_images(cifar: list[bytes]) -> dict[str, tuple[str, bytes]]:
    """name -> (suffix, bytes) of images in the modes a real data set throws at a loader."""
    rgb = [Image.open(io.BytesIO(d)).convert("RGB") for d in cifar[:12]]
    arr16 = (np.asarray(rgb[5].convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    rgba = rgb[3].convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    return {
        "grey_jpeg": ("jpg", encode(rgb[0].convert("L"), "JPEG", quality=90)),
        "cmyk_jpeg": ("jpg", encode(rgb[1].convert("CMYK"), "JPEG", quality=90)),
        "palette_png": ("png", encode(rgb[2].convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG")),
        "rgba_png": ("png", encode(rgba, "PNG")),
        "la_png": ("png", encode(rgb[4].convert("LA"), "PNG")),
        "gray16_png": ("png", encode(Image.fromarray(arr16), "PNG")),
        "bilevel_png": ("png", encode(rgb[6].convert("1"), "PNG")),
        "rgba_webp": ("webp", encode(rgba, "WEBP", quality=90)),
        "progressive_jpeg": ("jpg", encode(rgb[7], "JPEG", quality=90, progressive=True)),
        "rgb_png": ("png", encode(rgb[8], "PNG")),
    }


def loader_for(folder: Path, batch: int, decode: str = "cpu", workers: int = 0, size: int = SIZE) -> ShardLoader:
    spec = StreamSpec(load_index(folder), batch, 1, 0, workers, 0, 64, AugmentConfig(size=size), decode=decode)
    return ShardLoader(spec, decode_device="cpu" if decode == "gpu" else None)


def epoch(loader: ShardLoader, e: int = 0) -> list[dict]:
    loader.start_epoch(e)
    return list(loader)


# decode="gpu" with decode_device="cpu": the GPU path's code (header-only workers, batched decode in the main
# process) run on the CPU
DECODES = ["cpu", "gpu"]


@pytest.mark.parametrize("decode", DECODES)
def test_odd_formats_come_out_as_rgb_uint8(tmp_path, cifar, decode):
    odd = odd_images(cifar)
    names = list(odd)
    write_raw_shards(tmp_path / "odd", [odd[n] for n in names], [len(names)])
    batches = epoch(loader_for(tmp_path / "odd", batch=len(names), decode=decode))
    assert len(batches) == 1
    b = batches[0]
    assert b["image"].dtype == torch.uint8 and b["image"].shape == (len(names), 3, SIZE, SIZE)
    assert int(b["corrupt"].sum()) == 0, "every odd-format image must decode"
    by_name = {names[int(i)]: img for i, img in zip(b["id"], b["image"])}
    assert set(by_name) == set(names)
    for n in ("grey_jpeg", "la_png", "gray16_png", "bilevel_png"):  # grey sources: three equal channels
        img = by_name[n]
        assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2]), n
    assert by_name["gray16_png"].float().std() > 5  # 16-bit scaled down, not clipped to white / black
    for n in ("rgb_png", "progressive_jpeg", "rgba_png", "cmyk_jpeg"):
        assert by_name[n].float().std() > 5, n


def test_odd_formats_match_between_cpu_and_gpu_decode_paths(tmp_path, cifar):
    odd = odd_images(cifar)
    samples = list(odd.values()) + [("jpg", d) for d in cifar[:6]]
    write_raw_shards(tmp_path / "mix", samples, [len(samples)])
    a = epoch(loader_for(tmp_path / "mix", batch=len(samples), decode="cpu"))[0]
    b = epoch(loader_for(tmp_path / "mix", batch=len(samples), decode="gpu"))[0]
    assert torch.equal(a["id"], b["id"]) and torch.equal(a["label"], b["label"])
    diff = (a["image"].int() - b["image"].int()).abs()
    assert diff.float().mean() < 0.5 and int(diff.max()) <= 2  # same params, same libjpeg: (nearly) equal


@pytest.mark.parametrize("decode", DECODES)
def test_truncated_shard_is_skipped_with_a_warning_and_counted(tmp_path, cifar, caplog, decode):
    write_raw_shards(tmp_path / "cut", [("jpg", d) for d in cifar[:60]], [20, 20, 20])
    p = tmp_path / "cut" / "train-000001.tar"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])  # cut in the middle of a member
    loader = loader_for(tmp_path / "cut", batch=4, decode=decode)
    with caplog.at_level(logging.WARNING, logger="mae_curriculum.data.loader"):
        batches = epoch(loader)
    assert len(batches) == 15 == steps_per_epoch(60, 1, 4, 0)  # steps unchanged
    warnings = [r.getMessage() for r in caplog.records if "train-000001.tar" in r.getMessage()]
    assert warnings, "a truncated shard must be reported"
    lost = int(warnings[0].split("ended before ")[1].split(" ")[0]) if "ended before" in warnings[0] else None
    corrupt = int(sum(int(b["corrupt"].sum()) for b in batches))
    assert 0 < corrupt < 20  # the samples before the cut are still used; the rest are counted
    if lost is not None:
        assert corrupt >= lost
    ids = torch.cat([b["id"] for b in batches])
    assert ((ids < 20) | (ids >= 40)).sum() >= 40  # the intact shards are fully read


@pytest.mark.parametrize("decode", DECODES)
def test_non_image_bytes_named_jpg_are_counted_as_corrupt(tmp_path, cifar, decode):
    bad = [("jpg", b"definitely not a JPEG, just text\n" * 10), ("png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40),
           ("jpg", b"")]
    good = [("jpg", d) for d in cifar[:21]]
    samples = good[:5] + bad + good[5:]
    write_raw_shards(tmp_path / "bad", samples, [24])
    batches = epoch(loader_for(tmp_path / "bad", batch=6, decode=decode))
    assert len(batches) == 4
    assert int(sum(int(b["corrupt"].sum()) for b in batches)) == 3
    ids = set(torch.cat([b["id"] for b in batches]).tolist())
    assert not ids & {5, 6, 7}  # a replaced sample carries the id (and label) of a good one
    for b in batches:
        assert b["image"].shape == (6, 3, SIZE, SIZE) and b["image"].dtype == torch.uint8


def test_header_ok_body_missing_jpeg_is_corrupt_on_both_paths(tmp_path, cifar):
    """A JPEG whose header parses but has no scan data: the GPU path's workers only read headers, so the
    main-process decode (and its CPU fallback) must catch it."""
    d = cifar[0]
    no_scan = d[: d.find(b"\xff\xda")]
    samples = [("jpg", x) for x in cifar[1:9]] + [("jpg", no_scan)] + [("jpg", x) for x in cifar[9:16]]
    write_raw_shards(tmp_path / "ns", samples, [16])
    for decode in DECODES:
        loader = loader_for(tmp_path / "ns", batch=8, decode=decode)
        batches = epoch(loader)
        assert int(sum(int(b["corrupt"].sum()) for b in batches)) == 1, decode
        assert 8 not in set(torch.cat([b["id"] for b in batches]).tolist())
        if decode == "gpu":
            assert loader.decoder.num_corrupt == 1


def test_crop_params_are_torchvisions_and_deterministic():
    """draw_params draws exactly RandomResizedCrop.get_params + the flip from the per-sample seed."""
    from torchvision.transforms import RandomResizedCrop

    cfg = AugmentConfig(size=224)
    for k, (w, h) in enumerate([(224, 224), (500, 375), (375, 500), (64, 48), (1200, 300)]):
        seed_sample(3, 1, k)
        p = draw_params(w, h, cfg)
        seed_sample(3, 1, k)
        ref = RandomResizedCrop.get_params(Image.new("RGB", (w, h)), [0.2, 1.0], [3 / 4, 4 / 3])
        flip = random.random() < 0.5
        assert (p.top, p.left, p.height, p.width) == ref and p.flip == flip
        assert 0 <= p.top and p.top + p.height <= h and 0 <= p.left and p.left + p.width <= w
    seed_sample(0, 0, 1)
    a = draw_params(300, 200, cfg)
    seed_sample(0, 0, 1)
    assert draw_params(300, 200, cfg) == a


def test_sample_transform_is_fast_in_a_multithreaded_main_process(cifar):
    """workers=0 runs the transform in the main process: it must not pay OpenMP wake-ups per image (it did:
    6 ms instead of 0.4 ms per 224px image on 2 threads) and must leave the thread count as it was."""
    big = encode(Image.open(io.BytesIO(cifar[0])).convert("RGB").resize((224, 224), Image.BICUBIC), "JPEG")
    t = SampleTransform(AugmentConfig(size=224))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = t(big)
        assert out.shape == (3, 224, 224) and out.is_contiguous()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
