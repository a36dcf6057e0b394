"""The fine-tuning engine's model: built from a FinetuneConfig, pre-trained encoder loaded, input sizes
checked, and its learnable pos-embed resized at curriculum stage changes together with its optimizer moments."""

from __future__ import annotations

import torch
import torch.nn as nn

from mae_curriculum.config import ConfigError
from mae_curriculum.engine.pretrained import LoadReport, load_pretrained
from mae_curriculum.models.vit import (
    LinearProbe,
    build_vit,
    has_resizable_pos_embed,
    resample_pos_embed,
)


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
        p.data = resample_pos_embed(p.data, new, old, prefix, "bilinear")
    p.grad = None
    state = optimizer.state.get(p, {}) if optimizer is not None else {}
    for k, v in list(state.items()):  # exp_avg / exp_avg_sq (AdamW), momentum_buffer (SGD)
        if isinstance(v, torch.Tensor) and v.shape == old_shape:
            state[k] = resample_pos_embed(v, new, old, prefix, "bilinear").contiguous()
    pe.set_input_size(img_size=img_size)
    return True
