"""Discrepancy and the supremum search over inputs."""

import jax
import jax.numpy as jnp
import numpy as np

from mfattn.metrics import discrepancy, input_families, sup_search_fn


def test_discrepancy_is_the_largest_live_token_error():
    k = jax.random.split(jax.random.key(0), 4)
    xd, pd = jax.random.normal(k[0], (4, 3, 2)), jax.random.normal(k[1], (4, 3, 2))
    xl, pl = xd.at[2, 1].add(jnp.array([3.0, 4.0])), pd.at[1, 0].add(jnp.array([0.0, 1.0]))
    w = jnp.array([0.5, 0.5, 0.0])
    assert float(discrepancy(xd, pd, xd, pd, w)) == 0.0
    np.testing.assert_allclose(discrepancy(xd, pd, xl, pl, w), 5.0, rtol=1e-12)
    # a zero-weight token's error does not count
    np.testing.assert_allclose(discrepancy(xd, pd, xl.at[3, 2].add(100.0), pl, w), 5.0, rtol=1e-12)


def test_sup_search_finds_a_planted_maximum():
    """err(X) = 2 - |X - X*|^2 has its maximum 2 at X* inside the ball; no candidate is near it, so only
    the ascent can find it."""
    radius = 1.0
    target = jnp.array([[0.3, -0.4], [0.0, 0.5], [-0.5, 0.1]])
    err = lambda x: 2.0 - jnp.sum((x - target) ** 2)
    cands = (
        jax.random.uniform(jax.random.key(1), (16, 3, 2), minval=-0.2, maxval=0.2)
        + jnp.array([0.6, 0.6])[None, None, :]
    )
    cands = cands / jnp.maximum(1.0, jnp.linalg.norm(cands, axis=-1, keepdims=True))
    out = sup_search_fn(err, cands, radius=radius, starts=3, steps=40, step_size=0.05)
    assert out["source"] == "ascent"
    assert out["test_set"] < 1.0 < out["ascent"]
    assert out["value"] > 2.0 - 0.02, out["value"]
    np.testing.assert_allclose(out["argmax"], target, atol=0.08)
    # ascent stays in the ball even when the maximiser lies outside it
    far = lambda x: -jnp.sum((x - 3.0) ** 2)
    out = sup_search_fn(far, cands, radius=radius, starts=2, steps=30, step_size=0.1)
    assert float(jnp.max(jnp.linalg.norm(out["argmax"], axis=-1))) <= radius + 1e-9


def test_input_families_lie_in_the_ball():
    fams = input_families(jax.random.key(2), 32, 5, 3, 0.7)
    assert set(fams) == {"uniform", "clustered", "degenerate", "sphere"}
    for name, x in fams.items():
        assert x.shape == (32, 5, 3)
        assert float(jnp.max(jnp.linalg.norm(x, axis=-1))) <= 0.7 * (1 + 1e-6), name
    np.testing.assert_allclose(jnp.linalg.norm(fams["sphere"], axis=-1), 0.7, rtol=1e-6)
    spread = jnp.max(jnp.linalg.norm(fams["degenerate"] - fams["degenerate"][:, :1], axis=-1))
    assert float(spread) < 0.01
