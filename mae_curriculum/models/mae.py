"""Masked Autoencoder with a ViT backbone (He et al., 2022), following the input resolution.

Built on timm's ``Block`` and ``PatchEmbed``. The patch size is fixed; the grid is (H/p, W/p) for whatever
input size arrives, so the curriculum can feed smaller images early in training. Positional embeddings
are the fixed 2-D sin-cos table for the current grid (cached per grid and device), for encoder and decoder.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from einops import rearrange
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from mae_curriculum.models.pos_embed import cached_sincos_2d


class MaskedAutoencoderViT(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.decoder_embed_dim = decoder_embed_dim
        self.norm_pix_loss = norm_pix_loss

        # ---- encoder ----
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        # ---- decoder ----
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
             for _ in range(decoder_depth)]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self._pos_tables: dict[tuple, torch.Tensor] = {}  # fixed sin-cos tables per (dim, grid, device, dtype)
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------ helpers
    def grid_size(self, imgs: torch.Tensor) -> tuple[int, int]:
        h, w = imgs.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {p}")
        return h // p, w // p

    def pos_embed_for(self, dim: int, grid: tuple[int, int], ref: torch.Tensor) -> torch.Tensor:
        """(1, 1 + gh*gw, dim) fixed sin-cos table for ``grid``, on ref's device and dtype (built once per key:
        no host-to-device copy and, under torch.compile, no table rebuilt inside the graph)."""
        key = (dim, grid, ref.device, ref.dtype)
        table = self._pos_tables.get(key)
        if table is None:
            table = cached_sincos_2d(dim, grid[0], grid[1], True).to(device=ref.device, dtype=ref.dtype).unsqueeze(0)
            self._pos_tables[key] = table
        return table

    def prepare_grid(self, size: int, device: torch.device, dtype: torch.dtype) -> None:
        """Build the encoder and decoder tables for a BxB input ahead of the forward (the trainer calls this at
        every stage change, so a compiled forward only ever looks them up)."""
        ref = torch.empty(0, device=device, dtype=dtype)
        grid = (size // self.patch_size, size // self.patch_size)
        self.pos_embed_for(self.embed_dim, grid, ref)
        self.pos_embed_for(self.decoder_embed_dim, grid, ref)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C)."""
        self.grid_size(imgs)  # checks the size
        return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=self.patch_size, q=self.patch_size)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W)."""
        p = self.patch_size
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=grid[0], w=grid[1], p=p, q=p)

    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Per-sample random masking by argsort of noise.

        Returns (x_kept (N, len_keep, D), mask (N, L) with 1 = removed in the original order, ids_restore (N, L)).
        """
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_kept, mask, ids_restore

    # ------------------------------------------------------------------ forward
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        grid = self.grid_size(imgs)
        x = self.patch_embed(imgs)
        pos = self.pos_embed_for(self.embed_dim, grid, x)
        x = x + pos[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = self.cls_token + pos[:, :1, :]
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore, grid

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.decoder_embed(x)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.pos_embed_for(self.decoder_embed_dim, grid, x)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor):
        """MSE over masked patches only, computed in fp32. Returns (mean loss, per-sample loss (N,))."""
        target = self.patchify(imgs).float()
        pred = pred.float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)  # (N, L) per patch
        mask = mask.float()
        per_sample = (loss * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return (loss * mask).sum() / mask.sum().clamp_min(1.0), per_sample

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None,
                target: torch.Tensor | None = None):
        """Returns (loss, per_sample_loss, pred (N, L, p*p*C), mask (N, L)).

        ``target``: the images the loss target is computed from, when they differ from the input (the trainer in
        bf16 passes the fp32 images, as the official AMP loop's target is computed from fp32 pixels while the
        encoder sees low-precision ones); None = ``imgs``, exactly the official model."""
        if target is not None and target.shape != imgs.shape:
            raise ValueError(f"target {tuple(target.shape)} does not match the images {tuple(imgs.shape)}")
        latent, mask, ids_restore, grid = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore, grid)
        loss, per_sample = self.forward_loss(imgs if target is None else target, pred, mask)
        return loss, per_sample, pred, mask

    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Turn predictions back into images (undoing norm-pix with the target patches' statistics)."""
        grid = self.grid_size(imgs)
        pred = pred.float()
        if self.norm_pix_loss:
            target = self.patchify(imgs).float()
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        return self.unpatchify(pred, grid)


def build_mae(cfg) -> MaskedAutoencoderViT:
    """Build from a ``ModelConfig``."""
    return MaskedAutoencoderViT(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, decoder_embed_dim=cfg.decoder_embed_dim,
        decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_num_heads, mlp_ratio=cfg.mlp_ratio,
        norm_pix_loss=cfg.norm_pix_loss,
    )
