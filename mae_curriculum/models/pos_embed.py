"""Fixed 2-D sine-cosine positional embeddings (as in MAE / MoCo v3), built for any patch grid."""

from __future__ import annotations

import functools

import torch


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) embedding: half sines, half cosines over geometric frequencies."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even; got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> torch.Tensor:
    """(grid_h*grid_w [+1], dim) table; the first half of the channels encodes the column (w) position and the
    second half the row (h) position, like the official MAE code; the cls row (if any) is zeros."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding dim must be a multiple of 4; got {dim}")
    gh, gw = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                            indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, gw), sincos_1d(dim // 2, gh)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


@functools.lru_cache(maxsize=32)
def cached_sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool) -> torch.Tensor:
    """CPU table cached per grid; callers move it to their device (see MaskedAutoencoderViT.pos_embed_for)."""
    return sincos_2d(dim, grid_h, grid_w, cls_token)
