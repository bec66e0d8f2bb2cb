"""Run in a subprocess with 4 forced host devices: sharded and single-device results must agree."""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mfattn  # noqa: E402
from mfattn import limit, sharding  # noqa: E402
from mfattn.losses import TokenRegression  # noqa: E402
from mfattn.train import batch_grad_map  # noqa: E402


def main():
    assert len(jax.devices()) == 4, jax.devices()
    k = jax.random.split(jax.random.key(0), 5)
    ens = limit.init_ensemble(k[0], 4, 8, 3, 2, init="mean_noise", scale=0.5, dtype=jnp.float64)
    x = jax.random.normal(k[1], (4, 5, 3), jnp.float64)
    w = jax.random.dirichlet(k[2], jnp.ones(5), (4,))
    y = jax.random.normal(k[3], (4, 5, 3), jnp.float64)
    loss = TokenRegression()
    ref = limit.batch_grad_map(ens, x, w, y, loss, beta=1.0, rtol=1e-9, atol=1e-11)
    mesh = sharding.make_mesh()
    ens_s = sharding.shard_particles(ens, mesh)
    x_s, w_s, y_s = sharding.shard_batch((x, w, y), mesh)
    assert len(ens_s.wq.sharding.device_set) == 4
    out = limit.batch_grad_map(ens_s, x_s, w_s, y_s, loss, beta=1.0, rtol=1e-9, atol=1e-11)
    err_limit = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(out[:2]), jax.tree.leaves(ref[:2]))
    )
    # the discrete model: batch sharded, heads sharded
    params = mfattn.init_params(k[4], 3, 8, 3, 2, dtype=jnp.float64)
    ref_d = jax.jit(lambda p, x, w, y: batch_grad_map(p, x, w, y, loss, beta=1.0))(params, x, w, y)
    out_d = jax.jit(lambda p, x, w, y: batch_grad_map(p, x, w, y, loss, beta=1.0))(
        sharding.shard_particles(params, mesh), x_s, w_s, y_s
    )
    err_discrete = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(out_d), jax.tree.leaves(ref_d))
    )
    print(f"RESULT {err_limit:.3e} {err_discrete:.3e}")


if __name__ == "__main__":
    sys.exit(main())
