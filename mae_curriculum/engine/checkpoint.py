"""Checkpoints through DeepSpeed, with completeness markers, retention and a DeepSpeed-free export.

Layout: ``<output_dir>/checkpoints/<tag>/`` as DeepSpeed writes it (every rank calls ``save_checkpoint``),
plus ``rng_rank<r>.pt`` per rank and, last, ``complete.json`` written by rank 0 after a barrier. A tag without
``complete.json`` (a run killed while saving) is never resumed from. Tags are ``step%09d`` and never reused,
so a save can never overwrite the last good checkpoint.

Loading is safe for checkpoints from elsewhere (a shared output folder, a copied or downloaded run):

- ``complete.json`` carries a manifest, ``files``: size and sha256 of every file of the tag folder, taken
  after all ranks have written theirs. Before loading, the folder must hold exactly those files with those
  sizes (JSON side files such as ``run_state.json`` excepted), and each file's sha256 is checked just before
  that file is read. This catches corrupt, truncated, swapped or planted files (integrity); it is no
  signature: whoever can write the folder can also rewrite the manifest.
- Hence, second and independent: nothing is unpickled. DeepSpeed's own loader calls ``torch.load`` with
  ``weights_only=False``; during :func:`load` its checkpoint engine is replaced by one whose ``load`` uses
  ``weights_only=True``, allowing only tensors, plain containers and scalars, plus the few plain record types
  DeepSpeed pickles into its optimizer files (:func:`_deepspeed_safe_globals`). A planted pickle that would
  run code is refused with a one-line :class:`CheckpointError`, manifest forged or not.
- Checkpoints written before manifests existed load the same way (``weights_only=True``), unverified, with a
  warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from mae_curriculum.engine import dist as D

log = logging.getLogger(__name__)

MARKER = "complete.json"
_HASH_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says why in one line."""


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def list_complete(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
    return [p for p in tags if (p / MARKER).is_file()]


def find_resume(ckpt_dir: Path) -> Path | None:
    """Newest complete checkpoint; logs when a newer incomplete one is passed over."""
    if not ckpt_dir.is_dir():
        return None
    tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
    for p in reversed(tags):
        if (p / MARKER).is_file():
            return p
        log.warning("checkpoint %s is incomplete (no %s; killed while saving?): skipping it", p, MARKER)
    return None


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
          "python_pos": random.getstate()[2], "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
          "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate((3, tuple(st["python"]), st["python_pos"]))
    np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), st["numpy_pos"], 0, 0.0))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def save(engine, ckpt_dir: Path, step: int, client_state: dict, before_marker=None) -> Path:
    """Save on every rank; returns the tag folder. Raises CheckpointError (one line) on failure."""
    tag = tag_for(step)
    path = ckpt_dir / tag
    if (path / MARKER).is_file():
        return path  # this exact state was saved already (e.g. resume then immediate save)
    try:
        if D.is_main() and path.exists():
            shutil.rmtree(path)  # an incomplete leftover of the same step
        D.barrier()
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=True)
        torch.save(rng_state(), path / f"rng_rank{D.rank()}.pt")
        if before_marker is not None:
            before_marker()  # fault injection: die with the files written but the checkpoint not yet complete
        D.barrier()
        if D.is_main():
            tmp = path / (MARKER + ".tmp")
            tmp.write_text(json.dumps({"step": step, "world_size": D.world_size(), "files": manifest(path)}))
            os.replace(tmp, path / MARKER)
        D.barrier()
    except OSError as e:
        if D.is_main():
            shutil.rmtree(path, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e} "
                              f"(the previous checkpoint is kept)") from None
    return path


def _sha256(path: Path) -> str:
    """Streams the file (1 MiB buffer, reused): ~0.8 GB/s on one core of the 2-core CI machine."""
    h, buf = hashlib.sha256(), bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _is_side_file(name: str) -> bool:
    """JSON files beside the checkpoint (the marker, ``run_state.json``, a ``.tmp`` of them): never unpickled,
    written after the manifest, so not listed in it."""
    return name.endswith((".json", ".tmp"))


def _files(path: Path) -> dict[str, Path]:
    return {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*"))
            if p.is_file() and not _is_side_file(p.name)}


def manifest(path: Path) -> dict[str, dict]:
    """``{relative name: {"size", "sha256"}}`` of every file of a checkpoint folder except JSON side files."""
    return {name: {"size": p.stat().st_size, "sha256": _sha256(p)} for name, p in _files(path).items()}


def read_manifest(path: Path) -> dict[str, dict] | None:
    """The manifest in ``complete.json`` after checking that the folder holds exactly the files it lists, with
    their sizes (hashes are checked as each file is read: :func:`load_file`); None for a checkpoint written
    before manifests existed. Raises CheckpointError (one line) on any mismatch."""
    try:
        files = json.loads((path / MARKER).read_text()).get("files")
        if files is None:
            return None
        sizes = {str(name): int(e["size"]) for name, e in files.items()}
        if not all(isinstance(e["sha256"], str) for e in files.values()):
            raise TypeError("sha256 is not a string")
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {MARKER} ({type(e).__name__}: {e})") from None
    present = _files(path)
    extra = sorted(set(present) - set(sizes))
    if extra:
        raise CheckpointError(f"checkpoint {path}: {extra[0]} is not listed in its manifest ({MARKER}): "
                              f"refusing a checkpoint with unlisted files")
    for name, size in sizes.items():
        if name not in present:
            raise CheckpointError(f"checkpoint {path}: {name} is missing (listed in its manifest)")
        if present[name].stat().st_size != size:
            raise CheckpointError(f"checkpoint {path}: {name} has {present[name].stat().st_size} bytes, its "
                                  f"manifest says {size}: truncated or modified")
    return files


