"""Classification models for fine-tuning / linear probing / supervised training, and pre-trained weight loading.

* :func:`build_classifier`: ``model.name == "vit"`` gives timm's ``VisionTransformer`` in the MAE fine-tune
  layout (LayerNorm eps 1e-6, qkv bias, cls token, learnable pos-embed, ``dynamic_img_size=True``, global
  average pooling + ``fc_norm`` or cls token + final norm); any other name goes to ``timm.create_model``.
* :func:`load_pretrained`: an MAE encoder from this project's export (``encoder.safetensors``), its DeepSpeed
  checkpoints (``mp_rank_00_model_states.pt``, key ``module``) or the official MAE ``.pth`` (``{'model': ...}``)
  into such a ViT. Parameter names already agree (``patch_embed.proj``, ``cls_token``, ``blocks.N``, ``norm``);
  decoder keys are ignored, ``norm.*`` is unused with avg pooling (MAE uses ``fc_norm`` instead, newly
  initialised); the pos-embed is the checkpoint's (resampled bicubically to the model's grid) or, for this
  project's MAE which has none (fixed sin-cos), the sin-cos table of the model's grid, loaded as the
  learnable table as in MAE fine-tuning. Architecture mismatches raise :class:`PretrainedError` (one line).
* :func:`resize_pos_embed_`: resize a learnable pos-embed table to a new input size together with its AdamW
  moments (EfficientTrain++ at a curriculum stage change; bilinear, so ``exp_avg_sq`` stays >= 0).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from mae_curriculum.config import ConfigError
from mae_curriculum.models.pos_embed import sincos_2d

log = logging.getLogger(__name__)

HEAD_KEYS = re.compile(r"^(head|fc_norm)\.")
DECODER_KEYS = re.compile(r"^(decoder_|mask_token$)")


class PretrainedError(ConfigError):
    """The pre-trained weights cannot be read or do not fit the model (exit status 2, one line)."""


# ------------------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------------------


def build_vit(m, num_classes: int, global_pool: str = "avg"):
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans, num_classes=num_classes,
        global_pool=global_pool, fc_norm=global_pool == "avg", class_token=True, dynamic_img_size=True,
        embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, qkv_bias=True,
        drop_path_rate=m.drop_path, norm_layer=partial(nn.LayerNorm, eps=1e-6), **m.kwargs)
    nn.init.trunc_normal_(model.head.weight, std=m.head_init_std)
    nn.init.zeros_(model.head.bias)
    return model


class LinearProbe(nn.Module):
    """Frozen encoder (cls token after the final norm) + BatchNorm1d(affine=False, eps 1e-6) + Linear (std 0.01).

    ``forward(x)`` takes images; ``forward(f, features=True)`` takes pre-extracted features (the cached path).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, std: float = 0.01):
        super().__init__()
        self.encoder = encoder
        self.encoder.reset_classifier(0)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        dim = self.encoder.num_features
        linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(linear.weight, std=std)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: no drop path, fixed statistics
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)  # cls token after the final norm (global_pool="token", num_classes=0)

    def forward(self, x: torch.Tensor, features: bool = False) -> torch.Tensor:
        return self.head(x if features else self.features(x))


def build_classifier(cfg, num_classes: int) -> nn.Module:
    """The model of ``cfg.mode`` (a FinetuneConfig)."""
    m = cfg.model
    if cfg.mode == "linprobe":
        return LinearProbe(build_vit(m, num_classes, global_pool="token"), num_classes)
    if m.name == "vit":
        return build_vit(m, num_classes, m.global_pool)
    import timm

    def create(**extra):
        try:
            return timm.create_model(m.name, pretrained=False, num_classes=num_classes, drop_path_rate=m.drop_path,
                                     **{**m.kwargs, **extra})
        except RuntimeError as e:  # unknown model name
            raise ConfigError(f"model.name: {e}") from None
        except TypeError as e:
            raise ConfigError(f"model.kwargs do not fit {m.name}: {e}") from None

    model = create()
    if has_resizable_pos_embed(model) and not model.dynamic_img_size and "dynamic_img_size" not in m.kwargs:
        # a ViT/DeiT: its table follows the curriculum stage (resize_pos_embed_), and evaluation at the final
        # size while it is still small interpolates it on the fly
        model = create(dynamic_img_size=True)
    return model


def check_input_sizes(model: nn.Module, sizes: list[int], in_chans: int = 3) -> None:
    """Run one image at each size through ``model`` (no grad); a size it refuses (e.g. a window-based model with a
    strict input size) is a ConfigError naming the size."""
    was = model.training
    model.eval()
    try:
        for s in sizes:
            try:
                with torch.no_grad():
                    model(torch.zeros(1, in_chans, s, s))
            except Exception as e:
                msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                raise ConfigError(f"model {type(model).__name__} does not accept {s}x{s} inputs, a size of the "
                                  f"curriculum ({msg}); for Swin set model.kwargs.strict_img_size=false "
                                  f"(timm pads to the window size) or a schedule with sizes it accepts") from None
    finally:
        model.train(was)


