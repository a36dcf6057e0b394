"""Tests for mae_curriculum.curriculum.pruning (InfoBatch, SeTa, k-means, checkpointing)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from mae_curriculum.curriculum.pruning import (
    PRUNING_METHODS,
    InfoBatch,
    NoPruning,
    Pruner,
    SeTa,
    build_pruner,
    kmeans_1d,
    window_size,
)

N_GROUPS = 10
GROUP_SIZE = 200
N = N_GROUPS * GROUP_SIZE


def grouped_losses(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return (group of each id, loss of each id): 10 well-separated loss groups.

    Group membership is a random permutation of ids so it is unrelated to id order;
    group g has losses in [10 g, 10 g + 1).
    """
    rng = np.random.default_rng(seed)
    group = rng.permutation(N) // GROUP_SIZE
    losses = 10.0 * group + rng.random(N)
    return group, losses


def feed(p: Pruner, ids: np.ndarray, losses: np.ndarray, chunk: int = 64) -> None:
    """Feed (ids, losses) in step-sized chunks, like the trainer does after each step."""
    for i in range(0, ids.size, chunk):
        p.update(ids[i : i + chunk], losses[i : i + chunk])


def expected_thinned(seed: int, epoch: int, seen_ids: np.ndarray, ratio: float) -> np.ndarray:
    """Reimplementation of the documented thinning contract: permutation from
    SeedSequence([seed, epoch]), first round((1-ratio) * n) of the sorted seen ids."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    n_keep = int(round((1 - ratio) * seen_ids.size))
    return seen_ids[rng.permutation(seen_ids.size)[:n_keep]]


# --------------------------------------------------------------------------- k-means
def test_kmeans_recovers_separated_groups_sorted_easy_to_hard() -> None:
    group, losses = grouped_losses(1)
    labels, centroids = kmeans_1d(losses, N_GROUPS)
    np.testing.assert_array_equal(labels, group)
    assert np.all(np.diff(centroids) > 0)
    for g in range(N_GROUPS):
        assert centroids[g] == pytest.approx(losses[group == g].mean())


def test_kmeans_is_a_lloyd_fixed_point_on_random_data() -> None:
    x = np.random.default_rng(2).normal(size=5000) ** 3
    labels, c = kmeans_1d(x, 7)
    nearest = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
    np.testing.assert_array_equal(labels, nearest)
    for j in range(7):
        if np.any(labels == j):
            assert c[j] == pytest.approx(x[labels == j].mean())
    # labels are monotone in the value (clusters are intervals, sorted easy -> hard)
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(labels[order]) >= 0)


@pytest.mark.parametrize(
    "values",
    [
        np.array([1.0, 1.0, 1.0, 2.0, 2.0, 5.0, 5.0, 5.0, 5.0]),
        np.full(50, 3.0),
        np.array([7.0]),
        np.repeat([0.5, 0.25], 40),
    ],
)
def test_kmeans_fewer_distinct_values_than_k(values: np.ndarray) -> None:
    labels, c = kmeans_1d(values, 10)
    assert labels.shape == values.shape
    assert labels.min() >= 0 and labels.max() < 10
    distinct = np.unique(values)
    # one non-empty cluster per distinct value, equal values share a label, order preserved
    assert np.unique(labels).size == distinct.size
    per_value = [np.unique(labels[values == v]) for v in distinct]
    assert all(u.size == 1 for u in per_value)
    assert all(per_value[i][0] < per_value[i + 1][0] for i in range(len(per_value) - 1))
    assert np.all(np.isfinite(c)) and np.all(np.diff(c) >= 0)


def test_kmeans_k1_and_empty() -> None:
    labels, c = kmeans_1d(np.array([3.0, 1.0, 2.0]), 1)
    np.testing.assert_array_equal(labels, [0, 0, 0])
    assert c[0] == pytest.approx(2.0)
    labels, _ = kmeans_1d(np.zeros(0), 4)
    assert labels.size == 0


# --------------------------------------------------------------------------- window size
def test_window_size_uses_ceil_and_is_robust_to_float_artefacts() -> None:
    assert 0.28 * 25 > 7  # the float artefact this guards against
    assert window_size(25, 0.28) == 7
    assert window_size(10, 0.7) == 7
    assert window_size(10, 0.6) == 6
    assert window_size(10, 0.65) == 7  # ceil; round(6.5) would give 6
    assert window_size(10, 0.55) == 6
    assert window_size(10, 1.0) == 10
    assert window_size(10, 0.01) == 1
    assert window_size(3, 0.5) == 2


# --------------------------------------------------------------------------- SeTa
@pytest.mark.parametrize("ratio", [0.0, 0.3])
def test_seta_keeps_exactly_thinned_samples_in_window_groups(ratio: float) -> None:
    group, losses = grouped_losses(3)
    seed, k, alpha = 11, 10, 0.6
    p = SeTa(N, seed, ratio=ratio, k=k, alpha=alpha, delta=0.875)
    feed(p, np.arange(N), losses)
    w = math.ceil(alpha * k)
    for epoch in range(1, 8):
        start = epoch % (k - w + 1)
        window_groups = np.arange(start, start + w)
        thinned = expected_thinned(seed, epoch, np.arange(N), ratio)
        expected = np.zeros(N, dtype=bool)
        expected[thinned[np.isin(group[thinned], window_groups)]] = True
        mask = p.keep_mask(epoch, progress=epoch / 100)
        np.testing.assert_array_equal(mask, expected)
        assert p.stats()["window_start"] == start
        np.testing.assert_array_equal(p.loss_weights(np.arange(N)), np.ones(N, dtype=np.float32))


def test_seta_window_advances_cyclically_and_wraps() -> None:
    group, losses = grouped_losses(4)
    p = SeTa(N, 0, ratio=0.2, k=10, alpha=0.6)
    feed(p, np.arange(N), losses)
    starts = []
    for epoch in range(1, 13):
        kept_groups = np.unique(group[p.keep_mask(epoch, progress=0.1)])
        assert kept_groups.size == 6
        assert np.all(np.diff(kept_groups) == 1)  # consecutive groups
        starts.append(int(kept_groups[0]))
    # 10 - 6 + 1 = 5 window positions: 1,2,3,4,0,1,2,...
    assert starts == [e % 5 for e in range(1, 13)]
    assert starts[3] == 4 and starts[4] == 0  # wraps from the hardest window back to the easiest


def test_seta_first_epoch_and_nothing_seen_keep_all() -> None:
    _, losses = grouped_losses(5)
    p = SeTa(N, 0, ratio=0.5)
    assert p.keep_mask(3, 0.2).all()  # nothing seen yet
    feed(p, np.arange(N), losses)
    q = SeTa(N, 0, ratio=0.5)
    feed(q, np.arange(N), losses)
    assert q.keep_mask(0, 0.0).all()  # epoch 0
    assert not q.keep_mask(1, 0.01).all()


@pytest.mark.parametrize("method", ["seta", "infobatch"])
def test_never_seen_samples_are_always_kept(method: str) -> None:
    _, losses = grouped_losses(6)
    p = build_pruner(method, N, 0, ratio=0.5)
    seen = np.random.default_rng(0).permutation(N)[: N // 2]
    feed(p, seen, losses[seen])
    unseen = np.setdiff1d(np.arange(N), seen)
    for epoch, progress in [(1, 0.1), (2, 0.2), (3, 0.5), (9, 0.95)]:
        mask = p.keep_mask(epoch, progress)
        assert mask[unseen].all()
        if progress < 0.875:
            assert not mask[seen].all()  # something among the seen was pruned


def test_seta_annealing_keeps_random_fraction_of_all() -> None:
    group, losses = grouped_losses(7)
    ratio = 0.3
    p = SeTa(N, 5, ratio=ratio, k=10, alpha=0.6, delta=0.8)
    feed(p, np.arange(N), losses)
    m1 = p.keep_mask(40, progress=0.8)
    m2 = p.keep_mask(41, progress=0.9)
    for m in (m1, m2):
        assert m.sum() == round((1 - ratio) * N)
        assert np.unique(group[m]).size == N_GROUPS  # not a window: every group present
        assert p.stats()["window_start"] == -1
    assert not np.array_equal(m1, m2)
    overlap = (m1 & m2).sum() / N  # independent draws: ~ (1-r)^2
    assert abs(overlap - (1 - ratio) ** 2) < 0.05


# --------------------------------------------------------------------------- InfoBatch
def test_infobatch_drops_fraction_of_below_mean_and_rescales_them() -> None:
    ratio = 0.5
    losses = np.random.default_rng(8).exponential(size=N)
    p = InfoBatch(N, 3, ratio=ratio, delta=0.875)
    feed(p, np.arange(N), losses)
    below = losses < losses.mean()
    mask = p.keep_mask(2, progress=0.3)
    assert mask[~below].all()
    n_below = int(below.sum())
    assert mask[below].sum() == round((1 - ratio) * n_below)
    w = p.loss_weights(np.arange(N))
    kept_below = mask & below
    np.testing.assert_allclose(w[kept_below], 1.0 / (1.0 - ratio))
    np.testing.assert_array_equal(w[~below], 1.0)
    assert p.stats()["upweighted_fraction"] == pytest.approx(kept_below.mean())
    # a different epoch drops a different subset
    assert not np.array_equal(p.keep_mask(3, progress=0.31), mask)


def test_infobatch_keeps_all_after_delta() -> None:
    losses = np.random.default_rng(9).random(N)
    p = InfoBatch(N, 0, ratio=0.5, delta=0.5)
    feed(p, np.arange(N), losses)
    assert not p.keep_mask(1, 0.49).all()
    assert p.loss_weights(np.arange(N)).max() == pytest.approx(2.0)
    assert p.keep_mask(2, 0.5).all()
    np.testing.assert_array_equal(p.loss_weights(np.arange(N)), 1.0)
    assert p.stats()["pruned_fraction"] == 0.0


def test_no_pruning_keeps_all() -> None:
    p = build_pruner("none", N, 0, ratio=0.5, k=10, alpha=0.6, delta=0.875)
    assert isinstance(p, NoPruning)
    p.update(np.arange(N), np.random.default_rng(0).random(N))
    assert p.keep_mask(4, 0.5).all()
    np.testing.assert_array_equal(p.loss_weights(np.arange(10)), 1.0)


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("method", ["seta", "infobatch"])
def test_two_ranks_same_updates_same_masks_and_masks_vary(method: str) -> None:
    _, losses = grouped_losses(10)
    ranks = [build_pruner(method, N, 42, ratio=0.4) for _ in range(2)]
    other_seed = build_pruner(method, N, 43, ratio=0.4)
    order = np.random.default_rng(1).permutation(N)
    for p in (*ranks, other_seed):
        feed(p, order, losses[order], chunk=37)
    masks = []
    for epoch in range(1, 4):
        a, b = (p.keep_mask(epoch, epoch / 10) for p in ranks)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ranks[0].loss_weights(order), ranks[1].loss_weights(order))
        masks.append(a)
    assert not np.array_equal(masks[0], masks[1])
    assert not np.array_equal(masks[1], masks[2])
    assert not np.array_equal(other_seed.keep_mask(1, 0.1), masks[0])


def test_keep_mask_is_idempotent_within_an_epoch_and_counts_once() -> None:
    _, losses = grouped_losses(12)
    p = SeTa(N, 0, ratio=0.5)
    feed(p, np.arange(N), losses)
    m = p.keep_mask(1, 0.1)
    p.update(np.arange(100), np.full(100, 1e6))  # losses change mid-epoch
    np.testing.assert_array_equal(p.keep_mask(1, 0.1), m)
    assert p.cumulative_total == N and p.cumulative_kept == m.sum()


def test_cumulative_counters_and_compute_saved() -> None:
    _, losses = grouped_losses(13)
    p = SeTa(N, 0, ratio=0.5)
    feed(p, np.arange(N), losses)
    kept = [int(p.keep_mask(e, e / 10).sum()) for e in range(5)]
    s = p.stats()
    assert s["cumulative_kept"] == sum(kept) and s["cumulative_total"] == 5 * N
    assert s["compute_saved"] == pytest.approx(1 - sum(kept) / (5 * N))
    assert s["num_kept"] == kept[-1]
    assert s["kept_fraction"] + s["pruned_fraction"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("method", ["seta", "infobatch", "none"])
def test_state_dict_roundtrip_through_torch_weights_only(method: str) -> None:
    _, losses = grouped_losses(14)
    rng = np.random.default_rng(0)
    p = build_pruner(method, N, 7, ratio=0.5)
    feed(p, np.arange(N), losses)
    p.keep_mask(1, 0.1)
    sd = p.state_dict()
    for key, value in sd.items():
        assert isinstance(value, (torch.Tensor, int, float, str)), (key, type(value))
        assert not isinstance(value, np.generic), key
    buf = io.BytesIO()
    torch.save({"pruner": sd}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["pruner"]
    q = build_pruner(method, N, 7, ratio=0.5)
    q.load_state_dict(loaded)
    assert q.stats() == p.stats()
    np.testing.assert_array_equal(q.loss_weights(np.arange(N)), p.loss_weights(np.arange(N)))
    for epoch in range(2, 5):
        ids = rng.permutation(N)[:500]
        new = rng.random(500) * 100
        p.update(ids, new)
        q.update(ids, new)
        np.testing.assert_array_equal(p.keep_mask(epoch, epoch / 10), q.keep_mask(epoch, epoch / 10))
    assert q.stats() == p.stats()
    # mutating the pruner after state_dict() must not change the saved state
    assert torch.equal(sd["losses"], torch.from_numpy(losses))


def test_load_state_dict_rejects_mismatch() -> None:
    sd = SeTa(N, 0).state_dict()
    with pytest.raises(ValueError, match="method"):
        InfoBatch(N, 0).load_state_dict(sd)
    with pytest.raises(ValueError, match="num_samples"):
        SeTa(N + 1, 0).load_state_dict(sd)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"k": 0}, "k"),
        ({"k": 2.5}, "k"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.01}, "delta"),
    ],
)
@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_bad_parameters_raise(method: str, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        build_pruner(method, N, 0, **kwargs)


def test_unknown_method_lists_valid_names() -> None:
    with pytest.raises(ValueError) as exc:
        build_pruner("random", N, 0)
    for name in PRUNING_METHODS:
        assert name in str(exc.value)


def test_update_validates_and_ignores_non_finite() -> None:
    p = InfoBatch(10, 0)
    with pytest.raises(ValueError):
        p.update(np.array([10]), np.array([1.0]))
    with pytest.raises(ValueError):
        p.update(np.array([0, 1]), np.array([1.0]))
    p.update(np.array([0, 1, 2]), np.array([1.0, np.nan, np.inf]))
    assert p.stats()["seen_fraction"] == pytest.approx(0.1)
    with pytest.raises(ValueError):
        p.keep_mask(1, 1.5)
