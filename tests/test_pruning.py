"""Tests for mae_curriculum.curriculum.pruning: SeTa and InfoBatch as their authors' code runs them.

Expected values are worked out in the tests from the published rules (mrazhou/SeTa ``seta.py``,
NUS-HPC-AI-Lab/InfoBatch ``infobatch.py``; docs/pruning.md), not by calling the implementation. The only
contract of ours a test re-implements is where the randomness comes from: a permutation drawn from
``default_rng(SeedSequence([seed, epoch]))``, whose first ``floor(keep * n)`` entries are the random subset.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from mae_curriculum.config import (
    ConfigError,
    PretrainConfig,
    PruningConfig,
    load_config,
)
from mae_curriculum.curriculum.pruning import (
    INITIAL_SCORE,
    PRUNING_METHODS,
    InfoBatch,
    NoPruning,
    Pruner,
    SeTa,
    build_pruner,
    kmeans_1d,
    loss_groups,
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


def draw(seed: int, epoch: int, n: int, keep: float) -> np.ndarray:
    """The random subset of ``range(n)`` of the documented contract: floor(keep * n) ids, in random order."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    return rng.permutation(n)[: math.floor(keep * n + 1e-9)]


# --------------------------------------------------------------------------- k-means
def brute_force_sse(values: np.ndarray, k: int) -> float:
    """Least within-group sum of squares over all partitions of the sorted values into k intervals (O(k m^2) DP)."""
    u, w = np.unique(values, return_counts=True)
    W, S, Q = (np.concatenate(([0.0], np.cumsum(a))) for a in (w, w * u, w * u * u))
    cost = lambda i, j: Q[j] - Q[i] - (S[j] - S[i]) ** 2 / (W[j] - W[i])
    best = [math.inf] + [cost(0, j) for j in range(1, u.size + 1)]
    for c in range(2, k + 1):
        best = [min((best[i] + cost(i, j) for i in range(c - 1, j)), default=math.inf) for j in range(u.size + 1)]
    return best[u.size]


def sse(values: np.ndarray, labels: np.ndarray) -> float:
    return float(sum(((values[labels == g] - values[labels == g].mean()) ** 2).sum() for g in np.unique(labels)))


def test_kmeans_finds_the_optimal_partition() -> None:
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(120):
        n, k = int(rng.integers(12, 60)), int(rng.integers(2, 8))
        x = np.round(rng.lognormal(0, 1, n), int(rng.integers(0, 3)))  # some runs with many ties
        if np.unique(x).size <= k:
            continue
        labels, _ = kmeans_1d(x, k)
        assert np.unique(labels).size == k
        assert sse(x, labels) == pytest.approx(brute_force_sse(x, k), rel=1e-9, abs=1e-12)
        checked += 1
    assert checked > 50


def test_kmeans_recovers_separated_groups_sorted_easy_to_hard() -> None:
    group, losses = grouped_losses(1)
    labels, centroids = kmeans_1d(losses, N_GROUPS)
    np.testing.assert_array_equal(labels, group)
    assert np.all(np.diff(centroids) > 0)
    for g in range(N_GROUPS):
        assert centroids[g] == pytest.approx(losses[group == g].mean())


def test_kmeans_a_big_tied_block_takes_one_group() -> None:
    """Half the values tied at 3.0 (unseen samples) must not swallow several centroids (it did with a
    quantile-started Lloyd): 9 separated bands + the block = 10 groups."""
    rng = np.random.default_rng(3)
    band = rng.integers(0, 9, 3000)
    x = np.concatenate([0.3 * band + 0.01 * rng.random(3000), np.full(3000, 3.0)])
    labels, _ = kmeans_1d(x, 10)
    np.testing.assert_array_equal(labels[:3000], band)
    assert np.all(labels[3000:] == 9)


def test_kmeans_is_a_lloyd_fixed_point_on_random_data() -> None:
    x = np.random.default_rng(2).normal(size=5000) ** 3
    labels, c = kmeans_1d(x, 7)
    nearest = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
    np.testing.assert_array_equal(labels, nearest)
    for j in range(7):
        assert c[j] == pytest.approx(x[labels == j].mean())
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(labels[order]) >= 0)  # clusters are intervals, sorted easy -> hard


