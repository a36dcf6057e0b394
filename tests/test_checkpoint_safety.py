"""Checkpoints from elsewhere (a shared output folder, a copied or downloaded run) are never trusted.

A planted pickle in a checkpoint never runs, whether the manifest in ``complete.json`` is stale, forged to
match, or absent (a checkpoint from before manifests); a modified, missing or extra file is refused by the
manifest. Each refusal is one ``error:`` line and exit 2. Our own checkpoints (ZeRO 0, 1, 2) still resume;
bit-exact resumption is proved by tests/test_faults.py (kill -9 tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from conftest import pretrain_cmd, read_json, run

from mae_curriculum.engine import checkpoint as ckpt

TAG = "step000000004"
FIRST = ["train.max_steps=4", "checkpoint.every_steps=4"]
RESUME = ["train.max_steps=8", "checkpoint.every_steps=4"]
MODEL_FILE = "mp_rank_00_model_states.pt"


class Payload:
    """Unpickling this runs ``touch <marker>``, as an attacker's file would run anything."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def plant(file: Path, marker: Path, fmt: str = "torch") -> None:
    payload = {"module": Payload(marker), "dp_world_size": 1, "optimizer_state_dict": Payload(marker)}
    if fmt == "torch":
        torch.save(payload, file)
    else:
        file.write_bytes(pickle.dumps(payload))


def set_manifest(folder: Path, how: str) -> None:
    """``stale``: leave it; ``forged``: rewrite it to match the files now there; ``absent``: an old checkpoint."""
    marker = read_json(folder / ckpt.MARKER)
    if how == "forged":
        marker["files"] = ckpt.manifest(folder)
    elif how == "absent":
        marker.pop("files")
    (folder / ckpt.MARKER).write_text(json.dumps(marker))


