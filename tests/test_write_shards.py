"""Tests of the shard writer (mae_curriculum.data.write_shards, sources, imageio)."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mae_curriculum.data import imageio
from mae_curriculum.data.sources import tree_entries
from mae_curriculum.data.write_shards import (
    ConvertOptions,
    Sample,
    convert,
    default_split,
    main,
    write_samples,
)

CIFAR_TGZ = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpg.tar.gz"
CIFAR_PREFIX = "cifar10-jpg-yoongikim/train"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS = 20


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    chans = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], chans), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if chans == 1 else arr, mode=mode)


def write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def read_shards(out: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, in _info.json shard order, read with plain tarfile."""
    info = json.loads((out / "_info.json").read_text())
    samples: list[tuple[str, dict[str, bytes]]] = []
    for name in next(iter(info["splits"].values()))["filenames"]:
        with tarfile.open(out / name) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = tf.extractfile(m).read()
    return samples


def labels_by_path(out: Path, strip: str = "") -> dict[str, int]:
    return {json.loads(s["json"])["path"].removeprefix(strip): int(s["cls"]) for _, s in read_shards(out)}


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def run(src: Path, out: Path, *args: str) -> int:
    return main([str(src), str(out), "--no-progress", *args])


def png_with_declared_size(w: int, h: int) -> bytes:
    """A tiny PNG whose header declares w x h pixels (a decompression-bomb stand-in)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def tar_tree(path: Path, root: Path, arcprefix: str = "", extra: dict[str, bytes] | None = None) -> Path:
    """Tar (gz if the name says so) every file under ``root`` as ``arcprefix/<relpath>``, sorted."""
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tf:
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for p in sorted(root.rglob("*")):
            if p.is_file():
                tf.add(p, arcname=f"{arcprefix}/{p.relative_to(root).as_posix()}".lstrip("/"))
    return path


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first PER_CLASS train images of each CIFAR-10 class, as tmp/cifar10-jpg-yoongikim/train/<class>/."""
    if not CIFAR_TGZ.is_file():
        pytest.skip(f"real data archive not found: {CIFAR_TGZ}")
    root = tmp_path_factory.mktemp("cifar")
    counts: dict[str, int] = {}
    with tarfile.open(CIFAR_TGZ, "r|gz") as tf:
        for m in tf:
            parts = m.name.split("/")
            if m.isfile() and m.name.startswith(CIFAR_PREFIX + "/") and counts.get(parts[-2], 0) < PER_CLASS:
                counts[parts[-2]] = counts.get(parts[-2], 0) + 1
                write_file(root / m.name, tf.extractfile(m).read())
    assert sorted(counts) == CIFAR_CLASSES and set(counts.values()) == {PER_CLASS}
    return root / CIFAR_PREFIX


