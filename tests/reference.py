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


# ------------------------------------------------------------------------------------ attention variants


def _lse_m(a, m):
    """log sum_j m_j e^{a_j}, differentiable in m at m_j = 0 (shift held constant)."""
    c = jax.lax.stop_gradient(jnp.max(a))
    return jnp.log(jnp.sum(m * jnp.exp(a - c))) + c


def sinkhorn_g(wq, wk, tokens, m, beta, iters, radius=None):
    """Key potentials of the entropic self-transport, by plain Python iterations on the full matrix."""
    keys = jax.vmap(project, in_axes=(0, None))(tokens, radius)
    s = beta * (tokens @ (wq @ wk.T) @ keys.T)
    g = jnp.zeros(tokens.shape[0])
    for _ in range(iters):
        f = -jax.vmap(lambda row, g=g: _lse_m(row + g, m))(s)
        g = -jax.vmap(lambda col, f=f: _lse_m(col + f, m))(s.T)
    return g


def gamma_variant(spec, wq, wk, wv, wo, x, index, tokens, m, beta, radius=None, g=None):
    """One head of any :class:`mfattn.Attention` kernel at one query (``index``: its position, for causal
    masking). Naive: the d x d matrices, full L2 distances, explicit masks."""
    beta = beta * spec.scale(wq.shape[1])
    a = wq @ wk.T
    b = wo @ wv.T
    keys = jax.vmap(project, in_axes=(0, None))(tokens, radius)
    n = tokens.shape[0]
    if spec.kind == "l2":
        s = -0.5 * beta * jnp.sum(((wq.T @ x)[None, :] - keys @ wk) ** 2, axis=-1)
    else:
        s = beta * (keys @ (a.T @ x))
    if g is not None:
        s = s + g
    allowed = jnp.arange(n) <= index if spec.causal else jnp.ones(n, bool)
    mm = jnp.where(allowed, m, 0.0)
    if spec.kind == "unnormalized":
        return b @ ((mm * jnp.exp(s)) @ keys)
    if spec.kind == "sigmoid":
        return b @ ((mm * jax.nn.sigmoid(s + spec.bias)) @ keys)
    top = s[jnp.argmax(jnp.where(allowed & (m > 0), s, -jnp.inf))]
    e = mm * jnp.exp(jnp.where(allowed, s - top, 0.0))
    z = jnp.sum(e)
    safe = jnp.where(z > 0, z, 1.0)
    return jnp.where(z > 0, b @ (e @ keys / safe), 0.0)


def velocity_variant(spec, theta, queries, tokens, m, beta, radius=None):
    def head(wq, wk, wv, wo):
        g = None
        if spec.kind == "sinkhorn":
            g = sinkhorn_g(wq, wk, tokens, m, beta * spec.scale(wq.shape[1]), spec.sinkhorn_iters, radius)
        return jax.vmap(lambda x, i: gamma_variant(spec, wq, wk, wv, wo, x, i, tokens, m, beta, radius, g))(
            queries, jnp.arange(queries.shape[0])
        )

    return jnp.mean(jax.vmap(head)(theta.wq, theta.wk, theta.wv, theta.wo), axis=0)


def forward_variant(spec, params, tokens, m, beta, radius=None, perturb=None):
    depth = params.wq.shape[0]
    h = float(depth) ** (-spec.depth_exponent)
    x = tokens if perturb is None else tokens + perturb[0]
    traj = [x]
    for l in range(depth):
        x = x + h * velocity_variant(spec, layer_params(params, l), x, x, m, beta, radius)
        if spec.residual == "sphere":
            x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        if perturb is not None:
            x = x + perturb[l + 1]
        traj.append(x)
    return jnp.stack(traj)
