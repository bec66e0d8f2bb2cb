"""The Gaussian closure (SPEC section 8): closed forms against Monte Carlo and against the particle limit.

Monte-Carlo tolerances are derived from the sample sizes (and stated in each test); every comparison is
also checked to be meaningful: the quantity compared moves (or the tested term is) many tolerances large.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np
import pytest

import mfattn
from mfattn import limit
from mfattn.gaussian import gaussian_velocity, softmax_closure


def rotation(a, d=2):
    """Rotation by ``a`` in the plane of the first two coordinates of R^d."""
    r = np.eye(d)
    r[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return jnp.asarray(r)


def spd(key, eigenvalues):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (len(eigenvalues), len(eigenvalues))))
    c = q @ jnp.diag(jnp.asarray(eigenvalues)) @ q.T
    return (c + c.T) / 2  # exactly symmetric


def sample(key, mean, cov, n):
    z = jax.random.normal(key, (n, mean.shape[0]))
    return mean[None, :] + z @ jnp.linalg.cholesky(cov).T


def moments(xs):
    """Empirical mean ``(T, d)`` and covariance ``(T, d, d)`` (normalised by ``N``) of ``xs: (T, N, d)``."""
    m = jnp.mean(xs, axis=1)
    c = xs - m[:, None, :]
    return m, jnp.einsum("tni,tnj->tij", c, c) / xs.shape[1]


def test_gaussian_velocity_matches_monte_carlo(getkey):
    """``mfattn.velocity`` on n = 200k samples of N(m, S) is a self-normalised importance-sampling estimate
    of the closed form ``avg_h B_h (m + beta S A_h^T x)``. Its standard error is estimated from the spread of
    40 independent batch estimates (SE = std / sqrt(40)); the tolerance is 5 SE per component.

    The estimate is only reliable when the softmax weights have a bounded second moment: for one head the
    weights are ``exp(u.y)`` with ``u = beta A^T x`` and ``E[w^2] / E[w]^2 = exp(u^T S u)``, so we check
    ``u^T S u <= 2`` (effective sample size >= n / e^2). The tilt term ``beta B S A^T x`` must be many
    tolerances large, so a wrong tilt (``A`` for ``A^T``, a lost ``S`` or ``beta``) fails the test.
    Measured: error <= 0.37 of the tolerance; the tilt term is 25 tolerances; ``A^T`` for ``A`` misses by
    29 tolerances, ``B^T`` for ``B`` by 30."""
    d, heads, beta, n, batches = 3, 4, 1.0, 200_000, 40
    eye = jnp.eye(d)
    means = (rotation(0.6, d), eye, eye, eye)  # A = W_Q W_K^T far from symmetric
    params = mfattn.init_params(getkey(), 1, heads, d, d, init="mean_noise", scale=0.5, mean=means)
    theta = jax.tree.map(lambda w: w[0], params)
    mean = jnp.array([0.3, -0.2, 0.5])
    cov = spd(getkey(), [0.15, 0.3, 0.45])
    directions = jax.random.normal(getkey(), (4, d))
    queries = 0.8 * directions / jnp.linalg.norm(directions, axis=1, keepdims=True)  # |x| = 0.8

    a = jnp.einsum("pdk,pek->pde", theta.wq, theta.wk)
    u = beta * jnp.einsum("pde,qd->qpe", a, queries)
    assert float(jnp.max(jnp.einsum("qpd,de,qpe->qp", u, cov, u))) <= 2.0

    ys = sample(getkey(), mean, cov, n)
    est = jax.jit(lambda y: mfattn.velocity(theta, queries, y, jnp.full((y.shape[0],), 1.0 / y.shape[0]), beta=beta))
    full = est(ys)
    per_batch = jax.lax.map(est, ys.reshape(batches, n // batches, d))
    tol = 5 * jnp.std(per_batch, axis=0, ddof=1) / np.sqrt(batches)

    closed = jax.vmap(lambda x: gaussian_velocity(theta, mean, cov, x, beta=beta))(queries)
    no_tilt = jax.vmap(lambda x: gaussian_velocity(theta, mean, cov, x, beta=0.0))(queries)
    assert float(jnp.max(jnp.abs(full - closed) / tol)) <= 1.0
    assert float(jnp.linalg.norm(closed - no_tilt)) >= 20 * float(jnp.linalg.norm(tol))
    # beta = 0 is exact: Gamma = B m for any sample mean m.
    np.testing.assert_allclose(
        mfattn.velocity(theta, queries, ys, jnp.full((n,), 1.0 / n), beta=0.0),
        jax.vmap(lambda x: gaussian_velocity(theta, jnp.mean(ys, axis=0), cov, x, beta=0.0))(queries),
        rtol=1e-10,
    )


def test_gaussian_velocity_is_affine_with_the_closure_matrix(getkey):
    """``x -> gaussian_velocity(x)`` is affine; its Jacobian is ``M = avg_h beta B_h S A_h^T`` formed from
    the d x d matrices (independently of the k-dimensional evaluation in the module)."""
    d, beta = 3, 0.7
    theta = jax.tree.map(lambda w: w[0], mfattn.init_params(getkey(), 1, 5, d, 2, scale=1.0))
    mean, cov = jax.random.normal(getkey(), (d,)), spd(getkey(), [0.2, 1.0, 2.0])
    f = lambda x: gaussian_velocity(theta, mean, cov, x, beta=beta)
    a = jnp.einsum("pdk,pek->pde", theta.wq, theta.wk)
    b = jnp.einsum("pdk,pek->pde", theta.wo, theta.wv)
    jac = jnp.mean(beta * jnp.einsum("pab,bc,pdc->pad", b, cov, a), axis=0)
    x = jax.random.normal(getkey(), (d,))
    np.testing.assert_allclose(jax.jacfwd(f)(x), jac, rtol=1e-12)
    np.testing.assert_allclose(f(x), jnp.mean(b, axis=0) @ mean + jac @ x, rtol=1e-12)


def test_particles_follow_the_closure():
    """N = 4000 tokens drawn from N(m0, S0) and moved by ``limit.forward`` keep the mean and covariance of
    the closure ODE, to Monte-Carlo accuracy.

    Tolerance, derived from N. The closure's flow is affine, x -> m(t) + Psi(t) (x - m0) with
    S(t) = Psi S0 Psi^T, so the initial sampling error propagates exactly: the empirical mean is off by
    Psi (xbar0 - m0), whose covariance is S(t) / N (standard error sqrt(tr S(t) / N)), and the empirical
    covariance by Psi (S0_hat - S0) Psi^T, with E|.|_F^2 = (tr S(t)^2 + |S(t)|_F^2) / N for Gaussian
    samples. The empirical measure's field differs from the Gaussian one by another O(N^-1/2) term
    (propagated by the Lipschitz flow over [0, 1]). We allow 6 of these standard errors:

        |mean_N(t) - m(t)|   <= 6 sqrt(tr S(t) / N)
        |cov_N(t) - S(t)|_F  <= 6 sqrt((tr S(t)^2 + |S(t)|_F^2) / N)

    and require the closure to move by >= 8 (mean) and >= 3 (covariance) of these tolerances over [0, 1].
    Measured: errors <= 0.35 of the tolerance; a closure with A^T in place of A (or B^T for B) misses by 2-5
    tolerances. The same bound is checked from the sample's own moments (the initial error removed).

    The ensemble has non-symmetric means (rotations), so that A != A^T and B != B^T, a contracting value
    map (B ~ -R) and queries that grow along the grid (W_Q scaled by 1 + t/2), so the field varies in t.
    The particle solve takes fixed Tsit5 steps of 1/4 (onto the grid) to keep the N^2 work small; the same
    steps on the closure ODE are checked to be within 1% of the tolerance of the adaptive solution."""
    n, d, beta = 4000, 2, 1.0
    keys = jax.random.split(jax.random.key(0), 2)
    eye = jnp.eye(d)
    grid = limit.uniform_grid(5)
    ens = limit.init_ensemble(
        keys[0], 5, 4, d, d, init="mean_noise", scale=0.3, mean=(rotation(0.7), eye, eye, -rotation(-0.5))
    )
    ens = eqx.tree_at(lambda e: e.wq, ens, ens.wq * (1 + 0.5 * grid)[:, None, None, None])
    m0 = jnp.array([1.0, -0.5])
    s0 = jnp.array([[1.0, 0.3], [0.3, 0.6]])
    x0 = sample(keys[1], m0, s0, n)
    ts = jnp.linspace(0.0, 1.0, 5)
    fixed = dict(stepsize_controller=diffrax.ConstantStepSize(), dt0=0.25)

    means, covs = softmax_closure(ens, m0, s0, beta=beta, ts=ts)
    tr = jnp.trace(covs, axis1=1, axis2=2)
    tol_m = 6 * jnp.sqrt(tr / n)
    tol_c = 6 * jnp.sqrt((tr**2 + jnp.sum(covs**2, axis=(1, 2))) / n)
    assert float(jnp.linalg.norm(means[-1] - means[0])) >= 8 * float(tol_m[-1])
    assert float(jnp.linalg.norm(covs[-1] - covs[0])) >= 3 * float(tol_c[-1])
    means_fixed, covs_fixed = softmax_closure(ens, m0, s0, beta=beta, ts=ts, **fixed)
    assert float(jnp.max(jnp.linalg.norm(means_fixed - means, axis=1) / tol_m)) <= 0.01
    assert float(jnp.max(jnp.linalg.norm(covs_fixed - covs, axis=(1, 2)) / tol_c)) <= 0.01

    xs = limit.forward(ens, x0, beta=beta, ts=ts, **fixed)
    emp_m, emp_c = moments(xs)
    err_m = jnp.linalg.norm(emp_m - means, axis=1) / tol_m
    err_c = jnp.linalg.norm(emp_c - covs, axis=(1, 2)) / tol_c
    assert float(jnp.max(err_m)) <= 1.0, err_m
    assert float(jnp.max(err_c)) <= 1.0, err_c

    means_e, covs_e = softmax_closure(ens, emp_m[0], emp_c[0], beta=beta, ts=ts)
    err_m = jnp.linalg.norm(emp_m - means_e, axis=1) / tol_m
    err_c = jnp.linalg.norm(emp_c - covs_e, axis=(1, 2)) / tol_c
    assert float(jnp.max(err_m)) <= 1.0, err_m
    assert float(jnp.max(err_c)) <= 1.0, err_c


def test_beta_zero_is_linear(getkey):
    """beta = 0: S' = 0 and m' = Bbar(t) m with Bbar the particles' average of B = W_O W_V^T. For a
    time-constant ensemble m(t) = expm(t Bbar) m0; for a piecewise-constant one on the grid (0, 1/2, 1),
    m(1) = expm(Bbar_1 / 2) expm(Bbar_0 / 2) m0."""
    d = 3
    m0, s0 = jax.random.normal(getkey(), (d,)), spd(getkey(), [0.5, 1.0, 1.5])
    ts = jnp.linspace(0.0, 1.0, 4)
    bbar = lambda theta: jnp.mean(jnp.einsum("pdk,pek->pde", theta.wo, theta.wv), axis=0)

    ens = limit.init_ensemble(getkey(), 3, 5, d, 2, init="mean_noise", scale=0.5)
    means, covs = softmax_closure(ens, m0, s0, beta=0.0, ts=ts)
    expected = jax.vmap(lambda t: jax.scipy.linalg.expm(t * bbar(jax.tree.map(lambda w: w[0], ens))) @ m0)(ts)
    np.testing.assert_allclose(means, expected, rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(covs, jnp.broadcast_to(s0, covs.shape))

    ens = mfattn.init_params(getkey(), 3, 5, d, 2, init="mean_noise", scale=0.5)  # differs at every grid time
    means, _ = softmax_closure(ens, m0, s0, beta=0.0, ts=jnp.array([1.0]), interpolation="piecewise")
    layer = lambda j: jax.tree.map(lambda w: w[j], ens)
    expected = jax.scipy.linalg.expm(bbar(layer(1)) / 2) @ jax.scipy.linalg.expm(bbar(layer(0)) / 2) @ m0
    np.testing.assert_allclose(means[0], expected, rtol=1e-7, atol=1e-9)


def test_one_dimensional_exact_solution():
    """d = 1, time-constant heads with a_h = W_Q W_K, b_h = W_O W_V, c = avg_h a_h b_h, bbar = avg_h b_h:
    S' = 2 beta c S^2 and m' = (bbar + beta c S) m, so

        S(t) = S0 / (1 - 2 beta c S0 t),   m(t) = m0 exp(bbar t) (1 - 2 beta c S0 t)^(-1/2)."""
    w = lambda *v: jnp.broadcast_to(jnp.array(v)[None, :, None, None], (2, len(v), 1, 1))
    ens = mfattn.Params(wq=w(1.2, 0.5), wk=w(0.8, -1.0), wv=w(1.0, 0.7), wo=w(0.9, 1.3))
    a, b = np.array([0.96, -0.5]), np.array([0.9, 0.91])
    beta, m0, s0 = 1.3, 0.7, 0.4
    ts = jnp.linspace(0.0, 1.0, 5)
    means, covs = softmax_closure(ens, jnp.array([m0]), jnp.array([[s0]]), beta=beta, ts=ts)
    q = 1 - 2 * beta * np.mean(a * b) * s0 * np.asarray(ts)
    np.testing.assert_allclose(covs[:, 0, 0], s0 / q, rtol=1e-7)
    np.testing.assert_allclose(means[:, 0], m0 * np.exp(np.mean(b) * np.asarray(ts)) / np.sqrt(q), rtol=1e-7)


def test_jit_with_traced_arguments(getkey):
    ens = limit.init_ensemble(getkey(), 3, 4, 2, 2, init="mean_noise", scale=0.3)
    m0, s0 = jnp.array([0.5, -1.0]), jnp.array([[0.5, 0.1], [0.1, 0.3]])
    ts = jnp.linspace(0.0, 1.0, 3)
    run = jax.jit(lambda m, s, b: softmax_closure(ens, m, s, beta=b, ts=ts))
    for got, want in zip(run(m0, s0, 0.8), softmax_closure(ens, m0, s0, beta=0.8, ts=ts)):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_bad_input_raises_clear_errors(getkey, no_jaxtyping):
    ens = limit.init_ensemble(getkey(), 3, 4, 2, 2, init="mean_noise", scale=0.3)
    m0, s0 = jnp.array([0.5, -1.0]), jnp.array([[0.5, 0.1], [0.1, 0.3]])
    ts = jnp.linspace(0.0, 1.0, 3)
    f = lambda **kw: softmax_closure(**{"ensemble": ens, "mean0": m0, "cov0": s0, "beta": 1.0, "ts": ts, **kw})
    with pytest.raises(ValueError, match=r"mean0 must have shape \(d,\) = \(2,\)"):
        f(mean0=jnp.zeros(3))
    with pytest.raises(ValueError, match=r"cov0 must have shape \(d, d\) = \(2, 2\)"):
        f(cov0=jnp.eye(3))
    with pytest.raises(ValueError, match="cov0 must be symmetric"):
        f(cov0=s0.at[0, 1].add(0.1))
    with pytest.raises(ValueError, match="cov0 must be positive semidefinite"):
        f(cov0=jnp.diag(jnp.array([1.0, -0.1])))
    with pytest.raises(ValueError, match="beta must be >= 0"):
        f(beta=-1.0)
    with pytest.raises(ValueError, match="mean0 contains NaN"):
        f(mean0=m0.at[0].set(jnp.nan))
    with pytest.raises(ValueError, match="interpolation must be"):
        f(interpolation="cubic")
    with pytest.raises(ValueError, match="grid must have shape"):
        f(grid=jnp.linspace(0.0, 1.0, 4))
    with pytest.raises(ValueError, match="grid must be strictly increasing"):
        f(grid=jnp.array([0.0, 0.5, 0.5]))
    with pytest.raises(ValueError, match="ts must be non-decreasing and within"):
        f(ts=jnp.array([0.0, 1.5]))
    with pytest.raises(ValueError, match="must be an mfattn.Params"):
        f(ensemble=(ens.wq, ens.wk, ens.wv, ens.wo))
    f(cov0=jnp.zeros((2, 2)))  # a point mass is a (degenerate) Gaussian
    run = jax.jit(lambda s: f(cov0=s))
    with pytest.raises(Exception, match="cov0 must be positive semidefinite"):
        jax.block_until_ready(run(jnp.diag(jnp.array([1.0, -0.1]))))
