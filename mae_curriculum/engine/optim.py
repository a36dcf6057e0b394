"""Optimizer parameter groups and optimizers of both engines."""

from __future__ import annotations

import torch
import torch.nn as nn


def mae_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """MAE pre-training, as the official ``main_pretrain.py`` (timm 0.3.2 ``add_weight_decay`` with no skip list):
    no weight decay on biases and 1-D parameters (norms); decay on every other parameter, the ``cls_token`` and
    ``mask_token`` included (they are 3-D). Returns [no-decay group, decay group]."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


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