def assert_refused(r, *fragments: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr[-3000:]
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, demo_data) -> Path:
    """A real run stopped after its step-4 checkpoint (ZeRO 0, fp32)."""
    out = tmp_path_factory.mktemp("saved") / "run"
    r = run(pretrain_cmd(out, demo_data, *FIRST))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def copy_run(saved: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(saved, out)
    return out, out / "checkpoints" / TAG


def test_complete_json_lists_every_file_with_size_and_sha256(saved):
    folder = saved / "checkpoints" / TAG
    files = read_json(folder / ckpt.MARKER)["files"]
    assert set(files) == {MODEL_FILE, "rng_rank0.pt"}
    for name, entry in files.items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.slow
@pytest.mark.parametrize("manifest, fmt, message", [
    ("stale", "torch", "differs from its manifest"),   # size differs as well; either check may answer
    ("forged", "torch", "refusing to unpickle"),       # the attacker rewrote the manifest: weights_only stops it
    ("forged", "raw", "refusing to unpickle"),         # a bare pickle, not a torch zip file
    ("absent", "torch", "refusing to unpickle"),       # dressed as a checkpoint from before manifests
])
def test_planted_pickle_never_runs_and_resume_exits_2(saved, tmp_path, demo_data, manifest, fmt, message):
    out, folder = copy_run(saved, tmp_path)
    marker = tmp_path / "PWNED"
    plant(folder / MODEL_FILE, marker, fmt)
    set_manifest(folder, manifest)
    r = run(pretrain_cmd(out, demo_data, *RESUME))
    assert not marker.exists(), "the planted pickle ran"
    if manifest == "stale":
        assert_refused(r, f"checkpoint {folder}: {MODEL_FILE}")
        assert "differs from its manifest" in r.stderr or "truncated or modified" in r.stderr
    else:
        assert_refused(r, f"checkpoint {folder}: {MODEL_FILE}", message)


@pytest.mark.slow
def test_planted_pickle_via_resume_path_never_runs(saved, tmp_path, demo_data):
    """``--resume PATH`` to a checkpoint outside the run (e.g. a downloaded one), manifest forged."""
    _, folder = copy_run(saved, tmp_path)
    marker = tmp_path / "PWNED"
    plant(folder / "rng_rank0.pt", marker)
    set_manifest(folder, "forged")
    r = run(pretrain_cmd(tmp_path / "fresh", demo_data, *RESUME, "--resume", str(folder)))
    assert not marker.exists(), "the planted pickle ran"
    assert_refused(r, "rng_rank0.pt", "refusing to unpickle")


def flip_a_byte(folder: Path) -> None:
    f = folder / MODEL_FILE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def add_extra(folder: Path) -> None:
    torch.save({"x": torch.zeros(1)}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")


def remove_rng(folder: Path) -> None:
    (folder / "rng_rank0.pt").unlink()


@pytest.mark.slow
@pytest.mark.parametrize("tamper, message", [
    (flip_a_byte, f"{MODEL_FILE} differs from its manifest (sha256)"),
    (add_extra, "zero_pp_rank_0_mp_rank_00_optim_states.pt is not listed in its manifest"),
    (remove_rng, "rng_rank0.pt is missing"),
], ids=["flipped byte", "extra .pt file", "missing file"])
def test_tampered_checkpoint_is_refused_by_the_manifest(saved, tmp_path, demo_data, tamper, message):
    out, folder = copy_run(saved, tmp_path)
    tamper(folder)
    r = run(pretrain_cmd(out, demo_data, *RESUME))
    assert_refused(r, f"checkpoint {folder}: {message}")


@pytest.mark.slow
def test_old_checkpoint_without_manifest_resumes_with_a_warning(saved, tmp_path, demo_data):
    out, folder = copy_run(saved, tmp_path)
    set_manifest(folder, "absent")
    r = run(pretrain_cmd(out, demo_data, *RESUME))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "has no manifest" in r.stderr and "resumed from" in r.stderr
    assert read_json(out / "final.json")["step"] == 8
    assert "files" in read_json(out / "checkpoints" / "step000000008" / ckpt.MARKER)


@pytest.mark.slow
@pytest.mark.parametrize("overrides, optim_file", [
    (["train.zero_stage=1"], "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    (["train.zero_stage=2", "train.precision=bf16"], "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
], ids=["zero1-fp32", "zero2-bf16"])
def test_zero_checkpoints_resume_and_their_optimizer_files_are_guarded(tmp_path, demo_data, overrides, optim_file):
    """ZeRO optimizer files hold DeepSpeed's own records (LossScaler, ZeroStageEnum, fragment_address): the
    allow-list lets them load with weights_only=True, and a payload there is refused like anywhere else."""
    out = tmp_path / "run"
    assert run(pretrain_cmd(out, demo_data, *FIRST, *overrides)).returncode == 0
    folder = out / "checkpoints" / TAG
    assert optim_file in read_json(folder / ckpt.MARKER)["files"]
    evil = tmp_path / "evil"
    shutil.copytree(out, evil)
    r = run(pretrain_cmd(out, demo_data, *RESUME, *overrides))
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-3000:]
    assert read_json(out / "final.json")["step"] == 8

    marker = tmp_path / "PWNED"
    plant(evil / "checkpoints" / TAG / optim_file, marker)
    set_manifest(evil / "checkpoints" / TAG, "forged")
    r = run(pretrain_cmd(evil, demo_data, *RESUME, *overrides))
    assert not marker.exists(), "the planted pickle ran"
    assert_refused(r, optim_file, "refusing to unpickle")


def test_load_file_refuses_code_and_checks_the_hash(tmp_path):
    """The loader itself, without a run: no manifest (old checkpoint) and a payload, or a hash mismatch."""
    marker = tmp_path / "PWNED"
    plant(tmp_path / "a.pt", marker)
    with pytest.raises(ckpt.CheckpointError, match="refusing to unpickle"):
        ckpt.load_file(tmp_path / "a.pt", tmp_path, None)
    assert not marker.exists()
    torch.save({"w": torch.arange(3)}, tmp_path / "b.pt")
    files = ckpt.manifest(tmp_path)
    assert ckpt.load_file(tmp_path / "b.pt", tmp_path, files)["w"].tolist() == [0, 1, 2]
    files["b.pt"]["sha256"] = "0" * 64
    with pytest.raises(ckpt.CheckpointError, match="b.pt differs from its manifest"):
        ckpt.load_file(tmp_path / "b.pt", tmp_path, files)
    with pytest.raises(ckpt.CheckpointError, match="not listed in its manifest"):
        ckpt.load_file(tmp_path / "c.pt", tmp_path, {"b.pt": files["b.pt"]})


def test_unreadable_manifest_is_one_line(tmp_path):
    (tmp_path / ckpt.MARKER).write_text(json.dumps({"step": 4, "files": {"a.pt": {"size": "big"}}}))
    with pytest.raises(ckpt.CheckpointError, match="unreadable complete.json"):
        ckpt.read_manifest(tmp_path)
