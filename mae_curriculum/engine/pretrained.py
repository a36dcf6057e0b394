"""Reading pre-trained weights for fine-tuning, from any accepted layout, into a timm ViT.

An MAE encoder from this project's export (``encoder.safetensors``), its DeepSpeed checkpoints
(``mp_rank_00_model_states.pt``, key ``module``) or the official MAE ``.pth`` (``{'model': ...}``). Parameter names
already agree (``patch_embed.proj``, ``cls_token``, ``blocks.N``, ``norm``); decoder keys are ignored, ``norm.*``
is unused with avg pooling (MAE uses ``fc_norm`` instead, newly initialised); the pos-embed is the checkpoint's
(resampled bicubically to the model's grid) or, for this project's MAE which has none (fixed sin-cos), the
sin-cos table of the model's grid, loaded as the learnable table as in MAE fine-tuning. Files are read with
``weights_only=True``. Architecture mismatches raise :class:`PretrainedError` (one line, exit status 2).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from mae_curriculum.config import ConfigError
from mae_curriculum.models.vit import LinearProbe, resample_pos_embed, sincos_pos_embed

HEAD_KEYS = re.compile(r"^(head|fc_norm)\.")
DECODER_KEYS = re.compile(r"^(decoder_|mask_token$)")


class PretrainedError(ConfigError):
    """The pre-trained weights cannot be read or do not fit the model (exit status 2, one line)."""


def _torch_load(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise PretrainedError(f"cannot read {path}: {msg}") from None
    if not isinstance(obj, dict):
        raise PretrainedError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def _find_in_dir(d: Path) -> tuple[Path, str]:
    from mae_curriculum.engine.checkpoint import find_resume

    for name, fmt in (("encoder.safetensors", "export"), ("mae.safetensors", "export"),
                      ("export/encoder.safetensors", "export"), ("mp_rank_00_model_states.pt", "deepspeed")):
        if (d / name).is_file():
            return d / name, fmt
    for ckdir in (d / "checkpoints", d):
        found = find_resume(ckdir) if ckdir.is_dir() else None
        if found is not None and (found / "mp_rank_00_model_states.pt").is_file():
            return found / "mp_rank_00_model_states.pt", "deepspeed"
    raise PretrainedError(f"{d}: no encoder.safetensors, export/, DeepSpeed checkpoint (mp_rank_00_model_states.pt) "
                          f"or complete checkpoints/stepNNNNNNNNN inside")


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str, Path]:
    """(state dict in float32 with prefixes stripped, format, the file read) for any accepted layout."""
    path = Path(path)
    if not path.exists():
        raise PretrainedError(f"pre-trained weights not found: {path}")
    fmt = "file"
    if path.is_dir():
        path, fmt = _find_in_dir(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise PretrainedError(f"cannot read {path}: {e}") from None
        fmt = "export"
    else:
        obj = _torch_load(path)
        for key, name in (("module", "deepspeed"), ("model", "official-mae"), ("state_dict", "state_dict")):
            if isinstance(obj.get(key), dict):
                sd, fmt = obj[key], name
                break
        else:
            sd = obj
        if fmt == "deepspeed" and not sd:
            raise PretrainedError(f"{path}: the DeepSpeed checkpoint holds no module weights (ZeRO-3?): use the "
                                  f"run's export/encoder.safetensors or DeepSpeed's zero_to_fp32.py")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ("module.", "_orig_mod.", "encoder."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        out[k] = v.float() if v.is_floating_point() else v
    if not out:
        raise PretrainedError(f"{path}: no tensors found")
    return out, fmt, path




@dataclass
class LoadReport:
    source: str
    format: str
    loaded: int = 0
    pos_embed: str = ""  # "checkpoint" | "checkpoint, resized AxB -> CxD" | "sin-cos for the model grid"
    missing: list[str] = field(default_factory=list)  # model keys not in the checkpoint (newly initialised)
    unused: list[str] = field(default_factory=list)  # checkpoint keys the model has no use for
    ignored_decoder: int = 0

    def summary(self) -> str:
        return (f"loaded {self.loaded} tensors from {self.source} ({self.format}); pos_embed: {self.pos_embed}; "
                f"newly initialised: {', '.join(self.missing) or 'none'}; unused: {', '.join(self.unused) or 'none'}; "
                f"decoder tensors ignored: {self.ignored_decoder}")

    def to_dict(self) -> dict:
        return asdict(self)


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape))


def load_pretrained(model: nn.Module, path: str | Path) -> LoadReport:
    """Load an MAE encoder into a timm ``VisionTransformer`` (or a :class:`LinearProbe`'s encoder)."""
    vit = model.encoder if isinstance(model, LinearProbe) else model
    sd, fmt, file = read_state_dict(path)
    report = LoadReport(str(file), fmt)
    report.ignored_decoder = sum(1 for k in sd if DECODER_KEYS.match(k))
    sd = {k: v for k, v in sd.items() if not DECODER_KEYS.match(k)}
    target = vit.state_dict()
    grid = tuple(vit.patch_embed.grid_size)
    if "patch_embed.proj.weight" not in sd or not any(k.startswith("blocks.") for k in sd):
        raise PretrainedError(f"{file}: not a ViT/MAE encoder (no patch_embed.proj.weight / blocks.N keys)")
    if "pos_embed" in sd:
        pe = sd["pos_embed"]
        old_len = pe.shape[1] - 1
        side = int(round(old_len ** 0.5))
        if pe.dim() != 3 or side * side != old_len or pe.shape[-1] != target["pos_embed"].shape[-1]:
            raise PretrainedError(f"{file}: pos_embed of shape {_shape(pe)} does not fit the model's "
                                  f"{_shape(target['pos_embed'])} (embedding width or a non-square grid)")
        sd["pos_embed"] = resample_pos_embed(pe, grid, (side, side), 1, "bicubic")
        resized = (side, side) != grid
        report.pos_embed = "checkpoint" + (f", resized {side}x{side} -> {grid[0]}x{grid[1]}" if resized else "")
    else:
        sd["pos_embed"] = sincos_pos_embed(target["pos_embed"].shape[-1], grid)
        report.pos_embed = f"sin-cos for the model grid {grid[0]}x{grid[1]} (the checkpoint has a fixed table)"
    depth_ckpt = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    depth_model = len({k.split(".")[1] for k in target if k.startswith("blocks.")})
    if depth_ckpt != depth_model:
        raise PretrainedError(f"{file} does not fit the model: {depth_ckpt} blocks in the checkpoint, "
                              f"{depth_model} in the model (model.depth)")
    state = {}
    for k, v in sd.items():
        if k not in target:
            report.unused.append(k)
        elif v.shape != target[k].shape:
            if HEAD_KEYS.match(k):
                report.unused.append(k)  # a classifier for other classes: re-initialised
                continue
            raise PretrainedError(f"{file} does not fit the model: {k} is {_shape(v)} in the checkpoint and "
                                  f"{_shape(target[k])} in the model (model.embed_dim / patch_size / mlp_ratio?)")
        else:
            state[k] = v
    missing = [k for k in target if k not in state]
    encoder_missing = [k for k in missing if not HEAD_KEYS.match(k)]
    if encoder_missing:
        raise PretrainedError(f"{file} does not fit the model: {len(encoder_missing)} encoder tensors are missing "
                              f"from it (e.g. {encoder_missing[0]})")
    vit.load_state_dict(state, strict=False)
    report.loaded = len(state)
    report.missing = missing + ([f"head.{n}" for n, _ in model.head.named_parameters()]
                                if isinstance(model, LinearProbe) else [])
    return report


def write_report(report: LoadReport, out_dir: Path) -> None:
    (out_dir / "load_report.json").write_text(json.dumps(report.to_dict(), indent=1))