def test_kmeans_many_distinct_values_uses_candidate_cuts_and_refines() -> None:
    """Above 2**16 distinct values: still a Lloyd fixed point, and exact on separated groups."""
    rng = np.random.default_rng(4)
    x = rng.lognormal(0, 1, 150_000)
    labels, c = kmeans_1d(x, 10)
    np.testing.assert_array_equal(labels, np.argmin(np.abs(x[:, None] - c[None, :]), axis=1))
    group = rng.integers(0, 10, 150_000)
    labels, _ = kmeans_1d(10.0 * group + rng.random(150_000), 10)
    np.testing.assert_array_equal(labels, group)


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
    distinct = np.unique(values)
    np.testing.assert_array_equal(labels, np.searchsorted(distinct, values))  # one group per value, in order
    assert np.all(np.isfinite(c)) and np.all(np.diff(c) >= 0)


def test_kmeans_k1_and_empty() -> None:
    labels, c = kmeans_1d(np.array([3.0, 1.0, 2.0]), 1)
    np.testing.assert_array_equal(labels, [0, 0, 0])
    assert c[0] == pytest.approx(2.0)
    labels, _ = kmeans_1d(np.zeros(0), 4)
    assert labels.size == 0


def test_equal_scores_split_into_equal_chunks_in_the_given_order() -> None:
    """Authors' code: all scores equal -> k equal chunks (``torch.chunk``); ours: np.array_split sizes."""
    labels = loss_groups(np.full(23, 1.5), 5)
    np.testing.assert_array_equal(labels, [0] * 5 + [1] * 5 + [2] * 5 + [3] * 4 + [4] * 4)


# --------------------------------------------------------------------------- window size
def test_window_size_is_the_codes_round_not_the_papers_ceil() -> None:
    assert window_size(5, 0.9) == 4  # their CIFAR setting: round(4.5) = 4 (ceil: 5 = every group)
    assert window_size(10, 0.65) == 6  # round(6.5) = 6 (halves to even, Python's round); ceil: 7
    assert window_size(10, 0.45) == 4  # round(4.5) = 4; ceil: 5
    assert window_size(10, 0.55) == 6  # round(5.5) = 6
    assert window_size(10, 0.6) == 6
    assert window_size(5, 0.6) == 3  # their ImageNet script (k 5, alpha 0.6)
    assert window_size(25, 0.28) == 7
    assert window_size(10, 1.0) == 10
    assert window_size(10, 0.01) == 1  # round gives 0: one group (their code asserts > 0)
    assert window_size(3, 0.5) == 2  # round(1.5) = 2


def test_seta_cifar_setting_is_not_random_pruning() -> None:
    """k = 5, alpha = 0.9 (their CIFAR script): a window of 4 of the 5 groups, sliding 0-3, 1-4, 0-3, ...
    With ceil the window held all 5 groups and SeTa degenerated into random pruning."""
    rng = np.random.default_rng(5)
    group = rng.permutation(N) % 5
    p = SeTa(N, 1, ratio=0.1, k=5, alpha=0.9)
    feed(p, np.arange(N), 10.0 * group + rng.random(N))
    for epoch in range(1, 6):
        start = epoch % 2
        np.testing.assert_array_equal(np.unique(group[p.keep_mask(epoch, epoch / 100)]), np.arange(start, start + 4))


