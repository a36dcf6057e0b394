"""FLOP counts: analytic MAE numbers against published figures and against torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from mae_curriculum.curriculum.flops import (
    encoder_forward_flops,
    mae_flops_per_image,
    mae_forward_flops_breakdown,
    measured_forward_flops,
)

VIT_B = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8)
VIT_L = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512, decoder_depth=8)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_mae_base_matches_reference_numbers() -> None:
    parts = mae_forward_flops_breakdown(224, **VIT_B)
    assert _rel(parts["encoder"], 8.8e9) < 0.05
    assert _rel(parts["decoder"], 10.8e9) < 0.05
    assert parts["decoder"] > parts["encoder"]
    assert _rel(mae_flops_per_image(224, **VIT_B), 59e9) < 0.05
    assert mae_flops_per_image(224, **VIT_B) == pytest.approx(3 * (parts["encoder"] + parts["decoder"]))


@pytest.mark.parametrize("size,expected", [(160, 30e9), (112, 15e9)])
def test_mae_base_at_low_resolution_matches_reference(size: int, expected: float) -> None:
    assert _rel(mae_flops_per_image(size, **VIT_B), expected) < 0.05


def test_mae_large_matches_reference() -> None:
    assert _rel(mae_flops_per_image(224, **VIT_L), 125e9) < 0.05


def test_mask_ratio_only_changes_the_encoder_and_decoder_embed() -> None:
    dense = mae_forward_flops_breakdown(224, **VIT_B, mask_ratio=0.5)
    sparse = mae_forward_flops_breakdown(224, **VIT_B, mask_ratio=0.75)
    assert dense["encoder"] > 1.9 * sparse["encoder"]
    embed_difference = 2.0 * (98 - 49) * 768 * 512
    assert dense["decoder"] - sparse["decoder"] == pytest.approx(embed_difference)


def _small_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=64, patch_size=8, embed_dim=96, depth=2, num_heads=3, num_classes=0, global_pool="token"
    )


@pytest.mark.parametrize("fused", [True, False])
def test_encoder_formula_matches_flop_counter(fused: bool) -> None:
    """A timm ViT over all tokens is MAE's encoder with mask_ratio 0 (fused SDPA and the explicit path)."""
    model = _small_vit().eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    batch = 2
    measured = measured_forward_flops(model, (torch.randn(batch, 3, 64, 64),)) / batch
    analytic = mae_forward_flops_breakdown(64, 8, 96, 2, 3, 32, 1, mask_ratio=0.0)["encoder"]
    assert _rel(analytic, measured) < 0.02
    blocks_only = measured - 2 * 64 * (3 * 8 * 8) * 96
    assert _rel(encoder_forward_flops(65, 96, 2), blocks_only) < 0.02


class _TinyDecoder(nn.Module):
    """MAE decoder shape: embed visible tokens, append mask tokens, blocks over L+1, predict pixels."""

    def __init__(self, visible: int, num_patches: int, dim: int, dec_dim: int, depth: int, out: int) -> None:
        super().__init__()
        self.missing = num_patches - visible + 1
        self.embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.blocks = nn.Sequential(*[Block(dec_dim, num_heads=4) for _ in range(depth)])
        self.pred = nn.Linear(dec_dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = torch.cat([x, self.mask_token.expand(x.shape[0], self.missing, -1)], dim=1)
        return self.pred(self.blocks(x))


def test_decoder_formula_matches_flop_counter() -> None:
    img, patch, dim, dec_dim, depth = 64, 8, 96, 64, 2
    num_patches = (img // patch) ** 2
    visible = int(num_patches * 0.25)
    decoder = _TinyDecoder(visible, num_patches, dim, dec_dim, depth, patch * patch * 3).eval()
    measured = measured_forward_flops(decoder, (torch.randn(1, visible + 1, dim),))
    analytic = mae_forward_flops_breakdown(img, patch, dim, 1, 3, dec_dim, depth)["decoder"]
    assert _rel(analytic, measured) < 0.02


def test_measured_flops_scale_with_batch_and_take_kwargs() -> None:
    model = _small_vit().eval()
    one = measured_forward_flops(model, (torch.randn(1, 3, 64, 64),))
    three = measured_forward_flops(model, (torch.randn(3, 3, 64, 64),))
    assert three == pytest.approx(3 * one)
    features = measured_forward_flops(model.forward_features, (), x=torch.randn(1, 3, 64, 64))  # type: ignore[arg-type]
    assert features == pytest.approx(one)


def test_encoder_flops_grow_quadratically_in_tokens_through_attention() -> None:
    """Per-token cost rises by 4*D per extra token (Q K^T and A V); everything else is per-token constant."""
    per_token_10 = encoder_forward_flops(10, 64, 1, 4.0) / 10
    per_token_20 = encoder_forward_flops(20, 64, 1, 4.0) / 20
    assert per_token_20 - per_token_10 == pytest.approx(4 * 10 * 64)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(img_size=100), "multiple of patch_size"),
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(num_heads=5), "divisible by num_heads"),
        (dict(depth=0), "positive sizes"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    args = dict(img_size=224, **VIT_B)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        mae_forward_flops_breakdown(**args)


def test_measured_flops_need_a_tuple() -> None:
    with pytest.raises(ValueError, match="must be a tuple"):
        measured_forward_flops(nn.Linear(2, 2), torch.zeros(1, 2))  # type: ignore[arg-type]
