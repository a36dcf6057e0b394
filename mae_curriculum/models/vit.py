"""Classification models for fine-tuning, linear probing and supervised training (pure ``nn.Module`` code).

* :func:`build_vit`: timm's ``VisionTransformer`` in the MAE fine-tune layout (LayerNorm eps 1e-6, qkv bias,
  cls token, learnable pos-embed, ``dynamic_img_size=True``, global average pooling + ``fc_norm`` or cls token +
  final norm).
* :class:`LinearProbe`: a frozen encoder + BatchNorm1d(affine=False) + Linear (MAE's linear-probe protocol).
* Positional-embedding tables: MAE's fixed sin-cos table for a grid, and resampling a learnable one.

Building a model from a config, loading pre-trained weights and optimizer groups live in ``engine/``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from mae_curriculum.models.pos_embed import sincos_2d


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


def has_resizable_pos_embed(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer) and isinstance(getattr(model, "pos_embed", None), nn.Parameter)


def resample_pos_embed(t: torch.Tensor, new: tuple[int, int], old: tuple[int, int], prefix: int, mode: str) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    if tuple(new) == tuple(old):
        return t
    return resample_abs_pos_embed(t, list(new), list(old), num_prefix_tokens=prefix, interpolation=mode,
                                  antialias=False)


def sincos_pos_embed(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + gh*gw, dim): MAE's fixed table (cls row zeros) for ``grid``."""
    return sincos_2d(dim, grid[0], grid[1], cls_token=True).unsqueeze(0)
