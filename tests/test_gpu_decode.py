"""The GPU decode path (mae_curriculum.data.gpu_decode). CI has no GPU: the same code runs with device='cpu'
(torchvision.io.decode_jpeg on the CPU) and is compared with the CPU path (SampleTransform) and with a pure
PIL reference; the CUDA comparison runs only where a GPU is present."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA
from mae_curriculum.data import gpu_decode
from mae_curriculum.data.gpu_decode import BatchDecoder, collate_encoded, decode_crops, encode_sample
from mae_curriculum.data.index import load_index
from mae_curriculum.data.loader import ShardLoader, StreamSpec
from mae_curriculum.data.transforms import AugmentConfig, CropParams, SampleTransform, seed_sample
from mae_curriculum.data.write_shards import Sample, write_samples

IMAGENETTE = SHARED_DATA / "imagenette2-224.tar.gz"
needs_imagenette = pytest.mark.skipif(not IMAGENETTE.is_file(), reason="Imagenette archive not present")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: GPU decode is compared with the CPU path on a GPU machine")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Image-sized comparisons on 2 OpenMP threads of a busy 2-core machine cost ms each: use one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _encode(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    """The first 24 Imagenette train JPEGs (224x224, real photos), one of them as greyscale, and two larger
    JPEGs (the CPU path decodes those at reduced size when the crop allows)."""
    out = []
    with tarfile.open(IMAGENETTE, "r|gz") as tf:
        for m in tf:
            if m.isfile() and "/train/" in m.name and m.name.endswith(".JPEG"):
                out.append(tf.extractfile(m).read())
                if len(out) == 24:
                    break
    rgb = Image.open(io.BytesIO(out[1])).convert("RGB")
    out.append(_encode(rgb.convert("L"), quality=90))
    out.append(_encode(rgb.resize((640, 480), Image.BICUBIC), quality=90))
    out.append(_encode(rgb.resize((300, 520), Image.BICUBIC), quality=90, subsampling=0))
    return out


def _params_and_cpu(jpegs: list[bytes], cfg: AugmentConfig) -> tuple[list[CropParams], list[torch.Tensor]]:
    """Per image: the params the GPU path's worker ships and the CPU path's output, both from the same seed."""
    t = SampleTransform(cfg)
    params, cpu = [], []
    for k, d in enumerate(jpegs):
        seed_sample(0, 4, k)
        enc = encode_sample(d, t)
        assert "jpeg" in enc and enc["jpeg"] is d
        params.append(enc["params"])
        seed_sample(0, 4, k)
        cpu.append(t(d))
    return params, cpu


def _pil_reference(data: bytes, p: CropParams, size: int) -> torch.Tensor:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    im = im.resize((size, size), Image.BICUBIC, box=(p.left, p.top, p.left + p.width, p.top + p.height))
    if p.flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def _tensors(jpegs: list[bytes]) -> list[torch.Tensor]:
    return [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpegs]


@needs_imagenette
def test_crop_params_path_on_cpu_matches_the_cpu_path_and_pil(jpegs):
    size = 224
    params, cpu = _params_and_cpu(jpegs, AugmentConfig(size=size))
    out, failed = decode_crops(_tensors(jpegs), params, size, device="cpu")
    assert failed == [] and out.dtype == torch.uint8 and out.shape == (len(jpegs), 3, size, size)
    n224 = 25  # the 224x224 ones (incl. the greyscale one): same decoder, same resize -> equal
    for k in range(len(jpegs)):
        diff = (out[k].int() - cpu[k].int()).abs().float()
        if k < n224:
            assert diff.max() <= 1, k
        else:  # the CPU path may have decoded these at 1/2 scale (JPEG DCT scaling): close, not equal
            assert diff.mean() < 3.0, (k, float(diff.mean()))
    # against plain PIL (decode, Image.resize(box=...), flip): PIL's filter also reads pixels just outside
    # the box, ours clamps at its edge -> the borders differ, the interior within 2-3 grey levels
    for k in range(n224):
        ref = _pil_reference(jpegs[k], params[k], size)
        diff = (out[k].int() - ref.int()).abs()
        assert diff.float().mean() < 0.5, k
        assert int(diff[:, 8:-8, 8:-8].max()) <= 3, k
    assert torch.equal(out[24][0], out[24][1]) and torch.equal(out[24][1], out[24][2])  # greyscale -> 3 equal


@needs_imagenette
def test_eval_crop_and_other_sizes(jpegs):
    # sizes >= 112: a 224x224 JPEG is never decoded at reduced size on the CPU path (crop <= 2 x size)
    for cfg in (AugmentConfig(size=224, train=False), AugmentConfig(size=160), AugmentConfig(size=112)):
        params, cpu = _params_and_cpu(jpegs[:6], cfg)
        out, failed = decode_crops(_tensors(jpegs[:6]), params, cfg.size, device="cpu")
        assert failed == []
        assert max(int((o.int() - c.int()).abs().max()) for o, c in zip(out, cpu)) <= 1


@pytest.fixture(scope="module")
def cifar_jpegs() -> list[bytes]:
    """The first 96 training JPEGs (32x32) of the real CIFAR-10 archive."""
    out = []
    with tarfile.open(SHARED_DATA / "cifar10-jpg.tar.gz", "r:gz") as tf:
        for m in tf:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 4 and parts[1] == "train" and parts[3].endswith(".jpg"):
                out.append(tf.extractfile(m).read())
                if len(out) == 96:
                    break
    return out


def test_worker_side_ships_jpegs_and_decodes_the_rest(cifar_jpegs):
    d = cifar_jpegs[0]
    t = SampleTransform(AugmentConfig(size=32))
    seed_sample(0, 0, 0)
    enc = encode_sample(d, t)
    assert set(enc) == {"jpeg", "params"} and isinstance(enc["params"], CropParams)
    png = io.BytesIO()
    Image.open(io.BytesIO(d)).save(png, "PNG")
    assert set(encode_sample(png.getvalue(), t)) == {"image"}  # not a JPEG: decoded in the worker
    ra = SampleTransform(AugmentConfig(size=32, randaug_magnitude=5))
    assert set(encode_sample(d, ra)) == {"image"}  # RandAugment (PIL ops): decoded in the worker
    with pytest.raises(Exception):
        encode_sample(b"not an image", t)
    batch = collate_encoded([{**enc, "label": 3, "id": 7, "corrupt": 0},
                             {"image": torch.zeros(3, 32, 32, dtype=torch.uint8), "label": 1, "id": 2, "corrupt": 1}],
                            size=32)
    assert batch["jpeg"].numel() == len(d) and batch["jpeg_index"].tolist() == [0]
    assert batch["cpu_index"].tolist() == [1] and batch["params"].shape == (1, 5)
    out = BatchDecoder(32, device="cpu")(batch)
    assert out["image"].shape == (2, 3, 32, 32) and out["id"].tolist() == [7, 2] and out["corrupt"].tolist() == [0, 1]


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory, cifar_jpegs):
    root = tmp_path_factory.mktemp("gpu_decode_cifar")
    samples = [Sample(f"train_{k:04d}", d, "jpg", k % 10) for k, d in enumerate(cifar_jpegs)]
    write_samples(samples, root, "train", samples_per_shard=40)
    return root


def _run(folder, decode, start=0, workers=2, device="cpu"):
    spec = StreamSpec(load_index(folder), 8, 1, 0, workers, 0, 32, AugmentConfig(size=32), decode=decode)
    loader = ShardLoader(spec, decode_device=device if decode == "gpu" else None)
    loader.start_epoch(2, start)
    return list(loader)


def test_loader_gpu_path_on_cpu_equals_cpu_path_and_resumes(cifar_folder):
    full_cpu = _run(cifar_folder, "cpu")
    full_gpu = _run(cifar_folder, "gpu")
    assert len(full_cpu) == len(full_gpu) == 12  # 96 // 8, a multiple of 2 workers
    for a, b in zip(full_cpu, full_gpu):
        assert torch.equal(a["id"], b["id"]) and torch.equal(a["label"], b["label"])
        assert int((a["image"].int() - b["image"].int()).abs().max()) <= 1
    rest = _run(cifar_folder, "gpu", start=5)
    assert len(rest) == len(full_gpu) - 5
    for a, b in zip(full_gpu[5:], rest):
        assert torch.equal(a["id"], b["id"]) and torch.equal(a["image"], b["image"])


def test_device_failure_falls_back_to_the_cpu_decode(cifar_folder, monkeypatch):
    ref = _run(cifar_folder, "gpu", workers=0)
    real = gpu_decode._decode_all

    def flaky(datas, device):  # the device "fails" on the first JPEG of every batch
        out = real(datas, device)
        return [None] + out[1:]

    monkeypatch.setattr(gpu_decode, "_decode_all", flaky)
    spec = StreamSpec(load_index(cifar_folder), 8, 1, 0, 0, 0, 32, AugmentConfig(size=32), decode="gpu")
    loader = ShardLoader(spec, decode_device="cpu")
    loader.start_epoch(2)
    got = list(loader)
    assert loader.decoder.num_fallback == len(got) and loader.decoder.num_corrupt == 0
    for a, b in zip(ref, got):
        assert torch.equal(a["id"], b["id"]) and int((a["image"].int() - b["image"].int()).abs().max()) <= 1
        assert int(b["corrupt"].sum()) == 0


def test_bad_decode_option_and_missing_cuda_are_clear(cifar_folder):
    spec = StreamSpec(load_index(cifar_folder), 8, 1, 0, 0, 0, 32, AugmentConfig(size=32), decode="tpu")
    with pytest.raises(ValueError, match="data.decode must be one of"):
        ShardLoader(spec)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            BatchDecoder(32)


@needs_cuda
@needs_imagenette
def test_cuda_decode_matches_the_cpu_path(jpegs):
    size = 224
    params, cpu = _params_and_cpu(jpegs, AugmentConfig(size=size))
    out, failed = decode_crops(_tensors(jpegs), params, size, device="cuda")
    assert failed == [] and out.is_cuda and out.dtype == torch.uint8 and out.shape == (len(jpegs), 3, size, size)
    out = out.cpu()
    for k in range(len(jpegs)):
        diff = (out[k].int() - cpu[k].int()).abs().float()
        # nvJPEG's IDCT / chroma upsampling and the float bicubic differ slightly from libjpeg-turbo + the
        # fixed-point kernel: a few grey levels on average
        assert diff.mean() < 3.0, (k, float(diff.mean()))
        assert (diff > 24).float().mean() < 0.01, k


@needs_cuda
def test_cuda_loader_returns_device_batches(cifar_folder):
    ref = _run(cifar_folder, "cpu")
    got = _run(cifar_folder, "gpu", device=None)  # default: the current CUDA device
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert b["image"].is_cuda and b["image"].dtype == torch.uint8
        assert torch.equal(a["id"], b["id"]) and torch.equal(a["label"], b["label"])
        assert (a["image"].float() - b["image"].cpu().float()).abs().mean() < 3.0
