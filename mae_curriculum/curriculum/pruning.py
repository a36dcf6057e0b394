"""Loss-based dynamic sample pruning: InfoBatch (ICLR 2024) and SeTa (CVPR 2025), as their authors' code runs them.

Every sample of a split is identified by a global integer id ``0..N-1``. The trainer drives a :class:`Pruner`:

* at the start of each epoch (epoch 0 included), :meth:`Pruner.keep_mask` returns a ``bool[N]`` mask; the
  loader streams only the kept ids;
* after each step, the trainer all-gathers ``(ids, per-sample losses)`` over ranks and calls
  :meth:`Pruner.update` on *every* rank with the same arrays, so all ranks hold identical state;
* :meth:`Pruner.loss_weights` gives per-sample loss multipliers for the current epoch (InfoBatch rescaling;
  1.0 elsewhere).

The mask is a pure function of ``(scores, seed, epoch, progress)``: randomness comes only from a generator
seeded with ``(seed, epoch)``, never from a global RNG, so all ranks compute the same mask without
communicating. ``keep_mask`` is idempotent per epoch: a second call for the epoch of the last computed mask
(e.g. after resuming mid-epoch) returns that stored mask, so the current-epoch weights and the cumulative
counters are not disturbed by updates made since the epoch started.

Rules shared with the authors' code (NUS-HPC-AI-Lab/InfoBatch ``infobatch.py``, mrazhou/SeTa ``seta.py``;
docs/pruning.md lists every difference between the papers, that code and this module):

* **Scores.** Every sample starts with the score :data:`INITIAL_SCORE` (3.0); :meth:`Pruner.update` replaces
  it by the sample's latest finite loss. Unseen samples take part in every rule with that score (they are
  *not* always kept).
* **Keep ratio.** ``keep = min(1, max(0.1, 1 - ratio))`` (:func:`keep_ratio`): a pruning ratio above 0.9 acts
  as 0.9, and InfoBatch's upweighting never exceeds 10x.
* **Counts.** A random subset of a fraction ``f`` of ``n`` items has ``floor(f * n)`` items (their ``int()``).
* **Annealing onset.** Their sampler prunes epoch ``e`` (0-based) while ``e + 1 <= E * delta`` and anneals
  from the first epoch with ``e + 1 > E * delta``. In progress terms: an epoch is annealed when the fraction
  of training done *at its end* exceeds ``delta``. ``progress`` is whatever the trainer's budget counts
  (images under epoch accounting: exactly ``e / E`` at the start of epoch ``e``; FLOPs under compute
  accounting, where a pruned epoch still counts as one full epoch at its stage). Pass ``progress_end``
  (progress at the end of the epoch) to :meth:`Pruner.keep_mask`; without it the pruner assumes the epoch
  adds as much progress as the previous one did (exact under epoch accounting).

SeTa (:class:`SeTa`), per pruning epoch ``e``: (1) thin: a random ``floor(keep * N)`` of *all* samples;
(2) group the thinned samples' scores into ``k`` groups sorted easy -> hard by 1-D k-means
(:func:`loss_groups`; equal scores: ``k`` equal chunks in random order); (3) keep the groups of the window
``[s, s + w)`` with ``w = round(k * alpha)`` (Python's ``round``: halves to even, as in their code) and
``s = e mod (k - w + 1)``; at epoch 0 every group is kept (so epoch 0 keeps the thinned ``keep`` fraction).
Annealing epochs keep a random ``floor(keep * N)`` of all samples. An empty selection keeps one random sample.

InfoBatch (:class:`InfoBatch`), per pruning epoch: well learned = ``score < mean(all N scores)``; a random
``floor(keep * n_well)`` of them are kept with loss weight ``1 / keep``, the rest of them dropped; the others
are kept with weight 1. Epoch 0 keeps everything (all scores equal 3.0, none below the mean). Annealing
epochs keep everything with weight 1.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = [
    "DEFAULT_RATIOS",
    "INITIAL_SCORE",
    "MIN_KEEP_RATIO",
    "PRUNING_METHODS",
    "InfoBatch",
    "NoPruning",
    "Pruner",
    "SeTa",
    "build_pruner",
    "default_ratio",
    "keep_ratio",
    "kmeans_1d",
    "loss_groups",
    "window_size",
]

PRUNING_METHODS: tuple[str, ...] = ("none", "infobatch", "seta")
# Per-method default pruning ratio. SeTa: 0.0, the default of the authors' ImageNet script (their CIFAR
# script uses 0.1); InfoBatch: 0.5, its paper's and code's default.
DEFAULT_RATIOS: dict[str, float] = {"none": 0.0, "infobatch": 0.5, "seta": 0.0}
INITIAL_SCORE = 3.0  # score of a sample with no loss yet (both authors' codes)
MIN_KEEP_RATIO = 0.1  # keep ratio = min(1, max(0.1, 1 - ratio)) (both authors' codes)

_COUNT_EPS = 1e-9  # floor(f * n) guard against float artefacts such as 0.29 * 100 = 28.999999999999996
_PROGRESS_TOL = 1e-6  # progress_end within this of delta counts as "not past delta" (float sums of progress)


# --------------------------------------------------------------------------- helpers
def _validate_params(
    ratio: float | None = None,
    k: int | None = None,
    alpha: float | None = None,
    delta: float | None = None,
) -> None:
    """Raise ``ValueError`` naming the first parameter out of its valid range."""
    if ratio is not None and not (0.0 <= float(ratio) < 1.0):
        raise ValueError(f"pruning ratio must be in [0, 1) (or -1 / None for the method's default); got {ratio!r}")
    if k is not None and (int(k) != k or int(k) < 1):
        raise ValueError(f"pruning k must be an integer >= 1; got {k!r}")
    if alpha is not None and not (0.0 < float(alpha) <= 1.0):
        raise ValueError(f"pruning alpha must be in (0, 1]; got {alpha!r}")
    if delta is not None and not (0.0 < float(delta) <= 1.0):
        raise ValueError(f"pruning delta must be in (0, 1]; got {delta!r}")


def default_ratio(method: str) -> float:
    """The pruning ratio a method uses when the config leaves it at its default (-1 / None)."""
    if method not in DEFAULT_RATIOS:
        raise ValueError(f"unknown pruning method {method!r}; valid: {', '.join(PRUNING_METHODS)}")
    return DEFAULT_RATIOS[method]


def keep_ratio(ratio: float) -> float:
    """Fraction kept by thinning / of the well-learned: ``min(1, max(0.1, 1 - ratio))``."""
    return min(1.0, max(MIN_KEEP_RATIO, 1.0 - float(ratio)))


def _count(fraction: float, n: int) -> int:
    """``floor(fraction * n)``, the size of a random subset (the authors' ``int(...)``)."""
    return min(n, math.floor(fraction * n + _COUNT_EPS))


def _rng(seed: int, epoch: int) -> np.random.Generator:
    """Generator seeded by the pair ``(seed, epoch)`` (no collisions like seed+epoch)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**64, int(epoch)]))


def _random_subset(ids: np.ndarray, keep_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Return ``floor(keep_fraction * len(ids))`` elements of ``ids`` chosen uniformly, in random order."""
    return ids[rng.permutation(ids.size)[: _count(keep_fraction, ids.size)]]


def window_size(k: int, alpha: float) -> int:
    """SeTa window size ``round(k * alpha)`` (Python's round, halves to even), clipped to ``[1, k]``.

    This is the authors' code (``round(num_group * window_scale)``); the paper's text writes ``ceil``. They
    differ when ``k * alpha`` has a fractional part >= 0.5 that rounds down, e.g. their CIFAR setting
    ``k = 5, alpha = 0.9``: round(4.5) = 4 groups of 5, ceil = 5 (every group: random pruning).
    """
    return min(int(k), max(1, round(int(k) * float(alpha))))


_EXACT_MAX_DISTINCT = 1 << 16  # k-means is exact up to this many distinct values (cut candidates above it)


def _optimal_cuts(W: np.ndarray, S1: np.ndarray, S2: np.ndarray, pos: np.ndarray, k: int) -> np.ndarray:
    """Optimal 1-D k-means cuts restricted to the candidate positions ``pos`` (increasing, from 0 to m).

    ``W, S1, S2`` are prefix sums (length ``m + 1``) of the weights, weighted values and weighted squares of
    the sorted distinct values; a cluster is ``values[pos[a]:pos[b]]`` and costs its within-cluster sum of
    squares. Dynamic programming over ``k`` layers; each layer finds every optimal split by divide and
    conquer (the optimal split is monotone in the right end for this cost), all segments of one recursion
    level at once. Returns the ``k - 1`` interior cut positions (indices into the distinct values).
    """
    Wp, S1p, S2p = W[pos], S1[pos], S2[pos]
    last = pos.size - 1

    def cost(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        s = S1p[b] - S1p[a]
        return (S2p[b] - S2p[a]) - s * s / (Wp[b] - Wp[a])

    ends = np.arange(1, last + 1)
    D = np.full(last + 1, np.inf)
    D[1:] = cost(np.zeros(last, dtype=np.int64), ends)
    splits = []
    for c in range(2, k + 1):
        Dn = np.full(last + 1, np.inf)
        split = np.zeros(last + 1, dtype=np.int64)
        jlo, jhi = np.array([c]), np.array([last])  # right ends to solve (inclusive range)
        ilo, ihi = np.array([c - 1]), np.array([last - 1])  # where their optimal split may lie
        while jlo.size:
            mid = (jlo + jhi) // 2
            lens = np.minimum(ihi, mid - 1) - ilo + 1
            offs = np.concatenate(([0], np.cumsum(lens)[:-1]))
            seg = np.repeat(np.arange(mid.size), lens)
            cand = ilo[seg] + (np.arange(seg.size) - offs[seg])
            val = D[cand] + cost(cand, mid[seg])
            best_val = np.minimum.reduceat(val, offs)
            at_min = np.flatnonzero(val <= best_val[seg])
            first = np.concatenate(([True], seg[at_min[1:]] != seg[at_min[:-1]]))
            best = cand[at_min[first]]  # leftmost optimal split of each segment
            Dn[mid], split[mid] = best_val, best
            left, right = jlo <= mid - 1, mid + 1 <= jhi
            jlo, jhi, ilo, ihi = (np.concatenate((jlo[left], mid[right] + 1)),
                                  np.concatenate((mid[left] - 1, jhi[right])),
                                  np.concatenate((ilo[left], best[right])),
                                  np.concatenate((best[left], ihi[right])))
        D = Dn
        splits.append(split)
    cuts, j = [], last
    for split in reversed(splits):
        j = int(split[j])
        cuts.append(int(pos[j]))
    return np.asarray(cuts[::-1], dtype=np.int64)


def _lloyd_refine(u: np.ndarray, W: np.ndarray, S1: np.ndarray, cuts: np.ndarray, max_iter: int) -> np.ndarray:
    """Lloyd iterations on weighted sorted distinct values ``u`` from the partition ``cuts``; returns cuts."""
    m = u.size
    for _ in range(max_iter):
        edges = np.concatenate(([0], cuts, [m]))
        counts = W[edges[1:]] - W[edges[:-1]]
        sums = S1[edges[1:]] - S1[edges[:-1]]
        centroids = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1e-300), u[np.minimum(edges[:-1], m - 1)]))
        new_cuts = np.searchsorted(u, 0.5 * (centroids[:-1] + centroids[1:]), side="right")
        if np.array_equal(new_cuts, cuts):
            break
        cuts = new_cuts
    return cuts