# --------------------------------------------------------------------------- SeTa: the published rules
def test_seta_on_fixed_synthetic_losses_matches_the_published_rules() -> None:
    """The issue's setting (10,000 samples, r = 0.5, k = 10, alpha = 0.6, delta = 0.875, 8 epochs) on fixed
    losses in 9 separated bands straddling the initial score 3.0: band b in {0.2, 0.6, ..., 2.6, 3.4, 3.8}
    (width 0.02). Unseen samples score 3.0, so with the bands they make 10 separated groups: bands 0-6 are
    groups 0-6, unseen = group 7, bands 7-8 = groups 8-9.

    Rules, per epoch e (E = 8): anneal if e + 1 > E * delta = 7 (epoch 7): a random half of all samples.
    Otherwise thin to a random half of *all* samples, group them, keep every group at e = 0 and the groups
    [s, s + 6) with s = e mod (10 - 6 + 1) after; samples trained get their band's loss.

    Kept fractions this gives: 0.50, 0.17, 0.39, 0.34, 0.31, 0.32, 0.31, 0.50 (mean 0.35); the old behaviour
    (epoch 0 unthinned, unseen always kept) gave 1.0 at epoch 0 and kept unseen samples outside the window.
    """
    n, seed, keep, k, w, epochs = 10_000, 7, 0.5, 10, 6, 8
    centres = np.array([0.2, 0.6, 1.0, 1.4, 1.8, 2.2, 2.6, 3.4, 3.8])
    rng = np.random.default_rng(0)
    band = rng.integers(0, 9, n)
    losses = centres[band] + 0.02 * rng.random(n)
    group_of_band = np.array([0, 1, 2, 3, 4, 5, 6, 8, 9])

    p = SeTa(n, seed, ratio=0.5, k=k, alpha=0.6, delta=0.875)
    seen = np.zeros(n, dtype=bool)
    fractions = []
    for e in range(epochs):
        pool = draw(seed, e, n, keep)
        group = np.where(seen[pool], group_of_band[band[pool]], 7)
        if e + 1 > epochs * 0.875:
            expected_ids, window = pool, None
        elif e == 0:
            expected_ids, window = pool, np.arange(k)
        else:
            s = e % (k - w + 1)
            window = np.arange(s, s + w)
            expected_ids = pool[np.isin(group, window)]
        expected = np.zeros(n, dtype=bool)
        expected[expected_ids] = True

        mask = p.keep_mask(e, e / epochs)
        np.testing.assert_array_equal(mask, expected)
        kept_groups = np.unique(np.where(seen, group_of_band[band], 7)[mask])
        if window is not None:
            np.testing.assert_array_equal(kept_groups, window[np.isin(window, np.unique(group))])
            assert p.stats()["window_start"] == (-1 if e == 0 else window[0])
        else:
            assert p.stats()["annealing"] == 1.0 and kept_groups.size == 10  # not a window
        fractions.append(mask.mean())
        ids = np.flatnonzero(mask)
        feed(p, ids, losses[ids], chunk=512)
        seen[ids] = True
    assert fractions[0] == 0.5 and fractions[7] == 0.5
    assert np.round(fractions, 2).tolist() == [0.5, 0.17, 0.39, 0.34, 0.31, 0.32, 0.31, 0.5]


def test_seta_on_the_issues_lognormal_losses_reproduces_the_authors_kept_fractions() -> None:
    """Issue 18 quotes the authors' code (scikit-learn KMeans) on synthetic losses (10,000 samples, r = 0.5,
    k = 10, alpha = 0.6, 8 epochs): kept 0.50 / 0.21 / 0.15 / 0.36 / 0.27 ..., mean 0.34 (ours was
    1.00 / 0.42 / 0.34 / 0.29 / 0.18, mean 0.45). Fixed lognormal(0, 0.5) losses reproduce those figures
    (the per-epoch values after epoch 1 move by a few points with the k-means optimum found)."""
    n, epochs = 10_000, 8
    losses = np.random.default_rng(0).lognormal(0.0, 0.5, n)
    p = SeTa(n, 0, ratio=0.5, k=10, alpha=0.6, delta=0.875)
    kept = []
    for e in range(epochs):
        mask = p.keep_mask(e, e / epochs)
        kept.append(mask.mean())
        p.update(np.flatnonzero(mask), losses[mask])
    assert kept[0] == 0.5
    assert kept[1] == pytest.approx(0.21, abs=0.02)
    assert np.mean(kept) == pytest.approx(0.34, abs=0.02)


@pytest.mark.parametrize("ratio", [0.0, 0.3])
def test_seta_keeps_exactly_thinned_samples_in_window_groups(ratio: float) -> None:
    group, losses = grouped_losses(3)
    seed, k, alpha = 11, 10, 0.6
    p = SeTa(N, seed, ratio=ratio, k=k, alpha=alpha, delta=0.875)
    feed(p, np.arange(N), losses)
    w = round(k * alpha)
    for epoch in range(1, 8):
        start = epoch % (k - w + 1)
        pool = draw(seed, epoch, N, 1 - ratio)
        expected = np.zeros(N, dtype=bool)
        expected[pool[np.isin(group[pool], np.arange(start, start + w))]] = True
        np.testing.assert_array_equal(p.keep_mask(epoch, progress=epoch / 100), expected)
        assert p.stats()["window_start"] == start
        np.testing.assert_array_equal(p.loss_weights(np.arange(N)), np.ones(N, dtype=np.float32))


