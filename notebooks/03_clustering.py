# %% [markdown]
# # Clustering of tokens, the phase diagram on the circle, and the Gaussian closure
#
# A jupytext "percent" script: run it as `python notebooks/03_clustering.py`, or open it in Jupyter with
# jupytext. Sizes are small so that it runs in seconds on a laptop CPU; figures are saved to
# `$MFATTN_NOTEBOOK_OUT` (default: a temporary folder; printed at the end).
#
# Tokens on the unit circle move through a deep transformer with `W_Q = W_K = W_V = I` and the normalised
# residual `x <- (x + h F) / |x + h F|` (Geshkovski, Letrouit, Polyanskiy and Rigollet): they cluster. We
# follow one sequence, measure the clustering with `mfattn.metrics`, draw a small phase diagram over
# (time, beta), and finally compare particles with the Gaussian closure of the mean-field limit
# (Castin et al.).

# %%
import os
import tempfile

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

jax.config.update("jax_enable_x64", True)

import mfattn  # noqa: E402
from mfattn import limit, phase  # noqa: E402
from mfattn.gaussian import softmax_closure  # noqa: E402
from mfattn.metrics import aligned_fraction, diameter, num_clusters, wasserstein2  # noqa: E402

figures = os.environ.get("MFATTN_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="mfattn_nb03_")
os.makedirs(figures, exist_ok=True)

# %% [markdown]
# ## Token trajectories on the circle
#
# `L` layers of one head with identity projections and `W_O = T I`: each layer advances the time by `T / L`
# (`mfattn.phase.identity_params`). The angles of the tokens merge into a few clusters quickly, and the
# clusters then merge slowly (metastability).

# %%
n, time, steps, beta = 24, 30.0, 300, 4.0
params = phase.identity_params(steps, 2, time)
x0 = phase.uniform_on_sphere(jax.random.key(0), (n, 2))
weights = jnp.full((n,), 1.0 / n)
traj = mfattn.forward(params, x0, beta=beta, weights=weights, attention=mfattn.Attention(residual="sphere"))
path = np.asarray(traj)  # (L+1, N, 2); post-processing in NumPy
times = np.linspace(0.0, time, steps + 1)
angles = np.unwrap(np.arctan2(path[..., 1], path[..., 0]), axis=0)  # (L+1, N), continuous in time
angles -= 2 * np.pi * np.round((angles[-1] - angles[-1, 0]) / (2 * np.pi))  # end within pi of token 0's end
print("trajectory", path.shape, "| max | |x| - 1 |:", np.max(np.abs(np.linalg.norm(path, axis=-1) - 1)))

fig = Figure(figsize=(9, 3.5), layout="constrained")
ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
ax1.plot(times, angles, lw=0.8)
ax1.set(xlabel="time t", ylabel="angle of x_i(t)", title=f"N = {n} tokens, beta = {beta:g}")
circle = np.linspace(0, 2 * np.pi, 200)
ax2.plot(np.cos(circle), np.sin(circle), color="0.8")
ax2.plot(path[0, :, 0], path[0, :, 1], "o", ms=3, label="t = 0")
ax2.plot(path[-1, :, 0], path[-1, :, 1], "o", ms=6, mfc="none", label=f"t = {time:g}")
ax2.set_aspect("equal")
ax2.legend(fontsize=7, loc="center")
fig.savefig(f"{figures}/trajectories.png", dpi=100)

# %% [markdown]
# ## Clustering diagnostics over time
#
# All are pure, jittable functions of `(tokens (N, d), weights (N,))` (weight 0 = padding, ignored):
# the diameter (largest chord), the number of clusters at linking distance 0.1 (connected components of
# the threshold graph), the fraction of aligned pairs (`<x_i, x_j> > 1 - 1e-2`), and the exact W2 distance
# to the final configuration.

# %%
every = 10


@jax.jit
def diagnostics(traj, weights):
    per_layer = lambda x: (diameter(x, weights), num_clusters(x, weights, 0.1), aligned_fraction(x, weights))
    w2 = jax.vmap(lambda x: wasserstein2(x, weights, traj[-1], weights))(traj[::every])
    return (*jax.vmap(per_layer)(traj), w2)


diam, clusters, aligned, w2 = (np.asarray(v) for v in diagnostics(traj, weights))
for t in (0.0, 5.0, 10.0, 20.0, 30.0):
    k = int(round(t / time * steps))
    print(
        f"t = {t:4.1f}: diameter {diam[k]:.3f}, clusters {clusters[k]:2d}, "
        f"aligned pairs {aligned[k]:.3f}, W2 to the end {w2[k // every]:.3f}"
    )
assert clusters[-1] < clusters[0] and aligned[-1] > aligned[0]

fig = Figure(figsize=(9, 3), layout="constrained")
axes = fig.subplots(1, 3)
axes[0].plot(times, clusters)
axes[0].set(xlabel="time t", ylabel="clusters (threshold 0.1)")
axes[1].plot(times, aligned, label="aligned pairs")
axes[1].plot(times, diam / 2, label="diameter / 2")
axes[1].set(xlabel="time t")
axes[1].legend(fontsize=7)
axes[2].plot(times[::every], w2)
axes[2].set(xlabel="time t", ylabel="W2(mu_t, mu_T)")
fig.savefig(f"{figures}/diagnostics.png", dpi=100)

# %% [markdown]
# ## A small phase diagram
#
# The fraction of aligned pairs over (time, beta), averaged over random initial conditions: one compiled
# program, vmapped over beta and seeds. `mfattn phase` draws a larger one (`--quick` for this size).
# Small beta: fast collapse to one cluster; larger beta: metastable plateaus, the time to 90% grows.

# %%
cfg = phase.PhaseConfig(tokens=16, betas=(0.0, 1.0, 2.0, 3.0, 4.0, 6.0), time=30.0, steps=150, seeds=4)
result = phase.phase_diagram(cfg)
phase.plot_phase(result, f"{figures}/phase.png", cfg)
print(phase.table(result, cfg))

# %% [markdown]
# ## The Gaussian closure: particles against the moment ODE
#
# For softmax attention in R^d (plain residual), a Gaussian measure stays Gaussian along the mean-field
# limit, with mean and covariance solving a `d + d^2`-dimensional ODE (`mfattn.gaussian.softmax_closure`).
# We move `N = 500` particles drawn from `N(m0, S0)` with the limit (`mfattn.limit.forward`, fixed Tsit5
# steps of 1/8) and compare their empirical moments with the closure: the gaps are of the Monte-Carlo size
# `N^(-1/2)`. (`tests/test_gaussian.py` makes this a test with derived tolerances.)


# %%
def rotation(a):
    return jnp.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


d, particles, beta_g = 2, 500, 1.0
eye = jnp.eye(d)
ens = limit.init_ensemble(
    jax.random.key(1), 5, 4, d, d, init="mean_noise", scale=0.3, mean=(rotation(0.7), eye, eye, -rotation(-0.5))
)
m0, s0 = jnp.array([1.0, -0.5]), jnp.array([[1.0, 0.3], [0.3, 0.6]])
xg = m0[None, :] + jax.random.normal(jax.random.key(2), (particles, d)) @ jnp.linalg.cholesky(s0).T
ts = jnp.linspace(0.0, 1.0, 9)
means, covs = softmax_closure(ens, m0, s0, beta=beta_g, ts=ts)
fixed = dict(stepsize_controller=diffrax.ConstantStepSize(), dt0=0.125)
xs = limit.forward(ens, xg, beta=beta_g, ts=ts, **fixed)  # (T, N, d)


def moments(x):
    """Empirical mean (T, d) and covariance (T, d, d) of x: (T, N, d), in NumPy."""
    x = np.asarray(x)
    m = x.mean(axis=1)
    c = x - m[:, None, :]
    return m, np.einsum("tni,tnj->tij", c, c) / x.shape[1]


em, ec = moments(xs)
# compare with the closure started from the sample's own moments (the sampling error at t = 0 removed)
mm, cc = (np.asarray(v) for v in softmax_closure(ens, jnp.asarray(em[0]), jnp.asarray(ec[0]), beta=beta_g, ts=ts))
print(
    f"particles: max |mean - closure| {np.max(np.linalg.norm(em - mm, axis=1)):.2e}, "
    f"max |cov - closure|_F {np.max(np.linalg.norm(ec - cc, axis=(1, 2))):.2e} "
    f"(the closure moves by {np.linalg.norm(mm[-1] - mm[0]):.2f} and {np.linalg.norm(cc[-1] - cc[0]):.2f}; "
    f"N^-1/2 = {particles**-0.5:.2f})"
)
assert np.max(np.linalg.norm(em - mm, axis=1)) < 3 * particles**-0.5
means, covs = np.asarray(means), np.asarray(covs)
fig = Figure(figsize=(9, 3), layout="constrained")
axes = fig.subplots(1, 2)
for i in range(d):
    (line,) = axes[0].plot(ts, means[:, i], label=f"m_{i + 1}: closure (line), particles (dots)")
    axes[0].plot(ts, em[:, i], "o", ms=4, color=line.get_color())
for i, j in ((0, 0), (0, 1), (1, 1)):
    (line,) = axes[1].plot(ts, covs[:, i, j], label=f"S_{i + 1}{j + 1}")
    axes[1].plot(ts, ec[:, i, j], "o", ms=4, color=line.get_color())
axes[0].set(xlabel="t", title="mean")
axes[1].set(xlabel="t", title="covariance")
axes[0].legend(fontsize=6)
axes[1].legend(fontsize=6)
fig.savefig(f"{figures}/gaussian_closure.png", dpi=100)
print("figures in", figures)
