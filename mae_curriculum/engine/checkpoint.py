"""Checkpoints through DeepSpeed, with completeness markers, retention and a DeepSpeed-free export.

Layout: ``<output_dir>/checkpoints/<tag>/`` as DeepSpeed writes it (every rank calls ``save_checkpoint``),
plus ``rng_rank<r>.pt`` per rank and, last, ``complete.json`` written by rank 0 after a barrier. A tag without
``complete.json`` (a run killed while saving) is never resumed from. Tags are ``step%09d`` and never reused,
so a save can never overwrite the last good checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from mae_curriculum.engine import dist as D

log = logging.getLogger(__name__)

MARKER = "complete.json"


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
            tmp.write_text(json.dumps({"step": step, "world_size": D.world_size()}))
            os.replace(tmp, path / MARKER)
        D.barrier()
    except OSError as e:
        if D.is_main():
            shutil.rmtree(path, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e} "
                              f"(the previous checkpoint is kept)") from None
    return path


def load(engine, path: Path) -> dict:
    """Load model/optimizer/scheduler state and return our client state; restores this rank's RNG."""
    try:
        load_path, client = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
    except RuntimeError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} does not fit this model ({msg[:300]})") from None
    if load_path is None:
        raise CheckpointError(f"checkpoint {path} could not be loaded")
    rng_file = path / f"rng_rank{D.rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return client


def apply_retention(ckpt_dir: Path, keep_last: int, keep_every_epochs: int, epoch_of: dict[str, int]) -> None:
    """Keep the newest ``keep_last`` complete checkpoints plus those at the end of every N-th epoch."""
    if not D.is_main():
        return
    complete = list_complete(ckpt_dir)
    keep = set(p.name for p in complete[-keep_last:])
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