def test_seta_window_advances_cyclically_and_wraps() -> None:
    group, losses = grouped_losses(4)
    p = SeTa(N, 0, ratio=0.2, k=10, alpha=0.6)
    feed(p, np.arange(N), losses)
    starts = []
    for epoch in range(1, 13):
        kept_groups = np.unique(group[p.keep_mask(epoch, progress=0.01 * epoch)])
        assert kept_groups.size == 6
        assert np.all(np.diff(kept_groups) == 1)  # consecutive groups
        starts.append(int(kept_groups[0]))
    assert starts == [e % 5 for e in range(1, 13)]  # 10 - 6 + 1 = 5 positions: 1,2,3,4,0,1,...


def test_seta_epoch_zero_is_thinned_too() -> None:
    """Their code thins epoch 0 as well (all scores 3.0: equal chunks, every chunk kept at iteration 0)."""
    p = SeTa(N, 3, ratio=0.3)
    np.testing.assert_array_equal(np.flatnonzero(p.keep_mask(0, 0.0)), np.sort(draw(3, 0, N, 0.7)))
    assert p.keep_mask(0, 0.0).sum() == 1400
    q = SeTa(N, 3)  # default ratio 0.0 (their ImageNet setting): epoch 0 keeps everything
    assert q.keep_mask(0, 0.0).all()


def test_seta_equal_losses_split_into_equal_groups() -> None:
    """All scores equal (nothing seen, or a constant loss): k equal chunks of the thinned pool in its random
    order, the window's chunks kept. The old single group kept everything or nothing."""
    seed, keep, k, w = 9, 0.7, 10, 6
    for seen_constant in (False, True):
        p = SeTa(N, seed, ratio=0.3, k=k, alpha=0.6)
        if seen_constant:
            feed(p, np.arange(N), np.full(N, 0.25))
        for epoch in (1, 2, 5):
            pool = draw(seed, epoch, N, keep)  # 1400 ids -> 10 chunks of 140
            s = epoch % (k - w + 1)
            expected = np.zeros(N, dtype=bool)
            expected[np.concatenate(np.array_split(pool, k)[s : s + w])] = True
            mask = p.keep_mask(epoch, 0.01 * epoch)
            np.testing.assert_array_equal(mask, expected)
            assert mask.sum() == 840


def test_unseen_samples_take_part_with_the_initial_score() -> None:
    """SeTa: unseen samples are a group at 3.0, kept only when that group is in the window (the old rule
    kept them always)."""
    rng = np.random.default_rng(2)
    band = rng.integers(0, 9, N)
    losses = np.array([0.3, 0.6, 0.9, 1.2, 1.5, 1.8, 2.1, 2.4, 4.0])[band] + 0.01 * rng.random(N)
    unseen = rng.random(N) < 0.3
    p = SeTa(N, 0, ratio=0.0, k=10, alpha=0.6)
    feed(p, np.flatnonzero(~unseen), losses[~unseen])  # unseen = group 8 (between 2.4 and 4.0)
    assert INITIAL_SCORE == 3.0
    in_window = []
    for epoch in range(1, 6):
        s = epoch % 5
        mask = p.keep_mask(epoch, 0.01 * epoch)
        in_window.append(s <= 8 < s + 6)
        assert mask[unseen].all() == in_window[-1] and mask[unseen].any() == in_window[-1]
    assert in_window == [False, False, True, True, False]


# --------------------------------------------------------------------------- annealing onset
@pytest.mark.parametrize("method", ["seta", "infobatch"])
def test_annealing_starts_when_epoch_plus_one_exceeds_e_delta(method: str) -> None:
    """Their sampler anneals epoch e when e + 1 > E * delta: at E = 10, delta = 0.875 epochs 8 and 9 (the
    old rule progress >= delta annealed epoch 9 only). Progress e / E at the start of epoch e, as under
    epoch accounting; the pruner infers the per-epoch progress from the previous epoch."""
    _, losses = grouped_losses(6)
    p = build_pruner(method, N, 0, ratio=0.5, delta=0.875)
    feed(p, np.arange(N), losses)
    annealed = []
    for epoch in range(10):
        p.keep_mask(epoch, epoch / 10)
        annealed.append(bool(p.stats()["annealing"]))
    assert annealed == [False] * 8 + [True] * 2
    q = build_pruner(method, N, 0, ratio=0.5, delta=0.875)  # E = 8: E * delta = 7, epoch 7 only
    feed(q, np.arange(N), losses)
    assert [(q.keep_mask(e, e / 8), bool(q.stats()["annealing"]))[1] for e in range(8)] == [False] * 7 + [True]


