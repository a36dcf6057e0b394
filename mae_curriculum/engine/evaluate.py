"""Top-1 / top-5 over a validation split, distributed: each rank evaluates its chunk (``data.eval_loader``),
padded entries are masked out, and the counts are summed over ranks (one all-reduce), so every sample counts
exactly once whatever the world size and batch size. Also: frozen-feature extraction for the linear probe.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mae_curriculum.data.eval_loader import EvalLoader
from mae_curriculum.engine.pretrain import normalise


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], loader: EvalLoader, mean: torch.Tensor,
             std: torch.Tensor, dev: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """``forward`` maps a normalised image batch to logits (the caller sets eval mode). Returns top1 / top5 (%),
    mean cross-entropy ``loss``, ``count`` (samples scored, all ranks), ``id_sum`` (sum of their ids: a check
    that each was scored once) and ``unreadable`` (images that could not be decoded, not scored)."""
    # [correct@1, correct@5, loss sum, count, id sum, unreadable] in float64 (exact for id sums < 2^53)
    acc = torch.zeros(6, dtype=torch.float64, device=dev)
    for batch in loader:
        valid = batch["valid"].to(dev)
        labels = batch["label"].to(dev)
        x = normalise(batch["image"], mean, std, dev)
        logits = forward(x.to(dtype)).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == labels[:, None]
        vf = valid.double()
        loss = F.cross_entropy(logits, labels.clamp_min(0), reduction="none").double()
        acc += torch.stack([(hit[:, 0].double() * vf).sum(), (hit.any(1).double() * vf).sum(), (loss * vf).sum(),
                            vf.sum(), (batch["id"].to(dev).double() * vf).sum(),
                            batch["unreadable"].to(dev).double().sum()])
    acc = _all_reduce_sum(acc).tolist()
    n = max(acc[3], 1.0)
    return {"top1": 100.0 * acc[0] / n, "top5": 100.0 * acc[1] / n, "loss": acc[2] / n, "count": int(acc[3]),
            "id_sum": int(acc[4]), "unreadable": int(acc[5])}


@torch.no_grad()
def extract_features(features: Callable[[torch.Tensor], torch.Tensor], loader: EvalLoader, mean: torch.Tensor,
                     std: torch.Tensor, dev: torch.device, num_samples: int,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample of the split, on every rank (CPU float32, indexed by sample id;
    label -1 for an unreadable sample). Each rank extracts its chunk; the chunks are summed over ranks."""
    feats: torch.Tensor | None = None
    labels = torch.zeros(num_samples, dtype=torch.int64, device=dev)
    for batch in loader:
        valid = batch["valid"].to(dev)
        f = features(normalise(batch["image"], mean, std, dev).to(dtype)).float()
        if feats is None:
            feats = torch.zeros(num_samples, f.shape[1], device=dev)
        ids = batch["id"].to(dev)[valid]
        feats[ids] = f[valid]
        labels[ids] = batch["label"].to(dev)[valid] + 1  # +1: 0 = not filled here (summed over ranks below)
    if feats is None:
        raise ValueError("no batches to extract features from")
    _all_reduce_sum(feats)
    _all_reduce_sum(labels)
    return feats.cpu(), (labels - 1).cpu()


class FeatureCache:
    """The linear probe's fast path (no augmentation): frozen features of both splits, extracted once and held
    on every rank; epochs then draw batches from a seeded permutation split over ranks."""

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor], train: EvalLoader, val: EvalLoader,
                 mean: torch.Tensor, std: torch.Tensor, dev: torch.device):
        self.dev = dev
        self.train = extract_features(features, train, mean, std, dev, train.index.num_samples)
        self.val = extract_features(features, val, mean, std, dev, val.index.num_samples)
        self.train_ids = torch.nonzero(self.train[1] >= 0).flatten()

    def steps_per_epoch(self, world: int, batch: int, multiple: int = 1) -> int:
        steps = len(self.train_ids) // (world * batch)
        return steps - steps % multiple

    def batches(self, epoch: int, start: int, steps: int, batch: int, world: int, rank: int, seed: int):
        """(features, labels) for steps ``start..steps-1`` of ``epoch`` on ``rank``."""
        order = self.train_ids[torch.randperm(len(self.train_ids),
                                              generator=torch.Generator().manual_seed(seed * 100_003 + epoch))]
        mine = order[rank * steps * batch:(rank + 1) * steps * batch]
        for s in range(start, steps):
            ids = mine[s * batch:(s + 1) * batch]
            yield self.train[0][ids].to(self.dev), self.train[1][ids].to(self.dev)

    @torch.no_grad()
    def evaluate(self, head: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """Same keys as :func:`evaluate`, over the cached validation features (all of them, on every rank)."""
        feats, labels = self.val
        keep = labels >= 0
        logits = head(feats[keep].to(self.dev)).float().cpu()
        top = logits.topk(min(5, logits.shape[1]), 1).indices == labels[keep, None]
        n = max(int(keep.sum()), 1)
        return {"top1": 100.0 * top[:, 0].sum().item() / n, "top5": 100.0 * top.any(1).sum().item() / n,
                "loss": F.cross_entropy(logits, labels[keep]).item(), "count": int(keep.sum()),
                "id_sum": int(torch.nonzero(keep).sum()), "unreadable": int((~keep).sum())}


__all__ = ["evaluate", "extract_features", "FeatureCache"]
