# %% [markdown]
# # mfattn quickstart: the particle transformer and its hand-derived gradients
#
# A jupytext "percent" script: run it as `python notebooks/01_quickstart.py`, or open it in Jupyter
# with jupytext. Sizes are small so that it runs in seconds on a laptop CPU.

# %%
import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)

import mfattn  # noqa: E402
from mfattn.losses import TokenRegression  # noqa: E402

key = jax.random.key(0)
k1, k2, k3 = jax.random.split(key, 3)
depth, heads, n, dim, head_dim, beta = 6, 4, 10, 3, 3, 2.0
params = mfattn.init_params(k1, depth, heads, dim, head_dim, init="mean_noise", dtype=jnp.float64)
tokens = jax.random.normal(k2, (n, dim))
weights = jnp.full(n, 1.0 / n).at[-1].set(0.0)  # the last token is padding
weights = weights / weights.sum()
targets = jax.random.normal(k3, (n, dim))

# %% [markdown]
# ## Forward pass: the tokens move as interacting particles

# %%
traj = mfattn.forward(params, tokens, beta=beta, weights=weights)
print("trajectory", traj.shape, "| displacement of each token:", jnp.linalg.norm(traj[-1] - traj[0], axis=-1))

# %% [markdown]
# ## Backward pass: rescaled adjoints p^l = (1/m_i) d loss / d x_i^l and the gradient map

# %%
loss = TokenRegression()
p = mfattn.adjoint(params, traj, loss.lions(traj[-1], weights, targets), beta=beta, weights=weights)
g = mfattn.param_grad(params, traj, p, beta=beta, weights=weights)
value, grads = mfattn.loss_and_grad(params, tokens, loss, beta=beta, weights=weights, targets=targets)
_, grads_ad = mfattn.loss_and_grad(params, tokens, loss, beta=beta, weights=weights, targets=targets, method="autodiff")
err = max(
    float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ad))
)
print(f"loss {float(value):.6f}; hand vs autodiff gradient, largest relative error {err:.2e}")
assert err < 1e-10

# %% [markdown]
# ## The same check at any size, from the command line: `mfattn gradcheck --depth 8 --beta 50`

# %%
from mfattn.gradcheck import gradcheck  # noqa: E402

print(gradcheck(depth=3, heads=2, tokens=5, dim=3, head_dim=2, beta=5.0))