def test_annealing_follows_progress_at_the_end_of_the_epoch() -> None:
    """Compute accounting: progress counts FLOPs, epochs add unequal progress; the trainer passes the progress
    at the end of the epoch and the epoch is annealed when that exceeds delta."""
    _, losses = grouped_losses(6)
    p = SeTa(N, 0, ratio=0.5, delta=0.875)
    feed(p, np.arange(N), losses)
    p.keep_mask(3, 0.80, progress_end=0.875)
    assert p.stats()["annealing"] == 0.0
    p.keep_mask(4, 0.875, progress_end=0.90)
    assert p.stats()["annealing"] == 1.0
    assert p.keep_mask(4, 0.875).sum() == N // 2  # partial annealing: a random keep fraction of all
    with pytest.raises(ValueError, match="progress_end"):
        p.keep_mask(5, 0.9, progress_end=0.5)


def test_seta_annealing_keeps_random_fraction_of_all() -> None:
    group, losses = grouped_losses(7)
    ratio = 0.3
    p = SeTa(N, 5, ratio=ratio, k=10, alpha=0.6, delta=0.8)
    feed(p, np.arange(N), losses)
    m1 = p.keep_mask(40, progress=0.8, progress_end=0.81)
    np.testing.assert_array_equal(np.flatnonzero(m1), np.sort(draw(5, 40, N, 1 - ratio)))
    m2 = p.keep_mask(41, progress=0.9, progress_end=0.91)
    for m in (m1, m2):
        assert m.sum() == 1400
        assert np.unique(group[m]).size == N_GROUPS  # not a window: every group present
    assert not np.array_equal(m1, m2)


# --------------------------------------------------------------------------- InfoBatch
def test_infobatch_drops_fraction_of_below_mean_and_rescales_them() -> None:
    """1003 well-learned samples (loss 0) of 2000: floor(0.5 * 1003) = 501 kept (the old round gave 502),
    weight 1 / 0.5; the 997 others (loss 10) kept with weight 1."""
    ratio, seed = 0.5, 3
    losses = np.where(np.arange(N) < 1003, 0.0, 10.0)
    ids = np.random.default_rng(8).permutation(N)
    p = InfoBatch(N, seed, ratio=ratio, delta=0.875)
    feed(p, ids, losses[ids])
    well = np.flatnonzero(losses < losses.mean())
    expected = losses >= losses.mean()
    expected[well[draw(seed, 2, well.size, 1 - ratio)]] = True
    mask = p.keep_mask(2, progress=0.3)
    np.testing.assert_array_equal(mask, expected)
    assert mask[well].sum() == 501
    w = p.loss_weights(np.arange(N))
    np.testing.assert_array_equal(w[mask & (losses == 0)], 2.0)
    np.testing.assert_array_equal(w[losses == 10], 1.0)
    assert not np.array_equal(p.keep_mask(3, progress=0.31), mask)  # another epoch, another subset


def test_infobatch_keep_ratio_is_clamped_at_a_tenth() -> None:
    """keep = min(1, max(0.1, 1 - ratio)): ratio 0.95 keeps 10 % of the well learned, weight 10 (not 5 %, 20)."""
    losses = np.where(np.arange(N) < 1000, 0.0, 10.0)
    p = InfoBatch(N, 0, ratio=0.95)
    feed(p, np.arange(N), losses)
    mask = p.keep_mask(1, 0.1)
    assert mask[:1000].sum() == 100 and mask[1000:].all()
    np.testing.assert_allclose(p.loss_weights(np.flatnonzero(mask[:1000])), 10.0)
    s = SeTa(N, 0, ratio=0.95)
    assert s.keep_mask(0, 0.0).sum() == 200  # SeTa thins to the same clamped keep ratio


def test_infobatch_unseen_samples_score_three_in_the_mean() -> None:
    """Scores start at 3.0 and count in the mean: with seen losses around 7 (cross-entropy early on) unseen
    samples are "well learned" and half of them are dropped; with seen losses below 3 they are all kept."""
    rng = np.random.default_rng(1)
    seen = rng.random(N) < 0.5
    for level, unseen_pruned in ((7.0, True), (0.5, False)):
        p = InfoBatch(N, 0, ratio=0.5)
        feed(p, np.flatnonzero(seen), level + 0.1 * rng.random(int(seen.sum())))
        mask = p.keep_mask(1, 0.1)
        scores = np.where(seen, p.state_dict()["losses"].numpy(), 3.0)
        well = scores < scores.mean()
        assert mask[~well].all() and mask[well].sum() == int(0.5 * well.sum())
        assert (mask[~seen].sum() == int(0.5 * (~seen).sum())) == unseen_pruned
        assert mask[~seen].all() != unseen_pruned
    assert InfoBatch(N, 0).keep_mask(0, 0.0).all()  # epoch 0: every score 3.0, none below the mean


