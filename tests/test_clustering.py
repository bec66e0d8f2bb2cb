"""Clustering diagnostics of mfattn.metrics on configurations with known answers (float64).

diameter, cluster_labels / num_clusters, aligned_fraction, wasserstein2 (exact and Sinkhorn) and
wasserstein2_bounds: closed forms, padding ignored, permutation invariance, jit and vmap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components

from mfattn.metrics import (
    aligned_fraction,
    cluster_labels,
    diameter,
    num_clusters,
    wasserstein2,
    wasserstein2_bounds,
)


def on_line(xs, d=3, direction=(1.0, 2.0, -2.0)):
    """Points ``x_k u`` on the line through 0 spanned by the unit vector ``u`` of R^d."""
    u = np.asarray(direction[:d], float)
    return jnp.asarray(np.outer(xs, u / np.linalg.norm(u)))


def two_clusters():
    """Cluster A = {0, 0.01, 0.02}, cluster B = {5, 5.01} on a line in R^3, and a padding token at 2.5,
    halfway: it would bridge the clusters at threshold 3 and is not in the support."""
    tokens = on_line([0.0, 5.0, 0.01, 2.5, 5.01, 0.02])
    weights = jnp.array([0.2, 0.2, 0.2, 0.0, 0.2, 0.2])
    return tokens, weights


def circle(angles):
    angles = jnp.asarray(angles, float)
    return jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)


# ---------------------------------------------------------------- diameter and clusters


def test_diameter_of_two_clusters_ignores_padding():
    tokens, weights = two_clusters()
    np.testing.assert_allclose(diameter(tokens, weights), 5.01, rtol=1e-14)
    # the padding token may sit anywhere: far away it changes nothing
    far = tokens.at[3].set(jnp.array([100.0, -50.0, 30.0]))
    np.testing.assert_allclose(diameter(far, weights), 5.01, rtol=1e-14)
    # once live, it counts
    to_far = float(jnp.max(jnp.linalg.norm(far - far[3][None, :], axis=1)))  # the padding token is the farthest out
    np.testing.assert_allclose(diameter(far, weights.at[3].set(0.1)), to_far, rtol=1e-14)
    # one live token: 0
    assert float(diameter(tokens, jnp.array([0.0, 1.0, 0.0, 0.0, 0.0, 0.0]))) == 0.0


def test_num_clusters_of_two_tight_clusters():
    tokens, weights = two_clusters()
    assert int(num_clusters(tokens, weights, 0.1)) == 2
    # at threshold 3 the padding token at 2.5 would link the clusters (each is 2.5 away), but it is ignored
    assert int(num_clusters(tokens, weights, 3.0)) == 2
    assert int(num_clusters(tokens, weights.at[3].set(0.1), 3.0)) == 1
    # below the spacing inside the clusters every live token is alone; above the diameter, one cluster
    assert int(num_clusters(tokens, weights, 0.005)) == 5
    assert int(num_clusters(tokens, weights, 6.0)) == 1
    # strict inequality: tokens exactly `threshold` apart are not linked
    assert int(num_clusters(on_line([0.0, 1.0], d=1), jnp.array([0.5, 0.5]), 1.0)) == 2
    labels = np.asarray(cluster_labels(tokens, weights, 0.1))
    np.testing.assert_array_equal(labels, [0, 1, 0, -1, 1, 0])
    with pytest.raises(ValueError, match="num_clusters: weights must have a positive total mass"):
        num_clusters(tokens, jnp.zeros(6), 0.1)  # an empty measure has no clusters to count: refused


def test_num_clusters_needs_the_transitive_closure():
    """A chain of 40 tokens 1 apart, in a shuffled order: every token links only to its chain neighbours,
    so one cluster needs 39 hops of propagation. Cut the chain at two places (two gaps of 1.5) -> 3."""
    n = 40
    order = np.random.default_rng(0).permutation(n)
    positions = np.arange(n, dtype=float)
    tokens = on_line(positions[order], d=2)
    weights = jnp.full((n,), 1.0 / n)
    assert int(num_clusters(tokens, weights, 1.2)) == 1
    assert int(num_clusters(tokens, weights, 0.9)) == n
    cut = positions + 0.5 * (positions >= 13) + 0.5 * (positions >= 29)
    tokens = on_line(cut[order], d=2)
    assert int(num_clusters(tokens, weights, 1.2)) == 3
    labels = np.asarray(cluster_labels(tokens, weights, 1.2))
    for group in (order < 13, (order >= 13) & (order < 29), order >= 29):
        assert len(set(labels[group])) == 1
        assert labels[group][0] == np.flatnonzero(group)[0]  # labelled by the smallest index


def test_num_clusters_matches_scipy_connected_components():
    """Random clouds with padding, several thresholds, against scipy.sparse.csgraph on the live tokens;
    vmapped over clouds and jitted with a traced threshold."""
    batch, n, d = 12, 30, 2
    rng = np.random.default_rng(2)
    tokens = rng.uniform(size=(batch, n, d))
    weights = (rng.uniform(size=(batch, n)) < 0.8).astype(float)
    weights[:, 0] = 1.0
    weights /= weights.sum(axis=1, keepdims=True)
    tokens, weights = jnp.asarray(tokens), jnp.asarray(weights)
    counts = jax.jit(jax.vmap(num_clusters, in_axes=(0, 0, None)))
    seen = set()
    for threshold in (0.05, 0.12, 0.2, 0.3):
        got = np.asarray(counts(tokens, weights, threshold))
        for b in range(batch):
            live = np.asarray(weights[b]) > 0
            x = np.asarray(tokens[b])[live]
            dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
            expected = connected_components(dist < threshold, directed=False)[0]
            assert got[b] == expected, (threshold, b)
            seen.add(expected)
    assert len(seen) >= 5  # the thresholds span several regimes


def test_diagnostics_are_permutation_invariant():
    n, rng = 17, np.random.default_rng(3)
    tokens, weights = rng.normal(size=(n, 3)), rng.uniform(size=n)
    weights[4] = 0.0
    weights /= weights.sum()
    perm = rng.permutation(n)
    pt, pw = jnp.asarray(tokens[perm]), jnp.asarray(weights[perm])
    tokens, weights = jnp.asarray(tokens), jnp.asarray(weights)
    other, other_w = jnp.asarray(rng.normal(size=(11, 3))), jnp.full((11,), 1.0 / 11)
    assert float(diameter(pt, pw)) == float(diameter(tokens, weights))
    for threshold in (0.5, 1.0, 1.5):
        assert int(num_clusters(pt, pw, threshold)) == int(num_clusters(tokens, weights, threshold))
        # the partition is the same, up to the relabelling
        a = np.asarray(cluster_labels(tokens, weights, threshold))
        b = np.asarray(cluster_labels(pt, pw, threshold))
        same = a[:, None] == a[None, :]
        np.testing.assert_array_equal(same[np.ix_(perm, perm)], b[:, None] == b[None, :])
    np.testing.assert_allclose(aligned_fraction(pt, pw, 0.3), aligned_fraction(tokens, weights, 0.3), rtol=1e-14)
    np.testing.assert_allclose(
        wasserstein2(pt, pw, other, other_w), wasserstein2(tokens, weights, other, other_w), rtol=1e-12
    )


# ---------------------------------------------------------------- aligned fraction


def test_aligned_fraction_of_clusters_on_the_circle():
    """Three tokens near angle 0, two near pi/2 (spread 0.01 rad, so 1 - cos < 5e-5), one padding token
    aligned with the second group. Uniform masses: aligned ordered pairs 3*2 + 2*1 = 8 of 5*4 = 20."""
    angles = jnp.array([0.0, 0.01, -0.01, jnp.pi / 2, jnp.pi / 2 + 0.01, jnp.pi / 2 + 0.005])
    tokens = circle(angles)
    weights = jnp.array([0.2, 0.2, 0.2, 0.2, 0.2, 0.0])
    np.testing.assert_allclose(aligned_fraction(tokens, weights), 8 / 20, rtol=1e-14)
    # mass-weighted: m = (a, a, a, b, b): sum_{i != j aligned} m_i m_j / sum_{i != j} m_i m_j
    a, b = 0.1, 0.35
    w = jnp.array([a, a, a, b, b, 0.0])
    expected = (6 * a**2 + 2 * b**2) / (1.0 - 3 * a**2 - 2 * b**2)
    np.testing.assert_allclose(aligned_fraction(tokens, w), expected, rtol=1e-13)
    # only directions count: positive rescaling of each token changes nothing
    scales = jnp.array([1.0, 3.0, 0.2, 7.0, 0.5, 2.0])[:, None]
    np.testing.assert_allclose(aligned_fraction(scales * tokens, weights), 8 / 20, rtol=1e-14)
    # one cluster -> 1; antipodal or orthogonal pairs -> 0; fewer than two live tokens -> 1
    np.testing.assert_allclose(aligned_fraction(circle([0.3, 0.31, 0.305]), jnp.full((3,), 1 / 3)), 1.0)
    assert float(aligned_fraction(circle([0.0, jnp.pi / 2, jnp.pi]), jnp.full((3,), 1 / 3))) == 0.0
    assert float(aligned_fraction(tokens, jnp.array([0.0, 1.0, 0.0, 0.0, 0.0, 0.0]))) == 1.0


def test_aligned_fraction_threshold_is_one_minus_cosine():
    """A pair at angle theta is aligned iff 1 - cos(theta) < threshold."""
    threshold = 1e-2
    theta = float(np.arccos(1 - threshold))
    w = jnp.array([0.5, 0.5])
    assert float(aligned_fraction(circle([0.0, 0.99 * theta]), w, threshold)) == 1.0
    assert float(aligned_fraction(circle([0.0, 1.01 * theta]), w, threshold)) == 0.0
    assert float(aligned_fraction(circle([0.0, 1.01 * theta]), w, 2 * threshold)) == 1.0


# ---------------------------------------------------------------- Wasserstein-2


def quantile_w2(xa, a, xb, b):
    """Exact W2 of two weighted measures on the real line: the L2 distance of the quantile functions,
    integrated exactly over the merged breakpoints of the two CDFs."""
    ia, ib = np.argsort(xa), np.argsort(xb)
    xa, a, xb, b = xa[ia], a[ia] / a.sum(), xb[ib], b[ib] / b.sum()
    ca, cb = np.cumsum(a), np.cumsum(b)
    cuts = np.unique(np.concatenate([[0.0], ca, cb]).clip(0, 1))
    mid = (cuts[:-1] + cuts[1:]) / 2
    qa = xa[np.minimum(np.searchsorted(ca, mid), len(xa) - 1)]
    qb = xb[np.minimum(np.searchsorted(cb, mid), len(xb) - 1)]
    return float(np.sqrt(np.sum(np.diff(cuts) * (qa - qb) ** 2)))


def test_w2_of_two_diracs_is_their_distance():
    x, y = jnp.array([[1.0, -2.0, 0.5]]), jnp.array([[-0.5, 2.0, 3.5]])
    one = jnp.ones((1,))
    dist = float(jnp.linalg.norm(x - y))
    np.testing.assert_allclose(wasserstein2(x, one, y, one), dist, rtol=1e-14)
    # a Dirac against a measure: W2^2 = sum_j m_j |x - y_j|^2, whatever the padding
    ys = jnp.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [9.0, 9.0, 9.0], [-1.0, 2.0, 0.0]])
    m = jnp.array([0.25, 0.5, 0.0, 0.25])
    expected = float(jnp.sqrt(jnp.sum(m * jnp.sum((ys - x) ** 2, axis=1))))
    np.testing.assert_allclose(wasserstein2(x, one, ys, m), expected, rtol=1e-12)
    np.testing.assert_allclose(wasserstein2(ys, m, x, one, method="sinkhorn"), expected, rtol=1e-12)


def test_w2_of_a_translate_is_the_shift():
    """W2(mu, mu + s) = |s| for any weighted cloud (padding included): the identity coupling costs |s|^2
    and any coupling costs at least |mean shift|^2 = |s|^2."""
    n = 25
    rng = np.random.default_rng(4)
    tokens, weights = rng.normal(size=(n, 3)), rng.uniform(size=n)
    weights[[3, 11]] = 0.0
    shift = np.array([0.3, -1.0, 2.0])
    moved = tokens + shift
    moved[3] = 50.0  # a moved padding token: ignored
    tokens, weights, moved, shift = (jnp.asarray(v) for v in (tokens, weights, moved, shift))
    np.testing.assert_allclose(wasserstein2(tokens, weights, moved, weights), float(jnp.linalg.norm(shift)), rtol=1e-9)
    lower, upper = wasserstein2_bounds(tokens, weights, moved, weights)
    assert float(lower) <= float(jnp.linalg.norm(shift)) * (1 + 1e-12) <= float(upper) * (1 + 1e-12)
    np.testing.assert_allclose(upper, float(jnp.linalg.norm(shift)), rtol=2e-3)
    # uniform masses take the assignment path: exact to rounding
    u = jnp.full((n,), 1.0 / n)
    np.testing.assert_allclose(
        wasserstein2(tokens, u, tokens + shift[None, :], u), float(jnp.linalg.norm(shift)), rtol=1e-12
    )
    assert float(wasserstein2(tokens, weights, tokens, weights)) <= 1e-6


def test_w2_on_the_line_is_the_quantile_distance():
    """In 1-D, W2 is the L2 distance between quantile functions: exact, for weighted and uniform clouds,
    with a different number of tokens and padding."""
    rng = np.random.default_rng(1)
    for n, m in ((9, 14), (20, 20), (30, 7)):
        xa, xb = rng.normal(size=n), 0.7 + 2.0 * rng.normal(size=m)
        a, b = rng.random(n), rng.random(m)
        a[1] = 0.0
        expected = quantile_w2(xa, a, xb, b)
        got = wasserstein2(jnp.asarray(xa)[:, None], jnp.asarray(a), jnp.asarray(xb)[:, None], jnp.asarray(b))
        np.testing.assert_allclose(got, expected, rtol=1e-9)
    # uniform, equal sizes: the sorted matching
    xa, xb = rng.normal(size=16), rng.normal(size=16)
    u = jnp.full((16,), 1 / 16)
    expected = float(np.sqrt(np.mean((np.sort(xa) - np.sort(xb)) ** 2)))
    np.testing.assert_allclose(wasserstein2(jnp.asarray(xa)[:, None], u, jnp.asarray(xb)[:, None], u), expected)


def test_w2_assignment_and_lp_agree_and_sinkhorn_brackets_them():
    """Uniform equal-size clouds in R^2: the assignment path (scipy's linear_sum_assignment) and the LP path
    (weights perturbed by 1e-13 relative) agree to 1e-9; the Sinkhorn bounds bracket the exact value
    (certified: rounded plan above, c-transformed dual below) and the upper one is within 1e-2."""
    batch, n = 6, 20
    rng = np.random.default_rng(5)
    xa, xb = jnp.asarray(rng.normal(size=(batch, n, 2))), jnp.asarray(0.5 + rng.normal(size=(batch, n, 2)))
    u = jnp.full((n,), 1.0 / n)
    wiggle = u * (1 + 1e-13 * jnp.arange(n))
    exact = np.asarray(jax.jit(jax.vmap(lambda x, y: wasserstein2(x, u, y, u)))(xa, xb))
    lp = np.asarray(jax.vmap(lambda x, y: wasserstein2(x, wiggle, y, u))(xa, xb))
    lo, up = jax.jit(jax.vmap(lambda x, y: wasserstein2_bounds(x, u, y, u)))(xa, xb)
    lo, up = np.asarray(lo), np.asarray(up)
    for b in range(batch):
        cost = np.sum((np.asarray(xa[b])[:, None] - np.asarray(xb[b])[None]) ** 2, axis=-1)
        r, c = linear_sum_assignment(cost)
        np.testing.assert_allclose(exact[b], np.sqrt(cost[r, c].mean()), rtol=1e-14)
    np.testing.assert_allclose(lp, exact, rtol=1e-9)
    assert np.all(lo <= exact * (1 + 1e-12)) and np.all(up >= exact * (1 - 1e-12))
    assert np.max(up / exact - 1) < 1e-2
    assert np.max(1 - lo / exact) < 2e-2


def test_w2_is_symmetric_and_ignores_padding():
    """(Sizes 23 + 2 padding and 25, like the translate test, so the Sinkhorn program is compiled once.)"""
    rng = np.random.default_rng(6)
    xa, xb = jnp.asarray(rng.normal(size=(23, 3))), jnp.asarray(rng.normal(size=(25, 3)))
    a, b = jnp.asarray(rng.uniform(size=23)), jnp.asarray(rng.uniform(size=25))
    ab = float(wasserstein2(xa, a, xb, b))
    np.testing.assert_allclose(wasserstein2(xb, b, xa, a), ab, rtol=1e-9)
    # masses are normalised: scaling them changes nothing
    np.testing.assert_allclose(wasserstein2(xa, 3.0 * a, xb, b), ab, rtol=1e-9)
    # extra padding tokens anywhere change nothing
    xa_pad = jnp.concatenate([xa, jnp.array([[100.0, 100.0, 0.0], [-7.0, 3.0, 1.0]])])
    a_pad = jnp.concatenate([a, jnp.zeros((2,))])
    np.testing.assert_allclose(wasserstein2(xa_pad, a_pad, xb, b), ab, rtol=1e-9)
    # the Sinkhorn value is an upper bound, close to the exact one
    sinkhorn = float(wasserstein2(xa_pad, a_pad, xb, b, method="sinkhorn"))
    assert ab * (1 - 1e-12) <= sinkhorn <= ab * (1 + 1e-2)


def test_w2_argument_errors(no_jaxtyping):
    x, w = jnp.zeros((2, 2)), jnp.full((2,), 0.5)
    with pytest.raises(ValueError, match="method"):
        wasserstein2(x, w, x, w, method="emd")
    with pytest.raises(ValueError, match="epsilon"):
        wasserstein2(x, w, x, w, method="sinkhorn", epsilon=0.0)
