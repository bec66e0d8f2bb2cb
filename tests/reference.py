"""An independent, deliberately naive implementation of SPEC sections 2-3, used as the oracle.

It forms the d x d matrices A = W_Q W_K^T and B = W_O W_V^T, loops over layers in Python, and writes the
softmax weights as m_j exp(s_j - max s) / sum_i m_i exp(s_i - max s), so that it is differentiable in the
weights m at m_j = 0 (which the production code, working with log m, is not). Gradients of it by
jax.grad are the reference for every hand-derived derivative.
"""

import jax
import jax.numpy as jnp


def project(x, radius):
    if radius is None:
        return x
    n = jnp.linalg.norm(x)
    return jnp.where(n > radius, radius * x / jnp.where(n > radius, n, 1.0), x)


def gamma(wq, wk, wv, wo, x, tokens, m, beta, radius=None):
    """One head at one query point."""
    a = wq @ wk.T
    b = wo @ wv.T
    keys = jax.vmap(project, in_axes=(0, None))(tokens, radius)
    s = beta * (keys @ (a.T @ x))
    # Shift by the score at the argmax with its derivative kept (not stop_gradient(max)): the shifted
    # scores' derivatives are then differences computed exactly, so autodiff of this oracle stays
    # accurate when the softmax is nearly one-hot (large beta).
    e = m * jnp.exp(s - s[jnp.argmax(jnp.where(m > 0, s, -jnp.inf))])
    return b @ (e @ keys / jnp.sum(e))


def velocity(theta, queries, tokens, m, beta, radius=None):
    """(1/H) sum_h Gamma_h at every query; theta leaves (H, d, k)."""
    per_head = jax.vmap(
        lambda wq, wk, wv, wo: jax.vmap(lambda x: gamma(wq, wk, wv, wo, x, tokens, m, beta, radius))(queries)
    )(theta.wq, theta.wk, theta.wv, theta.wo)
    return jnp.mean(per_head, axis=0)


def layer_params(params, l):
    return jax.tree.map(lambda x: x[l], params)


def forward(params, tokens, m, beta, radius=None, perturb=None):
    """Trajectory (L+1, N, d); ``perturb`` (L+1, N, d) is added to each layer's state (all zeros gives
    the forward pass, and its gradient is d ell / d x^l for every l at once)."""
    depth = params.wq.shape[0]
    x = tokens if perturb is None else tokens + perturb[0]
    traj = [x]
    for l in range(depth):
        x = x + velocity(layer_params(params, l), x, x, m, beta, radius) / depth
        if perturb is not None:
            x = x + perturb[l + 1]
        traj.append(x)
    return jnp.stack(traj)