def test_infobatch_keeps_all_with_unit_weights_when_annealing() -> None:
    losses = np.random.default_rng(9).random(N)
    p = InfoBatch(N, 0, ratio=0.5, delta=0.5)
    feed(p, np.arange(N), losses)
    assert not p.keep_mask(1, 0.3, progress_end=0.5).all()
    assert p.loss_weights(np.arange(N)).max() == pytest.approx(2.0)
    assert p.keep_mask(2, 0.5, progress_end=0.6).all()
    np.testing.assert_array_equal(p.loss_weights(np.arange(N)), 1.0)
    assert p.stats()["pruned_fraction"] == 0.0


def test_no_pruning_keeps_all() -> None:
    p = build_pruner("none", N, 0, ratio=0.5, k=10, alpha=0.6, delta=0.875)
    assert isinstance(p, NoPruning)
    p.update(np.arange(N), np.random.default_rng(0).random(N))
    assert p.keep_mask(4, 0.5).all()
    np.testing.assert_array_equal(p.loss_weights(np.arange(10)), 1.0)


# --------------------------------------------------------------------------- defaults and config
def test_per_method_default_ratio() -> None:
    for ratio in (None, -1, -1.0):
        assert build_pruner("seta", N, 0, ratio=ratio).ratio == 0.0  # their ImageNet script
        assert build_pruner("infobatch", N, 0, ratio=ratio).ratio == 0.5
    assert SeTa(N, 0).ratio == 0.0 and InfoBatch(N, 0).ratio == 0.5
    assert build_pruner("seta", N, 0, ratio=0.1).ratio == 0.1  # their CIFAR script


def test_pruning_config_defaults_and_validation(tmp_path) -> None:
    assert PruningConfig().ratio == -1.0 and PruningConfig().method == "none"
    (tmp_path / "t").mkdir()
    base = [f"data.train_shards={tmp_path / 't'}"]
    cfg = load_config(PretrainConfig, None, [*base, "pruning.method=seta"])
    assert cfg.pruning.ratio == -1.0
    assert load_config(PretrainConfig, None, [*base, "pruning.ratio=0.1"]).pruning.ratio == 0.1
    with pytest.raises(ConfigError, match="pruning.method"):
        load_config(PretrainConfig, None, [*base, "pruning.method=random"])
    for bad in ("1.0", "-0.5"):
        with pytest.raises(ConfigError, match="pruning.ratio"):
            load_config(PretrainConfig, None, [*base, f"pruning.ratio={bad}"])


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
    """Resume mid-run: same masks afterwards, across the annealing onset (epochs 8, 9 of 10), whose
    detection uses the progress stored with the last mask."""
    _, losses = grouped_losses(14)
    rng = np.random.default_rng(0)
    p = build_pruner(method, N, 7, ratio=0.5)
    feed(p, np.arange(N), losses)
    p.keep_mask(0, 0.0)
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
    for epoch in range(2, 10):
        ids = rng.permutation(N)[:500]
        new = rng.random(500) * 100
        p.update(ids, new)
        q.update(ids, new)
        np.testing.assert_array_equal(p.keep_mask(epoch, epoch / 10), q.keep_mask(epoch, epoch / 10))
        assert q.stats() == p.stats()
    if method != "none":
        assert p.stats()["annealing"] == 1.0
    assert torch.equal(sd["losses"], torch.from_numpy(losses))  # state_dict() is a copy


def test_old_state_dict_loads_with_unseen_at_the_initial_score() -> None:
    """States saved before scores started at 3.0 stored 0 for unseen samples and had no progress entry."""
    old = SeTa(N, 0, ratio=0.5).state_dict()
    old["losses"] = torch.zeros(N, dtype=torch.float64)
    old["seen"][: N // 2] = True
    old["losses"][: N // 2] = 1.0
    del old["mask_progress"], old["annealing"]
    p = SeTa(N, 0, ratio=0.5)
    p.load_state_dict(old)
    scores = p.state_dict()["losses"].numpy()
    assert np.all(scores[: N // 2] == 1.0) and np.all(scores[N // 2 :] == 3.0)


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
