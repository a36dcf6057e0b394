"""Loss-based dynamic sample pruning: InfoBatch (ICLR 2024) and SeTa (CVPR 2025).

Every sample of a split is identified by a global integer id ``0..N-1``. The
trainer drives a :class:`Pruner` as follows:

* at the start of each epoch, :meth:`Pruner.keep_mask` returns a ``bool[N]``
  mask; the loader streams only the kept ids;
* after each step, the trainer all-gathers ``(ids, per-sample losses)`` over
  ranks and calls :meth:`Pruner.update` on *every* rank with the same arrays,
  so all ranks hold identical state;
* :meth:`Pruner.loss_weights` gives per-sample loss multipliers for the current
  epoch (InfoBatch rescaling; 1.0 elsewhere).

The mask is a pure function of ``(state, seed, epoch, progress)``: randomness
comes only from a generator seeded with ``(seed, epoch)``, never from a global
RNG, so all ranks compute the same mask without communicating.

``keep_mask`` is idempotent per epoch: a second call for the epoch of the last
computed mask (e.g. after resuming mid-epoch from a checkpoint) returns that
stored mask, so the current-epoch weights and the cumulative counters are not
disturbed by updates made since the epoch started.

Invariant for every method and phase: never-seen samples are always kept
(they have no loss yet, cf. InfoBatch's large initial score).

Definition choices (see REFERENCE.md, "SeTa (CVPR 2025) and InfoBatch"):

* SeTa window size is ``w = ceil(alpha * k)`` (the issue's definition; the
  reference notes say ``round``; they differ only when ``alpha * k`` has a
  fractional part, e.g. ``ceil(0.55 * 10) = 6`` vs ``round(5.5) = 6`` but
  ``ceil(0.65 * 10) = 7`` vs ``round(6.5) = 6``). A tiny tolerance guards
  against float artefacts such as ``0.28 * 25 = 7.000000000000001``.
* 1-D k-means is deterministic: centroids start at the ``(i + 0.5) / k``
  nearest-rank quantiles of the sorted values, then Lloyd iterations run until
  the assignment stops changing (at most ``max_iter``). Empty clusters (ties,
  fewer distinct values than ``k``) are allowed and keep their centroid.
* Random subsets take an exact count: ``round(fraction * n)`` items.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = [
    "Pruner",
    "NoPruning",
    "InfoBatch",
    "SeTa",
    "build_pruner",
    "kmeans_1d",
    "window_size",
    "PRUNING_METHODS",
]

PRUNING_METHODS: tuple[str, ...] = ("none", "infobatch", "seta")

_EPS = 1e-9


# --------------------------------------------------------------------------- helpers
def _validate_params(
    ratio: float | None = None,
    k: int | None = None,
    alpha: float | None = None,
    delta: float | None = None,
) -> None:
    """Raise ``ValueError`` naming the first parameter out of its valid range."""
    if ratio is not None and not (0.0 <= float(ratio) < 1.0):
        raise ValueError(f"pruning ratio must be in [0, 1); got {ratio!r}")
    if k is not None and (int(k) != k or int(k) < 1):
        raise ValueError(f"pruning k must be an integer >= 1; got {k!r}")
    if alpha is not None and not (0.0 < float(alpha) <= 1.0):
        raise ValueError(f"pruning alpha must be in (0, 1]; got {alpha!r}")
    if delta is not None and not (0.0 < float(delta) <= 1.0):
        raise ValueError(f"pruning delta must be in (0, 1]; got {delta!r}")


def _rng(seed: int, epoch: int) -> np.random.Generator:
    """Generator seeded by the pair ``(seed, epoch)`` (no collisions like seed+epoch)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**64, int(epoch)]))