def kmeans_1d(values: np.ndarray, k: int, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means: the partition into ``k`` groups with the least within-group sum of squares.

    Args:
        values: 1-D array of finite values.
        k: number of clusters (>= 1).
        max_iter: Lloyd iterations for the refinement above :data:`_EXACT_MAX_DISTINCT` distinct values.

    Returns:
        ``(labels, centroids)``: ``labels[i]`` in ``0..k-1`` with clusters sorted by ascending centroid
        (0 = lowest values); ``centroids`` is ``float64[k]``, non-decreasing.

    Clusters are intervals of the sorted values and equal values share a cluster. With ``m <= k`` distinct
    values each distinct value is its own cluster ``0..m-1`` and clusters ``m..k-1`` are empty. Otherwise
    the result is the global optimum (dynamic programming over the distinct values, weighted by their counts,
    ``O(k m log m)``), where the authors' code runs scikit-learn's ``KMeans`` (k-means++ and Lloyd: a local
    optimum of the same objective, which depends on its random start). Above ``2**16`` distinct values the
    cuts are restricted to ``2**16`` candidate positions at equal sample counts, the optimum over those is
    found exactly and then refined by Lloyd iterations on all values (about 1 s for 1.28M values, k = 10).
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1; got {k}")
    k = int(k)
    if x.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(k, dtype=np.float64)
    u, counts = np.unique(x, return_counts=True)
    m = u.size
    where = np.searchsorted(u, x)
    if m <= k:
        return where.astype(np.int64), np.concatenate((u, np.full(k - m, u[-1])))
    centred = u - np.dot(u, counts) / x.size  # prefix sums of squares without cancellation
    W = np.concatenate(([0.0], np.cumsum(counts, dtype=np.float64)))
    S1 = np.concatenate(([0.0], np.cumsum(counts * centred)))
    S2 = np.concatenate(([0.0], np.cumsum(counts * centred * centred)))
    if m <= _EXACT_MAX_DISTINCT:
        cuts = _optimal_cuts(W, S1, S2, np.arange(m + 1), k)
    else:
        grid = np.searchsorted(W, np.linspace(0.0, W[-1], _EXACT_MAX_DISTINCT + 1), side="left")
        pos = np.unique(np.concatenate(([0], np.clip(grid, 0, m), [m])))
        cuts = _lloyd_refine(centred, W, S1, _optimal_cuts(W, S1, S2, pos, k), max_iter)
    edges = np.concatenate(([0], cuts, [m]))
    sizes = W[edges[1:]] - W[edges[:-1]]
    means = (S1[edges[1:]] - S1[edges[:-1]]) / np.maximum(sizes, 1e-300)
    centroids = np.where(sizes > 0, means + np.dot(u, counts) / x.size, u[np.minimum(edges[:-1], m - 1)])
    unique_labels = np.searchsorted(cuts, np.arange(m), side="right")
    return unique_labels[where].astype(np.int64), np.maximum.accumulate(centroids)


def loss_groups(scores: np.ndarray, k: int) -> np.ndarray:
    """SeTa's grouping of the thinned samples: a label ``0..k-1`` per score, 0 = easiest.

    All scores equal: ``k`` chunks of (nearly) equal size, in the given order (the random thinning order),
    sizes as ``np.array_split`` (the first ``n mod k`` chunks one larger). Otherwise :func:`kmeans_1d`.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = s.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if s.min() == s.max():
        sizes = np.full(k, n // k, dtype=np.int64)
        sizes[: n % k] += 1
        return np.repeat(np.arange(k, dtype=np.int64), sizes)
    labels, _ = kmeans_1d(s, k)
    return labels


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).copy())


def _to_numpy(t: Any, dtype: type) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy().astype(dtype, copy=True)
    return np.asarray(t, dtype=dtype).copy()


# --------------------------------------------------------------------------- base
class Pruner:
    """Base pruner: stores the latest score of every sample and keeps all samples.

    Subclasses override :meth:`_select`.
    """

    method: str = "base"
    delta: float = 1.0

    def __init__(self, num_samples: int, seed: int) -> None:
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1; got {num_samples!r}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self._scores = np.full(self.num_samples, INITIAL_SCORE, dtype=np.float64)
        self._seen = np.zeros(self.num_samples, dtype=bool)
        self._mask = np.ones(self.num_samples, dtype=bool)
        self._weights = np.ones(self.num_samples, dtype=np.float32)
        self._mask_epoch = -1
        self._mask_progress = 0.0
        self._window_start = -1
        self._annealing = False
        self.cumulative_kept = 0
        self.cumulative_total = 0

    # -- state updates -------------------------------------------------------
    def update(self, ids: np.ndarray, losses: np.ndarray) -> None:
        """Record the latest loss of each id as its score and mark it seen.

        Non-finite losses are ignored (the id keeps its previous score). With repeated ids in one call, the
        last occurrence wins (numpy semantics; identical on every rank since every rank gets the same arrays).
        """
        ids_a = np.asarray(ids).reshape(-1)
        loss_a = np.asarray(losses, dtype=np.float64).reshape(-1)
        if ids_a.shape != loss_a.shape:
            raise ValueError(f"ids and losses must have the same length; got {ids_a.size} and {loss_a.size}")
        if ids_a.size == 0:
            return
        if not np.issubdtype(ids_a.dtype, np.integer):
            raise ValueError(f"ids must be integers; got dtype {ids_a.dtype}")
        if ids_a.min() < 0 or ids_a.max() >= self.num_samples:
            raise ValueError(f"ids must be in [0, {self.num_samples}); got range [{ids_a.min()}, {ids_a.max()}]")
        finite = np.isfinite(loss_a)
        ids_f = ids_a[finite].astype(np.int64)
        self._scores[ids_f] = loss_a[finite]
        self._seen[ids_f] = True

    def annealing(self, progress_end: float) -> bool:
        """True when an epoch ending at ``progress_end`` is past ``delta`` of training (authors' ``e + 1 > E*delta``)."""
        return progress_end > self.delta + _PROGRESS_TOL

    def keep_mask(self, epoch: int, progress: float, progress_end: float | None = None) -> np.ndarray:
        """Return the ``bool[N]`` keep-mask for ``epoch``.

        Args:
            epoch: epoch index (>= 0).
            progress: fraction of training done at the start of the epoch, in [0, 1].
            progress_end: fraction of training done at its end (the progress one full epoch at the current
                stage adds, on top of ``progress``). None: assume the epoch adds what the previous epoch
                (the last computed mask) added per epoch; 0 before any epoch.
        """
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0; got {epoch!r}")
        if not (0.0 <= float(progress) <= 1.0):
            raise ValueError(f"progress must be in [0, 1]; got {progress!r}")
        epoch, progress = int(epoch), float(progress)
        if epoch != self._mask_epoch:
            if progress_end is None:
                step = 0.0
                if 0 <= self._mask_epoch < epoch:
                    step = max(0.0, (progress - self._mask_progress) / (epoch - self._mask_epoch))
                progress_end = progress + step
            elif not float(progress_end) >= progress:
                raise ValueError(f"progress_end must be >= progress ({progress}); got {progress_end!r}")
            annealing = self.annealing(float(progress_end))
            mask, weights, window_start = self._select(epoch, annealing)
            self._mask = mask
            self._weights = np.ones(self.num_samples, dtype=np.float32) if weights is None else weights
            self._window_start = window_start
            self._annealing = annealing
            self._mask_epoch = epoch
            self._mask_progress = progress
            self.cumulative_kept += int(mask.sum())
            self.cumulative_total += self.num_samples
        return self._mask.copy()

    def _select(self, epoch: int, annealing: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
        """Return ``(mask, weights or None for all-ones, window_start)``."""
        return np.ones(self.num_samples, dtype=bool), None, -1

    def loss_weights(self, ids: np.ndarray) -> np.ndarray:
        """Per-sample loss multipliers (``float32``) for the current epoch."""
        ids_a = np.asarray(ids).reshape(-1).astype(np.int64)
        return self._weights[ids_a].copy()

    # -- logging -------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Scalars for TensorBoard, describing the last computed mask."""
        num_kept = int(self._mask.sum())
        kept = num_kept / self.num_samples
        saved = 1.0 - self.cumulative_kept / self.cumulative_total if self.cumulative_total else 0.0
        return {
            "kept_fraction": kept,
            "pruned_fraction": 1.0 - kept,
            "num_kept": float(num_kept),
            "window_start": float(self._window_start),
            "annealing": float(self._annealing),
            "seen_fraction": float(self._seen.mean()),
            "upweighted_fraction": float((self._weights != 1.0).mean()),
            "cumulative_kept": float(self.cumulative_kept),
            "cumulative_total": float(self.cumulative_total),
            "compute_saved": saved,
        }

    # -- checkpointing -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """State as torch tensors and python scalars (safe for ``weights_only=True``)."""
        return {
            "method": self.method,
            "num_samples": self.num_samples,
            "losses": _to_tensor(self._scores),
            "seen": _to_tensor(self._seen),
            "mask": _to_tensor(self._mask),
            "weights": _to_tensor(self._weights),
            "mask_epoch": int(self._mask_epoch),
            "mask_progress": float(self._mask_progress),
            "window_start": int(self._window_start),
            "annealing": bool(self._annealing),
            "cumulative_kept": int(self.cumulative_kept),
            "cumulative_total": int(self.cumulative_total),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (method and ``num_samples`` must match).

        States written before scores started at :data:`INITIAL_SCORE` (unseen losses stored as 0) load too:
        an unseen sample's score is set to :data:`INITIAL_SCORE` whatever was stored.
        """
        if d.get("method") != self.method:
            raise ValueError(f"pruner state is for method {d.get('method')!r}, not {self.method!r}")
        if int(d["num_samples"]) != self.num_samples:
            raise ValueError(f"pruner state has num_samples={d['num_samples']}, expected {self.num_samples}")
        n = self.num_samples
        arrays = {
            "losses": _to_numpy(d["losses"], np.float64),
            "seen": _to_numpy(d["seen"], bool),
            "mask": _to_numpy(d["mask"], bool),
            "weights": _to_numpy(d["weights"], np.float32),
        }
        for name, a in arrays.items():
            if a.shape != (n,):
                raise ValueError(f"pruner state {name!r} has shape {a.shape}, expected ({n},)")
        self._seen = arrays["seen"]
        self._scores = np.where(self._seen, arrays["losses"], INITIAL_SCORE)
        self._mask, self._weights = arrays["mask"], arrays["weights"]
        self._mask_epoch = int(d["mask_epoch"])
        self._mask_progress = float(d.get("mask_progress", 0.0))
        self._window_start = int(d["window_start"])
        self._annealing = bool(d.get("annealing", False))
        self.cumulative_kept = int(d["cumulative_kept"])
        self.cumulative_total = int(d["cumulative_total"])


# --------------------------------------------------------------------------- methods
class NoPruning(Pruner):
    """Keeps every sample with weight 1."""

    method = "none"


class InfoBatch(Pruner):
    """InfoBatch: randomly drop a fraction of the well-learned samples, upweight the kept ones.

    Pruning epoch: well learned = ``score < mean(score of all N samples)`` (unseen samples count with
    :data:`INITIAL_SCORE`); a random ``floor(keep * n_well)`` of them (``keep = keep_ratio(ratio)``, chosen
    with the ``(seed, epoch)`` generator) are kept with loss weight ``1 / keep``, the other well-learned ones
    are dropped; every other sample is kept with weight 1. Annealing epochs (see :meth:`Pruner.annealing`)
    keep everything with weight 1.
    """

    method = "infobatch"

    def __init__(self, num_samples: int, seed: int, ratio: float = DEFAULT_RATIOS["infobatch"],
                 delta: float = 0.875) -> None:
        _validate_params(ratio=ratio, delta=delta)
        super().__init__(num_samples, seed)
        self.ratio = float(ratio)
        self.keep = keep_ratio(self.ratio)
        self.delta = float(delta)

    def _select(self, epoch: int, annealing: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
        mask = np.ones(self.num_samples, dtype=bool)
        if annealing or self.keep >= 1.0:
            return mask, None, -1
        well = np.flatnonzero(self._scores < self._scores.mean())
        kept_well = _random_subset(well, self.keep, _rng(self.seed, epoch))
        mask[well] = False
        mask[kept_well] = True
        weights = np.ones(self.num_samples, dtype=np.float32)
        weights[kept_well] = np.float32(1.0 / self.keep)
        return mask, weights, -1


class SeTa(Pruner):
    """SeTa: random thinning + a sliding window over loss-sorted groups (see the module docstring).

    * Pruning epoch ``e``: thin to a random ``floor(keep * N)`` of all samples (``keep = keep_ratio(ratio)``);
      group their scores with :func:`loss_groups` (k-means into ``k`` groups sorted easy -> hard; equal
      scores: ``k`` equal chunks); keep the groups ``[s, s + w)``, ``w = window_size(k, alpha)``,
      ``s = e mod (k - w + 1)``; epoch 0 keeps every group.
    * Annealing epoch: a random ``floor(keep * N)`` of all samples ("partial annealing").

    Unseen samples take part with :data:`INITIAL_SCORE`. An empty selection keeps one random sample. Loss
    weights are 1.
    """

    method = "seta"

    def __init__(
        self,
        num_samples: int,
        seed: int,
        ratio: float = DEFAULT_RATIOS["seta"],
        k: int = 10,
        alpha: float = 0.6,
        delta: float = 0.875,
    ) -> None:
        _validate_params(ratio=ratio, k=k, alpha=alpha, delta=delta)
        super().__init__(num_samples, seed)
        self.ratio = float(ratio)
        self.keep = keep_ratio(self.ratio)
        self.k = int(k)
        self.alpha = float(alpha)
        self.delta = float(delta)
        self.window = window_size(self.k, self.alpha)

    def window_start(self, epoch: int) -> int:
        """First group of the window at ``epoch`` (epoch 0 keeps every group)."""
        return epoch % (self.k - self.window + 1)

    def _select(self, epoch: int, annealing: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
        n = self.num_samples
        rng = _rng(self.seed, epoch)
        mask = np.zeros(n, dtype=bool)
        if annealing:
            mask[_random_subset(np.arange(n), self.keep, rng)] = True
            return mask, None, -1
        thinned = _random_subset(np.arange(n), self.keep, rng)
        labels = loss_groups(self._scores[thinned], self.k)
        if epoch == 0:
            start, chosen = -1, thinned
        else:
            start = self.window_start(epoch)
            chosen = thinned[(labels >= start) & (labels < start + self.window)]
        if chosen.size == 0:  # as the authors' code: never an empty epoch
            chosen = rng.integers(0, n, size=1)
        mask[chosen] = True
        return mask, None, start


# --------------------------------------------------------------------------- factory
def build_pruner(method: str, num_samples: int, seed: int, **kwargs: Any) -> Pruner:
    """Build a pruner by name: ``"none"`` | ``"infobatch"`` | ``"seta"``.

    Accepted kwargs: ``ratio``, ``k``, ``alpha``, ``delta``. ``ratio`` None or -1 means the method's default
    (:data:`DEFAULT_RATIOS`). All given values are validated (``ValueError`` naming the parameter) even when
    the method does not use them, so a config is rejected the same way whatever the method; each method then
    takes the ones it uses.
    """
    allowed = {"ratio", "k", "alpha", "delta"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"unknown pruning parameter(s) {unknown}; expected some of {sorted(allowed)}")
    if method not in PRUNING_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; valid: {', '.join(PRUNING_METHODS)}")
    if "ratio" in kwargs and (kwargs["ratio"] is None or float(kwargs["ratio"]) == -1.0):
        kwargs["ratio"] = default_ratio(method)
    _validate_params(**kwargs)
    if method == "none":
        return NoPruning(num_samples, seed)
    if method == "infobatch":
        return InfoBatch(num_samples, seed, **{key: kwargs[key] for key in ("ratio", "delta") if key in kwargs})
    return SeTa(num_samples, seed, **kwargs)
