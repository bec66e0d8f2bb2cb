"""The layer scan of :mod:`mfattn.particles` with each layer's heads carried in the loop (today's) against the
plain ``lax.scan`` over the stacked heads (the previous implementation, kept here), on the Euler limits of the rates
experiment: ``L`` layers of thousands of heads, few tokens (the lanes kernels), and on a discrete model's sizes.

    python benchmarks/layer_scan.py

Prints a table and writes benchmarks/results/layer_scan.json. The numbers must agree (float32: 1e-5 relative).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from _util import machine, measure, write_json

from mfattn import adjoint_field, velocity
from mfattn.params import Params
from mfattn.particles import adjoint, forward


def plain_forward(params, x, w):
    """The previous forward: ``lax.scan`` with the heads as the scanned input (a dynamic slice per layer)."""
    L = params.wq.shape[0]

    def layer(x, theta):
        x = x + velocity(theta, x, x, w, beta=1.0, check=False) / L
        return x, x

    _, traj = jax.lax.scan(layer, x, params)
    return jnp.concatenate([x[None], traj])


def plain_adjoint(params, traj, terminal, w):
    """The previous adjoint recursion (softmax, no projection: the pullback is the identity)."""
    L = params.wq.shape[0]

    def layer(p, xs):
        theta, x = xs
        p = p + adjoint_field(theta, x, p, w, beta=1.0, check=False) / L
        return p, p

    _, ps = jax.lax.scan(layer, terminal, (params, traj[:-1]), reverse=True)
    return jnp.concatenate([ps, terminal[None]])


def main():
    rows = []
    for L, P, N, d in [(32, 2048, 4, 2), (8, 8192, 4, 2), (16, 8, 64, 16), (16, 8, 256, 16), (64, 4, 1024, 16)]:
        ks = jax.random.split(jax.random.key(0), 6)
        params = Params(*(0.5 * jax.random.normal(ks[i], (L, P, d, d)) for i in range(4)))
        x = 0.5 * jax.random.normal(ks[4], (N, d))
        p = jax.random.normal(ks[5], (N, d))
        w = jnp.full((N,), 1.0 / N)
        traj = forward(params, x, beta=1.0, weights=w)
        ops = {
            "forward": (
                lambda q, x, w=w: forward(q, x, beta=1.0, weights=w),
                lambda q, x, w=w: plain_forward(q, x, w),
                x,
            ),
            "adjoint": (
                lambda q, t, p=p, w=w: adjoint(q, t, p, beta=1.0, weights=w),
                lambda q, t, p=p, w=w: plain_adjoint(q, t, p, w),
                traj,
            ),
        }
        for op, (new, old, arg) in ops.items():
            m_new, m_old = measure(new, params, arg), measure(old, params, arg)
            a, b = np.asarray(jax.jit(new)(params, arg)), np.asarray(jax.jit(old)(params, arg))
            rel = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
            assert rel < 1e-5, (op, rel)
            rows.append(
                {
                    "op": op,
                    "L": L,
                    "heads": P,
                    "N": N,
                    "d": d,
                    "carried_ms": 1e3 * m_new["median_s"],
                    "plain_ms": 1e3 * m_old["median_s"],
                    "speedup": m_old["median_s"] / m_new["median_s"],
                    "carried_compile_s": m_new["compile_s"],
                    "plain_compile_s": m_old["compile_s"],
                    "max_rel_diff": rel,
                }
            )
    hdr = f"{'op':<8}{'L':>4}{'heads':>7}{'N':>6}{'d':>4}{'carried ms':>12}{'plain ms':>10}{'speedup':>9}"
    hdr += f"{'compile s':>14}"
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        lines.append(
            f"{r['op']:<8}{r['L']:>4}{r['heads']:>7}{r['N']:>6}{r['d']:>4}{r['carried_ms']:>12.2f}{r['plain_ms']:>10.2f}"
            f"{r['speedup']:>8.2f}x{r['carried_compile_s']:>7.2f}/{r['plain_compile_s']:.2f}"
        )
    print("\n".join(lines))
    out = os.path.join(os.path.dirname(__file__), "results", "layer_scan.json")
    write_json(out, {"machine": machine(), "rows": rows, "table": "\n".join(lines)})


if __name__ == "__main__":
    main()