def _random_subset(ids: np.ndarray, keep_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Return ``round(keep_fraction * len(ids))`` elements of ``ids`` chosen uniformly."""
    n_keep = int(round(keep_fraction * ids.size))
    if n_keep >= ids.size:
        return ids
    return ids[rng.permutation(ids.size)[:n_keep]]


def window_size(k: int, alpha: float) -> int:
    """SeTa window size ``ceil(alpha * k)``, clipped to ``[1, k]``."""
    return min(k, max(1, math.ceil(alpha * k - _EPS)))


def kmeans_1d(values: np.ndarray, k: int, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic 1-D k-means.

    Args:
        values: 1-D array of finite values.
        k: number of clusters (>= 1).
        max_iter: maximum number of Lloyd iterations.

    Returns:
        ``(labels, centroids)``: ``labels[i]`` in ``0..k-1`` with clusters sorted
        by ascending centroid (0 = lowest values); ``centroids`` is ``float64[k]``,
        non-decreasing. Clusters may be empty (duplicates / few distinct values).

    In 1-D every cluster is an interval, so on sorted values the assignment is
    given by ``k - 1`` cut positions and cluster sums by prefix sums: each
    iteration costs ``O(k log n)`` after one ``O(n log n)`` sort.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if x.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(k, dtype=np.float64)
    xs = np.sort(x)
    n = xs.size
    csum = np.concatenate(([0.0], np.cumsum(xs)))
    quant_idx = np.minimum(((np.arange(k) + 0.5) / k * n).astype(np.int64), n - 1)
    centroids = xs[quant_idx].copy()
    cuts: np.ndarray | None = None
    for _ in range(max_iter):
        centroids.sort()
        bounds = 0.5 * (centroids[:-1] + centroids[1:])
        # a value v goes to cluster j = #{bounds < v}; cluster j = xs[edges[j]:edges[j+1]]
        new_cuts = np.searchsorted(xs, bounds, side="right")
        if cuts is not None and np.array_equal(new_cuts, cuts):
            break
        cuts = new_cuts
        edges = np.concatenate(([0], cuts, [n]))
        counts = np.diff(edges)
        sums = csum[edges[1:]] - csum[edges[:-1]]
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty]
    centroids.sort()
    bounds = 0.5 * (centroids[:-1] + centroids[1:])
    labels = np.searchsorted(bounds, x, side="left").astype(np.int64)
    return labels, centroids


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).copy())


def _to_numpy(t: Any, dtype: type) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy().astype(dtype, copy=True)
    return np.asarray(t, dtype=dtype).copy()


# --------------------------------------------------------------------------- base
class Pruner:
    """Base pruner: stores the latest loss of every sample and keeps all samples.

    Subclasses override :meth:`_select`.
    """

    method: str = "base"

    def __init__(self, num_samples: int, seed: int) -> None:
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1; got {num_samples!r}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self._losses = np.zeros(self.num_samples, dtype=np.float64)
        self._seen = np.zeros(self.num_samples, dtype=bool)
        self._mask = np.ones(self.num_samples, dtype=bool)
        self._weights = np.ones(self.num_samples, dtype=np.float32)
        self._mask_epoch = -1
        self._window_start = -1
        self.cumulative_kept = 0
        self.cumulative_total = 0

    # -- state updates -------------------------------------------------------
    def update(self, ids: np.ndarray, losses: np.ndarray) -> None:
        """Record the latest loss of each id and mark it seen.

        Non-finite losses are ignored (the id keeps its previous state). With
        repeated ids in one call, the last occurrence wins (numpy semantics;
        identical on every rank since every rank gets the same arrays).
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
        self._losses[ids_f] = loss_a[finite]
        self._seen[ids_f] = True

    def keep_mask(self, epoch: int, progress: float) -> np.ndarray:
        """Return the ``bool[N]`` keep-mask for ``epoch``.

        Args:
            epoch: epoch index (>= 0).
            progress: fraction of training done at the start of the epoch, in [0, 1].
        """
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0; got {epoch!r}")
        if not (0.0 <= float(progress) <= 1.0):
            raise ValueError(f"progress must be in [0, 1]; got {progress!r}")
        epoch = int(epoch)
        if epoch != self._mask_epoch:
            mask, weights, window_start = self._select(epoch, float(progress))
            mask = mask | ~self._seen  # never-seen samples are always kept
            self._mask = mask
            self._weights = np.ones(self.num_samples, dtype=np.float32) if weights is None else weights
            self._window_start = window_start
            self._mask_epoch = epoch
            self.cumulative_kept += int(mask.sum())
            self.cumulative_total += self.num_samples
        return self._mask.copy()

    def _select(self, epoch: int, progress: float) -> tuple[np.ndarray, np.ndarray | None, int]:
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
            "losses": _to_tensor(self._losses),
            "seen": _to_tensor(self._seen),
            "mask": _to_tensor(self._mask),
            "weights": _to_tensor(self._weights),
            "mask_epoch": int(self._mask_epoch),
            "window_start": int(self._window_start),
            "cumulative_kept": int(self.cumulative_kept),
            "cumulative_total": int(self.cumulative_total),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (method and ``num_samples`` must match)."""
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
        self._losses, self._seen = arrays["losses"], arrays["seen"]
        self._mask, self._weights = arrays["mask"], arrays["weights"]
        self._mask_epoch = int(d["mask_epoch"])
        self._window_start = int(d["window_start"])
        self.cumulative_kept = int(d["cumulative_kept"])
        self.cumulative_total = int(d["cumulative_total"])


# --------------------------------------------------------------------------- methods
class NoPruning(Pruner):
    """Keeps every sample with weight 1."""

    method = "none"


class InfoBatch(Pruner):
    """InfoBatch: randomly drop a fraction ``ratio`` of well-learned samples.

    At epoch start, if ``progress < delta``: well-learned = seen and
    ``loss < mean(loss over seen)``; ``round((1 - ratio) * n_well)`` of them,
    chosen with the ``(seed, epoch)`` generator, are kept and the rest dropped;
    the kept well-learned ones get loss weight ``1 / (1 - ratio)``; all other
    samples are kept with weight 1. From ``progress >= delta`` on, everything is kept with weight 1.
    """

    method = "infobatch"

    def __init__(self, num_samples: int, seed: int, ratio: float = 0.5, delta: float = 0.875) -> None:
        _validate_params(ratio=ratio, delta=delta)
        super().__init__(num_samples, seed)
        self.ratio = float(ratio)
        self.delta = float(delta)

    def _select(self, epoch: int, progress: float) -> tuple[np.ndarray, np.ndarray | None, int]:
        mask = np.ones(self.num_samples, dtype=bool)
        if progress >= self.delta or self.ratio == 0.0 or not self._seen.any():
            return mask, None, -1
        mean = self._losses[self._seen].mean()
        well = np.flatnonzero(self._seen & (self._losses < mean))
        kept_well = _random_subset(well, 1.0 - self.ratio, _rng(self.seed, epoch))
        mask[well] = False
        mask[kept_well] = True
        weights = np.ones(self.num_samples, dtype=np.float32)
        weights[kept_well] = np.float32(1.0 / (1.0 - self.ratio))
        return mask, weights, -1


class SeTa(Pruner):
    """SeTa: random thinning + sliding window over loss-sorted k-means groups.

    * Epoch 0, or nothing seen yet: keep all.
    * ``progress < delta``: (1) keep a random ``1 - ratio`` fraction of the
      seen pool; (2) 1-D k-means (:func:`kmeans_1d`) of their losses into
      ``k`` groups sorted easy -> hard; (3) keep the thinned samples whose
      group lies in the window ``[s, s + w)`` with ``w = ceil(alpha * k)`` and
      ``s = epoch mod (k - w + 1)`` (cyclic advance).
    * ``progress >= delta`` (partial annealing): keep a random ``1 - ratio``
      fraction of all samples.

    Never-seen samples are always kept. Loss weights are 1.
    """

    method = "seta"

    def __init__(
        self,
        num_samples: int,
        seed: int,
        ratio: float = 0.5,
        k: int = 10,
        alpha: float = 0.6,
        delta: float = 0.875,
    ) -> None:
        _validate_params(ratio=ratio, k=k, alpha=alpha, delta=delta)
        super().__init__(num_samples, seed)
        self.ratio = float(ratio)
        self.k = int(k)
        self.alpha = float(alpha)
        self.delta = float(delta)
        self.window = window_size(self.k, self.alpha)

    def window_start(self, epoch: int) -> int:
        """First group of the window at ``epoch``."""
        return epoch % (self.k - self.window + 1)

    def _select(self, epoch: int, progress: float) -> tuple[np.ndarray, np.ndarray | None, int]:
        n = self.num_samples
        if epoch == 0 or not self._seen.any():
            return np.ones(n, dtype=bool), None, -1
        rng = _rng(self.seed, epoch)
        mask = np.zeros(n, dtype=bool)
        if progress >= self.delta:
            mask[_random_subset(np.arange(n), 1.0 - self.ratio, rng)] = True
            return mask, None, -1
        thinned = np.sort(_random_subset(np.flatnonzero(self._seen), 1.0 - self.ratio, rng))
        labels, _ = kmeans_1d(self._losses[thinned], self.k)
        start = self.window_start(epoch)
        in_window = (labels >= start) & (labels < start + self.window)
        mask[thinned[in_window]] = True
        return mask, None, start


# --------------------------------------------------------------------------- factory
def build_pruner(method: str, num_samples: int, seed: int, **kwargs: Any) -> Pruner:
    """Build a pruner by name: ``"none"`` | ``"infobatch"`` | ``"seta"``.

    Accepted kwargs: ``ratio``, ``k``, ``alpha``, ``delta``. All given values are
    validated (``ValueError`` naming the parameter) even when the method does
    not use them, so a config is rejected the same way whatever the method;
    each method then takes the ones it uses.
    """
    allowed = {"ratio", "k", "alpha", "delta"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"unknown pruning parameter(s) {unknown}; expected some of {sorted(allowed)}")
    if method not in PRUNING_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; valid: {', '.join(PRUNING_METHODS)}")
    _validate_params(**kwargs)
    if method == "none":
        return NoPruning(num_samples, seed)
    if method == "infobatch":
        return InfoBatch(num_samples, seed, **{key: kwargs[key] for key in ("ratio", "delta") if key in kwargs})
    return SeTa(num_samples, seed, **kwargs)