def _deepspeed_safe_globals() -> list:
    """Non-tensor types DeepSpeed 0.19 pickles into its checkpoint files (found by saving ZeRO 0-3, fp32 and
    bf16 checkpoints and listing ``torch.serialization.get_unsafe_globals_in_checkpoint``; DynamicLossScaler
    is fp16's). Plain records: rebuilding them sets attributes, it runs no code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_file(file: Path, folder: Path, files: dict[str, dict] | None, map_location=None):
    """``torch.load`` one file of checkpoint ``folder`` with ``weights_only=True``, after checking its sha256
    against the manifest ``files`` (None: an old checkpoint, unverified). Raises CheckpointError (one line)."""
    name = Path(os.path.relpath(file, folder)).as_posix()  # DeepSpeed names files as folder/<name>
    if files is not None:
        if name not in files:
            raise CheckpointError(f"checkpoint {folder}: {name} is not listed in its manifest: refusing to read it")
        if _sha256(file) != files[name]["sha256"]:
            raise CheckpointError(f"checkpoint {folder}: {name} differs from its manifest (sha256): modified or "
                                  f"corrupt, refusing to read it")
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise CheckpointError(f"checkpoint {folder}: {name} holds more than tensors and plain data, refusing to "
                              f"unpickle it ({why[:200]})") from None
    except Exception as e:  # noqa: BLE001  (a truncated zip, not a torch file, ...: all one line)
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"checkpoint {folder}: {name} could not be read ({type(e).__name__}: "
                              f"{msg[:200]})") from None


class _SafeLoads:
    """Stands in for DeepSpeed's checkpoint engine during :func:`load`: every file DeepSpeed reads goes through
    :func:`load_file` (manifest hash, ``weights_only=True``); everything else is the real engine's."""

    def __init__(self, inner, folder: Path, files: dict[str, dict] | None):
        self._inner, self._folder, self._files = inner, folder, files

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path, map_location=None):
        return load_file(Path(path), self._folder, self._files, map_location)


def load(engine, path: Path) -> dict:
    """Load model/optimizer/scheduler state and return our client state; restores this rank's RNG.

    Verifies the manifest first (:func:`read_manifest`) and reads every file with ``weights_only=True``
    through :func:`load_file`. Raises CheckpointError (one line) for a tampered, incomplete or unsafe
    checkpoint and for one that does not fit this model."""
    path = Path(path)
    files = read_manifest(path)
    if files is None:
        log.warning("checkpoint %s has no manifest (written before checkpoints carried one): its files are not "
                    "verified; they are still read with weights_only=True (the next checkpoint saved has one)", path)
    if engine.load_universal_checkpoint():  # that path unpickles with weights_only=False directly
        raise CheckpointError("DeepSpeed universal checkpoints are not supported: they bypass the safe loader")
    real = engine.checkpoint_engine
    engine.checkpoint_engine = _SafeLoads(real, path, files)
    try:
        load_path, client = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        rng_file = path / f"rng_rank{D.rank()}.pt"
        if load_path is not None and rng_file.is_file():
            set_rng_state(load_file(rng_file, path, files))
    except CheckpointError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = ""
        if "parameter group" in msg:  # the optimizer's groups differ (e.g. MAE's weight-decay groups before 12/2026)
            hint = ("; its optimizer groups differ from this version's: start a new output_dir, or take its weights "
                    "only (finetune.pretrained accepts a checkpoint folder)")
        raise CheckpointError(f"checkpoint {path} does not fit this model ({msg[:300]}){hint}") from None
    finally:
        engine.checkpoint_engine = real
    if load_path is None:
        raise CheckpointError(f"checkpoint {path} could not be loaded")
    return client


def apply_retention(ckpt_dir: Path, keep_last: int, keep_every_epochs: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints plus those at the end of every N-th epoch."""
    if not D.is_main():
        return
    complete = list_complete(ckpt_dir)
    keep = {p.name for p in complete[-keep_last:]}
    for p in complete:
        marker = json.loads((p / MARKER).read_text())
        ep_end = marker.get("epoch_end")
        if keep_every_epochs and ep_end is not None and (ep_end + 1) % keep_every_epochs == 0:
            keep.add(p.name)
    for p in complete:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


def mark_epoch_end(path: Path, epoch: int) -> None:
    if D.is_main():
        m = json.loads((path / MARKER).read_text())
        m["epoch_end"] = epoch
        tmp = path / (MARKER + ".tmp")
        tmp.write_text(json.dumps(m))
        os.replace(tmp, path / MARKER)


def export_safetensors(model: torch.nn.Module, out_dir: Path, model_config: dict) -> dict[str, Path]:
    """Write ``mae.safetensors`` (encoder + decoder), ``encoder.safetensors`` and ``model.json``."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    enc = {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")}
    paths = {"mae": out_dir / "mae.safetensors", "encoder": out_dir / "encoder.safetensors",
             "config": out_dir / "model.json"}
    save_file(sd, str(paths["mae"]))
    save_file(enc, str(paths["encoder"]))
    paths["config"].write_text(json.dumps({"architecture": "mae_vit", **model_config}, indent=2))
    return paths


def load_exported(path: str | Path) -> torch.nn.Module:
    """Rebuild the MAE from an export folder without DeepSpeed."""
    from safetensors.torch import load_file

    from mae_curriculum.config import ModelConfig, _build
    from mae_curriculum.models.mae import build_mae

    path = Path(path)
    cfg = json.loads((path / "model.json").read_text())
    cfg.pop("architecture", None)
    model = build_mae(_build(ModelConfig, cfg))
    model.load_state_dict(load_file(str(path / "mae.safetensors")))
    return model