@pytest.fixture(scope="module")
def cifar_tgz(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    extra = {"cifar10-jpg-yoongikim/README.md": b"# readme\n"}
    return tar_tree(tmp_path_factory.mktemp("tgz") / "cifar-sub.tar.gz", cifar_dir, CIFAR_PREFIX, extra)


@pytest.fixture
def small_tree(tmp_path: Path) -> tuple[Path, dict[str, tuple[str, bytes]]]:
    """ImageFolder with 3 classes (given in non-sorted order) of RGB JPEG / PNG; returns (root, path->(cls, bytes))."""
    root, files = tmp_path / "src", {}
    for c, cls in enumerate(["b_cls", "a_cls", "c_cls"]):
        for i in range(3):
            fmt, ext = ("PNG", "png") if i == 2 else ("JPEG", "jpg")
            data = encode(noise((24, 16), seed=10 * c + i), fmt)
            files[f"{cls}/img{i}.{ext}"] = (cls, write_file(root / cls / f"img{i}.{ext}", data).read_bytes())
    return root, files


# ---------------------------------------------------------------------------------------------------------------
# library API and output format
# ---------------------------------------------------------------------------------------------------------------


def test_imagefolder_round_trip_through_webdataset(small_tree, tmp_path):
    root, files = small_tree
    out = tmp_path / "out"
    assert run(root, out, "--samples-per-shard", "4") == 0
    info = json.loads((out / "_info.json").read_text())
    split = info["splits"]["train"]
    assert split["filenames"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert split["shard_lengths"] == [4, 4, 1] and split["num_samples"] == 9
    assert info["classes"] == ["a_cls", "b_cls", "c_cls"] and info["num_classes"] == 3
    assert json.loads((out / "class_index.json").read_text()) == info["classes"]
    for name, n in zip(split["filenames"], split["shard_lengths"]):  # member order: image, cls, json
        with tarfile.open(out / name) as tf:
            exts = [m.name.split(".", 1)[1] for m in tf.getmembers()]
        assert len(exts) == 3 * n and exts[1::3] == ["cls"] * n and exts[2::3] == ["json"] * n
    urls = [str(out / f) for f in split["filenames"]]
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in got] == [f"train_{i:08d}" for i in range(9)]
    for s in got:
        meta = json.loads(s["json"])
        cls, data = files[meta["path"]]
        ext = "png" if meta["path"].endswith("png") else "jpg"
        assert s[ext] == data  # RGB JPEG / PNG pass through byte-exact
        assert int(s["cls"]) == info["classes"].index(cls) and meta["class"] == cls
    assert json.loads((out / "_report.json").read_text())["skipped"] == []


def test_info_json_is_parsed_by_timm(small_tree, tmp_path):
    reader_wds = pytest.importorskip("timm.data.readers.reader_wds")
    root, _ = small_tree
    assert run(root, tmp_path / "out", "--samples-per-shard", "5", "--split", "val") == 0
    info = reader_wds._load_info(str(tmp_path / "out"))
    split = reader_wds._parse_split_info("val", info)
    assert split.num_samples == 9 and split.shard_lengths == (5, 4) and split.name == "val"
    assert split.filenames == ("val-000000.tar", "val-000001.tar")


def test_crash_mid_write_leaves_no_partial_shard(tmp_path):
    def samples():
        for i in range(7):
            yield Sample(f"k{i}", encode(noise((8, 8), i), "PNG"), "png", i % 2)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_samples(samples(), tmp_path, "train", samples_per_shard=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar", "train-000001.tar"]
    for p in tmp_path.iterdir():  # the shards that exist are complete
        with tarfile.open(p) as tf:
            assert len(tf.getnames()) == 3 * 2


def test_write_samples_checks_keys_and_removes_stale_shards(tmp_path):
    img = encode(noise((8, 8), 0), "PNG")
    with pytest.raises(ValueError, match="invalid sample key"):
        write_samples([Sample("a.b", img, "png", 0)], tmp_path, "train")
    with pytest.raises(ValueError, match="duplicate"):
        write_samples([Sample("a", img, "png", 0), Sample("a", img, "png", 1)], tmp_path, "train")
    with pytest.raises(ValueError, match="extension"):
        write_samples([Sample("a", img, "jpeg", 0)], tmp_path, "train")
    five = [Sample(f"s{i}", img, "png", i % 2, {"class": ["x", "y"][i % 2]}) for i in range(5)]
    assert len(write_samples(five, tmp_path, "train", 2)["splits"]["train"]["filenames"]) == 3
    info = write_samples(five[:2], tmp_path, "train", 2)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar"]
    assert info["classes"] == ["x", "y"]  # names taken from meta["class"] when none are given


# ---------------------------------------------------------------------------------------------------------------
# real data: CIFAR-10 through the folder, .tar.gz and plain .tar paths
# ---------------------------------------------------------------------------------------------------------------


def test_cifar_folder_and_tar_paths_agree(cifar_dir, cifar_tgz, tmp_path):
    out_dir, out_tgz, out_auto, out_tar = (tmp_path / n for n in ("dir", "tgz", "auto", "tar"))
    assert run(cifar_dir, out_dir, "--samples-per-shard", "64") == 0
    assert run(cifar_tgz, out_tgz, "--samples-per-shard", "64", "--tar-subdir", CIFAR_PREFIX) == 0
    assert run(cifar_tgz, out_auto, "--samples-per-shard", "64") == 0  # the class level is found alone
    plain = tar_tree(tmp_path / "cifar-sub.tar", cifar_dir, CIFAR_PREFIX)
    assert run(plain, out_tar, "--samples-per-shard", "64") == 0  # random access by offset
    by_dir = labels_by_path(out_dir)
    assert len(by_dir) == 10 * PER_CLASS
    assert all(label == CIFAR_CLASSES.index(p.split("/")[0]) for p, label in by_dir.items())
    assert labels_by_path(out_tgz, CIFAR_PREFIX + "/") == by_dir
    assert shard_bytes(out_auto) == shard_bytes(out_tgz) == shard_bytes(out_tar)
    info = json.loads((out_tgz / "_info.json").read_text())
    assert info["classes"] == CIFAR_CLASSES and info["splits"]["train"]["shard_lengths"] == [64, 64, 64, 8]
    dir_images = sorted(s["jpg"] for _, s in read_shards(out_dir))
    assert sorted(s["jpg"] for _, s in read_shards(out_tgz)) == dir_images  # JPEGs passed through unchanged


def test_tar_with_split_folders_asks_for_tar_subdir(tmp_path, capsys):
    for split in ("train", "test"):
        write_file(tmp_path / "t" / "ds" / split / "cat" / "0.png", encode(noise((8, 8), 1), "PNG"))
    archive = tar_tree(tmp_path / "ds.tar", tmp_path / "t")
    assert run(archive, tmp_path / "out") == 1
    assert "--tar-subdir ds/test" in capsys.readouterr().err
    assert run(archive, tmp_path / "out", "--tar-subdir", "ds/train") == 0
    assert json.loads((tmp_path / "out" / "_info.json").read_text())["classes"] == ["cat"]


def test_workers_give_identical_shards(cifar_dir, tmp_path):
    args = ("--samples-per-shard", "64", "--shuffle", "--seed", "3")
    assert run(cifar_dir, tmp_path / "w1", *args, "--workers", "1") == 0
    assert run(cifar_dir, tmp_path / "w2", *args, "--workers", "2") == 0
    one = shard_bytes(tmp_path / "w1")
    assert len(one) == 4 and one == shard_bytes(tmp_path / "w2")


def test_shuffle_is_seeded(cifar_dir, tmp_path):
    outs = {}
    for name, extra in {"a": ["--seed", "1"], "b": ["--seed", "1"], "c": ["--seed", "2"]}.items():
        assert run(cifar_dir, tmp_path / name, "--shuffle", *extra) == 0
        outs[name] = [json.loads(s["json"])["path"] for _, s in read_shards(tmp_path / name)]
    assert run(cifar_dir, tmp_path / "plain") == 0
    plain = [json.loads(s["json"])["path"] for _, s in read_shards(tmp_path / "plain")]
    assert outs["a"] == outs["b"] and outs["a"] != outs["c"] and outs["a"] != plain
    assert sorted(outs["a"]) == sorted(outs["c"]) == sorted(plain)
    assert labels_by_path(tmp_path / "a") == labels_by_path(tmp_path / "plain")


# ---------------------------------------------------------------------------------------------------------------
# ImageNet layouts
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outer_name", ["train.tar", "train.tar.gz"])
def test_imagenet_train_tar_of_tars(tmp_path, outer_name):
    inner_dir = tmp_path / "inner"
    synsets = ["n03000000", "n01000000", "n02000000"]  # archive order is not sorted
    for k, syn in enumerate(synsets):
        for i in range(2):
            write_file(inner_dir / syn / f"{syn}_{i}.JPEG", encode(noise((20, 20), 10 * k + i), "JPEG"))
        write_file(inner_dir / syn / "notes.txt", b"not an image")
        tar_tree(tmp_path / f"{syn}.tar", inner_dir / syn)
    with tarfile.open(tmp_path / outer_name, "w:gz" if outer_name.endswith("gz") else "w") as tf:
        for syn in synsets:
            tf.add(tmp_path / f"{syn}.tar", arcname=f"{syn}.tar")
        info = tarfile.TarInfo("n04000000.tar")
        info.size = 1024
        tf.addfile(info, io.BytesIO(b"\x07" * 1024))  # a corrupt class tar
    out = tmp_path / "out"
    assert run(tmp_path / outer_name, out, "--samples-per-shard", "4") == 0
    info = json.loads((out / "_info.json").read_text())
    assert info["classes"] == sorted(synsets) and info["splits"]["train"]["shard_lengths"] == [4, 2]
    labels = labels_by_path(out)
    assert labels == {f"{s}.tar/{s}_{i}.JPEG": sorted(synsets).index(s) for s in synsets for i in range(2)}
    assert list(labels)[:2] == ["n03000000.tar/n03000000_0.JPEG", "n03000000.tar/n03000000_1.JPEG"]
    report = json.loads((out / "_report.json").read_text())
    assert report["format"] == "imagenet-train-tar"
    assert [s["path"] for s in report["skipped"]] == ["n04000000.tar"]
    assert "unreadable inner tar" in report["skipped"][0]["reason"]


VAL_FILES = ["ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000003.JPEG"]
VAL_SYNSETS = {"ILSVRC2012_val_00000001.JPEG": "c_cls", "ILSVRC2012_val_00000002.JPEG": "a_cls",
               "ILSVRC2012_val_00000003.JPEG": "a_cls"}
VAL_LABELS = {
    "synset": "ImageId,PredictionString\n" + "".join(f"{Path(f).stem},{s} 1 2 3 4\n" for f, s in VAL_SYNSETS.items()),
    "index": "".join(f"{f} {['a_cls', 'b_cls', 'c_cls'].index(s)}\n" for f, s in VAL_SYNSETS.items()),
    "plain_list": "3\n1\n1\n",  # 1-based, in sorted filename order
}


@pytest.mark.parametrize("form", sorted(VAL_LABELS))
def test_imagenet_val_layout_reuses_train_class_index(small_tree, tmp_path, capsys, form):
    root, _ = small_tree
    assert run(root, tmp_path / "train") == 0
    val, unlabelled = tmp_path / "val", "ILSVRC2012_val_00000004.JPEG"
    for k, name in enumerate(VAL_FILES + [unlabelled]):
        write_file(val / name, encode(noise((16, 16), k), "JPEG"))
    labels = write_file(tmp_path / "labels.txt", VAL_LABELS[form].encode())
    args = ("--val-labels", str(labels), "--class-index", str(tmp_path / "train" / "class_index.json"))
    expected_skips = [{"path": unlabelled, "reason": "no label in labels.txt"}]
    if form == "plain_list":  # a per-line list must cover every image
        assert run(val, tmp_path / "out", *args) == 1
        assert "3 labels for 4 images" in capsys.readouterr().err
        (val / unlabelled).unlink()
        expected_skips = []
    assert run(val, tmp_path / "out", *args) == 0
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert "val" in info["splits"] and info["classes"] == ["a_cls", "b_cls", "c_cls"]
    assert labels_by_path(tmp_path / "out") == {f: info["classes"].index(s) for f, s in VAL_SYNSETS.items()}
    assert json.loads((tmp_path / "out" / "_report.json").read_text())["skipped"] == expected_skips


def test_val_class_missing_from_index_is_an_error(small_tree, tmp_path, capsys):
    root, _ = small_tree
    assert run(root, tmp_path / "train") == 0
    write_file(tmp_path / "val" / "x.JPEG", encode(noise((16, 16), 0), "JPEG"))
    labels = write_file(tmp_path / "labels.txt", b"x.JPEG n09999999\n")
    index = str(tmp_path / "train" / "class_index.json")
    assert run(tmp_path / "val", tmp_path / "out", "--val-labels", str(labels), "--class-index", index) == 1
    assert "'n09999999'" in capsys.readouterr().err


def test_flat_folder_without_labels_is_an_error(tmp_path, capsys):
    write_file(tmp_path / "val" / "x.JPEG", encode(noise((16, 16), 0), "JPEG"))
    assert run(tmp_path / "val", tmp_path / "out") == 1
    assert "--val-labels" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# bad and odd images
# ---------------------------------------------------------------------------------------------------------------


def test_bad_files_are_reported_and_skipped(tmp_path, capsys):
    src, good = tmp_path / "src", encode(noise((32, 32), 0), "JPEG")
    write_file(src / "a" / "good.jpg", good)
    write_file(src / "a" / "empty.jpg", b"")
    write_file(src / "a" / "truncated.jpg", good[: len(good) // 2])
    write_file(src / "b" / "text.jpg", b"hello, I am a text file\n" * 10)
    write_file(src / "b" / "bomb.png", png_with_declared_size(30000, 30000))
    write_file(src / "b" / "small.png", encode(noise((64, 64), 1), "PNG"))
    write_file(src / "b" / "notes.txt", b"ignored")
    write_file(src / "stray.jpg", good)
    assert run(src, tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "_report.json").read_text())
    reasons = {s["path"]: s["reason"] for s in report["skipped"]}
    assert reasons.keys() == {"a/empty.jpg", "a/truncated.jpg", "b/text.jpg", "b/bomb.png", "stray.jpg"}
    assert "empty" in reasons["a/empty.jpg"] and "truncated" in reasons["a/truncated.jpg"]
    assert "not an image" in reasons["b/text.jpg"] and "class folder" in reasons["stray.jpg"]
    limit = imageio.DEFAULT_MAX_PIXELS
    assert reasons["b/bomb.png"] == f"decompression bomb: 30000x30000 pixels exceeds limit ({limit})"
    assert report["num_written"] == 2 and report["ignored_non_images"] == 1
    assert "skipped 5 files" in capsys.readouterr().err
    assert run(src, tmp_path / "out2", "--max-pixels", "2000") == 0  # a lower limit catches a real 64x64 PNG
    report = json.loads((tmp_path / "out2" / "_report.json").read_text())
    reasons = {s["path"]: s["reason"] for s in report["skipped"]}
    assert reasons["b/small.png"] == "decompression bomb: 64x64 pixels exceeds limit (2000)"
    assert "a/good.jpg" not in reasons and report["num_written"] == 1


def _i16_png() -> bytes:
    arr = np.array([[0, 257 * 128, 65535, 65535]], dtype=np.uint16).repeat(4, axis=0)
    data = encode(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")  # really a 16-bit source
    return data


def _p_png() -> bytes:
    img = noise((16, 16), 3).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    return encode(img, "PNG", transparency=0)


ODD = {  # name: (bytes, expected stored extension)
    "grey.jpg": (lambda: encode(noise((16, 16), 1, "L"), "JPEG"), "jpg"),
    "palette.png": (_p_png, "png"),
    "cmyk.jpg": (lambda: encode(noise((16, 16), 2, "CMYK"), "JPEG"), "jpg"),
    "rgba.png": (lambda: encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG"), "png"),
    "grey16.png": (_i16_png, "png"),
    "la.png": (lambda: encode(noise((16, 16), 4, "L").convert("LA"), "PNG"), "png"),
    "rgb.bmp": (lambda: encode(noise((16, 16), 5), "BMP"), "png"),
}


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_modes_come_out_rgb(name):
    make, ext = ODD[name]
    prep = imageio.prepare_image(make())
    img = Image.open(io.BytesIO(prep.data))
    img.load()
    assert img.mode == "RGB" and prep.ext == ext and prep.reencoded
    assert img.format == {"jpg": "JPEG", "png": "PNG"}[ext]
    if name == "rgba.png":  # fully transparent -> composited over white, not black
        assert img.getpixel((0, 0)) == (255, 255, 255)
    if name == "grey16.png":  # 16-bit values scaled to 8 bits, not clipped
        assert [img.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_rgb_jpeg_passes_through_and_max_size_bounds_short_side():
    small = encode(noise((16, 16), 0), "JPEG")
    assert imageio.prepare_image(small, max_size=32).data == small  # not larger: byte-exact
    wide = imageio.prepare_image(encode(noise((80, 40), 1), "JPEG"), max_size=20)
    assert (wide.width, wide.height, wide.ext) == (40, 20, "jpg")
    assert Image.open(io.BytesIO(wide.data)).size == (40, 20)
    tall = imageio.prepare_image(encode(noise((60, 90), 2), "PNG"), max_size=20)
    assert Image.open(io.BytesIO(tall.data)).size == (20, 30) and tall.ext == "png"


def test_max_size_option_in_shards(small_tree, tmp_path):
    root, _ = small_tree
    assert run(root, tmp_path / "out", "--max-size", "8") == 0
    for _, s in read_shards(tmp_path / "out"):
        data = s.get("jpg") or s["png"]
        assert min(Image.open(io.BytesIO(data)).size) == 8
        assert json.loads(s["json"])["size"] == [12, 8]


# ---------------------------------------------------------------------------------------------------------------
# layout helpers and CLI
# ---------------------------------------------------------------------------------------------------------------


def test_tree_entries_accepts_one_extra_level():
    files = [("c1/a.jpg", -1, -1), ("c1/sub/b.png", -1, -1), ("c2/x/y/z.jpg", -1, -1), ("c2/ok.JPEG", -1, -1),
             ("c2/.hidden.jpg", -1, -1), ("c2/readme.md", -1, -1)]
    entries, skipped, ignored = tree_entries(files, None, auto_descend=False, where="t")
    assert [(e.path, e.class_name) for e in entries] == [("c1/a.jpg", "c1"), ("c1/sub/b.png", "c1"),
                                                         ("c2/ok.JPEG", "c2")]
    assert [s["path"] for s in skipped] == ["c2/x/y/z.jpg"] and ignored == 2


def test_default_split_names():
    assert default_split(Path("/d/ILSVRC2012_img_train.tar"), None, "imagenet-train-tar") == "train"
    assert default_split(Path("/d/x.tar.gz"), "imagenette2-224/val", "tar") == "val"
    assert default_split(Path("/d/ILSVRC2012_img_val"), None, "imagenet-val") == "val"
    assert default_split(Path("/d/cifar10.tar.gz"), None, "tar") == "train"


def test_convert_options_match_cli(small_tree, tmp_path):
    root, _ = small_tree
    report = convert(root, tmp_path / "lib", ConvertOptions(samples_per_shard=4))
    assert report["num_written"] == 9 and report["num_shards"] == 3
    cmd = [sys.executable, "-m", "mae_curriculum.data.write_shards", str(root), str(tmp_path / "cli"),
           "--samples-per-shard", "4", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert shard_bytes(tmp_path / "cli") == shard_bytes(tmp_path / "lib")
