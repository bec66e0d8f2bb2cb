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


def test_the_monotone_ascent_refines_where_the_fixed_step_circles():
    """On err(X) = 2 - |X - X*|^2 from starts at distance 0.95 of X*, with a step of 0.3 R: the fixed-step rule
    ends up circling X* at about half a step (its best value stays below 2 - 0.002), the monotone rule halves its
    step after each overshoot and gets within 1e-3 of X*; it never leaves its best point (values along the path
    never fall), and a bad rule is refused naming it."""
    import pytest

    from mfattn.metrics import projected_ascent

    target = jnp.array([[0.3, -0.4], [0.0, 0.5], [-0.5, 0.1]])
    err = lambda x: 2.0 - jnp.sum((x - target) ** 2)
    vg = jax.jit(jax.vmap(jax.value_and_grad(err)))
    direction = jax.random.normal(jax.random.key(3), (4, 3, 2))
    starts = target[None] + 0.95 * direction / jnp.linalg.norm(direction, axis=(-2, -1), keepdims=True)
    kw = dict(radius=1.0, steps=30, step_size=0.3)
    v_fixed, _ = projected_ascent(vg, starts, rule="fixed", **kw)
    v_mono, x_mono = projected_ascent(vg, starts, rule="monotone", **kw)
    assert float(jnp.max(v_fixed)) < 2.0 - 2e-3
    assert float(jnp.min(v_mono)) > 2.0 - 1e-6
    np.testing.assert_allclose(x_mono, jnp.broadcast_to(target, x_mono.shape), atol=1e-3)
    values = [projected_ascent(vg, starts, rule="monotone", radius=1.0, steps=n, step_size=0.3)[0] for n in range(6)]
    assert all(bool(jnp.all(b >= a)) for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="projected_ascent: rule"):
        projected_ascent(vg, starts, rule="bogus", **kw)