def build_for_config(cfg, num_classes: int, sizes: list[int]) -> tuple[nn.Module, "LoadReport | None"]:
    """The model of a FinetuneConfig with its pre-trained encoder loaded (modes finetune / linprobe), checked
    against the input ``sizes`` it will see: a ViT's patch must be ``model.patch_size``; other models run one
    image at each size (see :func:`check_input_sizes`)."""
    m = cfg.model
    model = build_classifier(cfg, num_classes)
    report = load_pretrained(model, cfg.finetune.pretrained) if cfg.mode != "supervised" else None
    vit = model.encoder if isinstance(model, LinearProbe) else model
    if has_resizable_pos_embed(vit):
        if vit.patch_embed.patch_size[0] != m.patch_size:
            raise ConfigError(f"model.patch_size is {m.patch_size} but {m.name} has patches of "
                              f"{vit.patch_embed.patch_size[0]}")
    else:
        check_input_sizes(model, sizes, m.in_chans)
    return model, report


# ------------------------------------------------------------------------------------------------------------
# positional embeddings
# ------------------------------------------------------------------------------------------------------------


def has_resizable_pos_embed(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer) and isinstance(getattr(model, "pos_embed", None), nn.Parameter)


def _resample(t: torch.Tensor, new: tuple[int, int], old: tuple[int, int], prefix: int, mode: str) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    if tuple(new) == tuple(old):
        return t
    return resample_abs_pos_embed(t, list(new), list(old), num_prefix_tokens=prefix, interpolation=mode,
                                  antialias=False)


def resize_pos_embed_(model: nn.Module, img_size: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
    """Resize a timm ViT's learnable pos-embed in place to the grid of ``img_size`` (bilinear), and the same for
    its AdamW moments ``exp_avg`` / ``exp_avg_sq`` in ``optimizer`` (EfficientTrain++). The Parameter object is
    kept, so the optimizer still owns it. Returns False when the grid is unchanged (nothing is touched)."""
    pe = model.patch_embed
    old = tuple(pe.grid_size)
    new = (img_size // pe.patch_size[0], img_size // pe.patch_size[1])
    if new == old:
        return False
    p = model.pos_embed
    old_shape = p.shape
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    with torch.no_grad():
        p.data = _resample(p.data, new, old, prefix, "bilinear")
    p.grad = None
    state = optimizer.state.get(p, {}) if optimizer is not None else {}
    for k, v in list(state.items()):  # exp_avg / exp_avg_sq (AdamW), momentum_buffer (SGD)
        if isinstance(v, torch.Tensor) and v.shape == old_shape:
            state[k] = _resample(v, new, old, prefix, "bilinear").contiguous()
    pe.set_input_size(img_size=img_size)
    return True


def sincos_pos_embed(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + gh*gw, dim): MAE's fixed table (cls row zeros) for ``grid``."""
    return sincos_2d(dim, grid[0], grid[1], cls_token=True).unsqueeze(0)


# ------------------------------------------------------------------------------------------------------------
# reading checkpoints
# ------------------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------------------
# loading into a ViT
# ------------------------------------------------------------------------------------------------------------


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
        sd["pos_embed"] = _resample(pe, grid, (side, side), 1, "bicubic")
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


# ------------------------------------------------------------------------------------------------------------
# optimizer parameter groups
# ------------------------------------------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's layer-decay groups for ViTs (blocks.N is layer N+1; patch_embed / cls / pos-embed layer 0; the
    rest, fc_norm and head, layer L+1 with scale 1), weight-decay groups otherwise. No decay on 1-D
    parameters, ``pos_embed`` and ``cls_token`` (MAE's ``no_weight_decay``). Each group has ``lr_scale``."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    if layer_decay < 1.0 and hasattr(model, "group_matcher"):
        return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=tuple(skip), layer_decay=layer_decay)
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=tuple(skip))
    for g in groups:
        g["lr_scale"] = 1.0
    return groups


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW / LARS / SGD (``cfg.optim.name``) over :func:`param_groups`; the linear probe: LARS on its head."""
    o = cfg.optim
    if cfg.mode == "linprobe":  # MAE: LARS on the head, trust ratio on the weight matrix only
        params = [p for p in model.head.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim > 1], "always_adapt": True},
                  {"params": [p for p in params if p.ndim <= 1], "always_adapt": False, "weight_decay": 0.0}]
    else:
        decay = o.layer_decay if cfg.model.name == "vit" else 1.0
        groups = param_groups(model, o.weight_decay, decay)
    if o.name == "lars" or cfg.mode == "linprobe":
        from timm.optim import Lars

        return Lars(groups, lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(o.betas), weight_decay=o.weight_decay)


__all__ = ["build_optimizer", "build_vit", "build_classifier", "build_for_config", "LinearProbe", "load_pretrained",
           "read_state_dict", "LoadReport",
           "PretrainedError", "resize_pos_embed_", "has_resizable_pos_embed", "sincos_pos_embed", "param_groups",
           "check_input_sizes", "write_report"]
