"""Per-image FLOP counts: analytic for MAE, measured (``FlopCounterMode``) for any ``nn.Module``.

Conventions: a multiply-add is 2 FLOPs; only matrix products count (linear layers, the patch-embedding
convolution, attention's ``Q K^T`` and ``A V``); norms, activations, softmax and additions are ignored.
Training costs 3 x forward (the backward pass is ~2 x forward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = [
    "encoder_forward_flops",
    "vit_classifier_flops_per_image",
    "mae_forward_flops_breakdown",
    "mae_flops_per_image",
    "measured_forward_flops",
]

TRAINING_FLOPS_PER_FORWARD = 3.0


def encoder_forward_flops(num_tokens: int, embed_dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of ``depth`` pre-norm transformer blocks over ``num_tokens`` tokens (one image).

    Per block: qkv ``2*T*D*3D``, ``Q K^T`` and ``A V`` ``2*T*T*D`` each, output projection ``2*T*D*D``,
    MLP ``2 * 2*T*D*hidden`` with ``hidden = int(D * mlp_ratio)`` (timm's rounding).
    """
    if min(num_tokens, embed_dim, depth) < 1 or mlp_ratio <= 0:
        raise ValueError(
            f"encoder_forward_flops needs positive sizes, got num_tokens={num_tokens}, embed_dim={embed_dim}, "
            f"depth={depth}, mlp_ratio={mlp_ratio}"
        )
    tokens, dim = float(num_tokens), float(embed_dim)
    hidden = float(int(embed_dim * mlp_ratio))
    linear = 2 * tokens * dim * (3 * dim + dim + 2 * hidden)
    attention = 2 * (2 * tokens * tokens * dim)
    return depth * (linear + attention)


def mae_forward_flops_breakdown(
    img_size: int,
    patch_size: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    decoder_embed_dim: int,
    decoder_depth: int,
    mlp_ratio: float = 4.0,
    in_chans: int = 3,
    mask_ratio: float = 0.75,
) -> dict[str, float]:
    """Forward FLOPs per image of an MAE, split into ``encoder`` and ``decoder``.

    Encoder: patch embedding of the visible patches and the blocks over ``int(L*(1-mask_ratio)) + 1``
    tokens. Decoder: ``decoder_embed`` over those visible tokens (it runs before the mask tokens are
    appended, as in the official code), the blocks over all ``L + 1`` tokens, and the prediction head
    (``patch_size**2 * in_chans`` outputs) over ``L + 1`` tokens. ``num_heads`` does not change the count.
    """
    if img_size < 1 or patch_size < 1 or img_size % patch_size:
        raise ValueError(f"img_size {img_size} must be a positive multiple of patch_size {patch_size}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
    if num_heads < 1 or embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
    num_patches = (img_size // patch_size) ** 2
    visible = int(num_patches * (1 - mask_ratio))
    patch_pixels = patch_size * patch_size * in_chans
    patch_embed = 2.0 * visible * patch_pixels * embed_dim
    encoder = patch_embed + encoder_forward_flops(visible + 1, embed_dim, depth, mlp_ratio)
    decoder_embed = 2.0 * (visible + 1) * embed_dim * decoder_embed_dim
    prediction = 2.0 * (num_patches + 1) * decoder_embed_dim * patch_pixels
    blocks = encoder_forward_flops(num_patches + 1, decoder_embed_dim, decoder_depth, mlp_ratio)
    return {"encoder": encoder, "decoder": decoder_embed + blocks + prediction}


def mae_flops_per_image(
    img_size: int,
    patch_size: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    decoder_embed_dim: int,
    decoder_depth: int,
    mlp_ratio: float = 4.0,
    in_chans: int = 3,
    mask_ratio: float = 0.75,
) -> float:
    """Training FLOPs per image (forward + backward = 3 x forward) of an MAE; see the breakdown function."""
    parts = mae_forward_flops_breakdown(
        img_size, patch_size, embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth,
        mlp_ratio=mlp_ratio, in_chans=in_chans, mask_ratio=mask_ratio,
    )
    return TRAINING_FLOPS_PER_FORWARD * (parts["encoder"] + parts["decoder"])


def vit_classifier_flops_per_image(img_size: int, patch_size: int, embed_dim: int, depth: int, num_classes: int,
                                   mlp_ratio: float = 4.0, in_chans: int = 3, class_token: bool = True) -> float:
    """Training FLOPs per image (3 x forward) of a ViT classifier at ``img_size``: patch embedding, the blocks over
    ``L (+ 1)`` tokens and the linear head (the conventions of this module)."""
    if img_size < 1 or patch_size < 1 or img_size % patch_size:
        raise ValueError(f"img_size {img_size} must be a positive multiple of patch_size {patch_size}")
    num_patches = (img_size // patch_size) ** 2
    patch_embed = 2.0 * num_patches * patch_size * patch_size * in_chans * embed_dim
    blocks = encoder_forward_flops(num_patches + int(class_token), embed_dim, depth, mlp_ratio)
    head = 2.0 * embed_dim * num_classes
    return TRAINING_FLOPS_PER_FORWARD * (patch_embed + blocks + head)


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of the fused CPU attention kernel, which ``FlopCounterMode`` does not count by itself."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def measured_forward_flops(module: nn.Module, example_inputs: tuple[Any, ...], **kwargs: Any) -> float:
    """Forward FLOPs of ``module(*example_inputs, **kwargs)`` counted by ``torch.utils.flop_counter``.

    Counts for the whole batch in ``example_inputs`` (divide by its size for per-image numbers). Runs under
    ``torch.no_grad()``. Fused attention is counted on CPU too (the CPU flash kernel is added to the table).
    """
    if not isinstance(example_inputs, tuple):
        raise ValueError(f"example_inputs must be a tuple, got {type(example_inputs).__name__}")
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with torch.no_grad(), counter:
        module(*example_inputs, **kwargs)
    return float(counter.get_total_flops())
