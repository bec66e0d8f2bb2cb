"""Spreading ensembles and batches over devices with ``jax.sharding`` (a 1-D mesh).

The parameter-particle axis ``M`` of an ensemble (leaves ``(K+1, M, d, k)``) and the batch axis of token
sequences are embarrassingly parallel except for one reduction: the velocity and adjoint field average
over the particles. Placing the inputs with a :class:`jax.sharding.NamedSharding` is all it takes; the
jitted computations of :mod:`mfattn` are unchanged and XLA (GSPMD) inserts the all-reduce over particles::

    mesh = mfattn.sharding.make_mesh()                    # all local devices, axis "devices"
    ensemble = mfattn.sharding.shard_particles(ensemble, mesh)
    tokens, weights, targets = mfattn.sharding.shard_batch((tokens, weights, targets), mesh)
    value, g, _ = mfattn.limit.batch_grad_map(ensemble, tokens, weights, targets, loss, beta=1.0)

Several GPUs or TPUs of one host work the same way (``jax.devices()`` lists them). Several hosts: call
``jax.distributed.initialize()`` at start-up on every host; ``jax.devices()`` then lists the devices of all
hosts, ``make_mesh()`` spans them, and each host passes the same program (build the global arrays with
``jax.make_array_from_process_local_data`` from each host's share of the particles or of the batch).
On CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set before JAX starts) simulates four
devices, which is how the tests check that sharded and single-device results agree.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["make_mesh", "shard_particles", "shard_batch", "replicate", "force_host_devices"]


def make_mesh(devices=None, axis_name: str = "devices") -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device JAX sees, across hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis_name,))


def _put(tree, mesh: Mesh, spec_for):
    def place(x):
        spec = spec_for(x)
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(place, tree)


def _check_divisible(name, size, mesh):
    n = mesh.devices.size
    if size % n:
        raise ValueError(f"{name} of size {size} cannot be split evenly over {n} devices; use a multiple of {n}.")


def shard_particles(ensemble, mesh: Mesh):
    """Place an ensemble (leaves ``(T, M, d, k)``) with its particle axis ``M`` split over the mesh."""
    axis = mesh.axis_names[0]
    for leaf in jax.tree.leaves(ensemble):
        _check_divisible("the particle axis", leaf.shape[1], mesh)
    return _put(ensemble, mesh, lambda x: PartitionSpec(None, axis))


def shard_batch(tree, mesh: Mesh):
    """Place every leaf of ``tree`` with its leading (batch) axis split over the mesh."""
    axis = mesh.axis_names[0]
    for leaf in jax.tree.leaves(tree):
        _check_divisible("the batch axis", leaf.shape[0], mesh)
    return _put(tree, mesh, lambda x: PartitionSpec(axis))


def replicate(tree, mesh: Mesh):
    """Place every leaf of ``tree`` whole on every device of the mesh."""
    return _put(tree, mesh, lambda x: PartitionSpec())


def force_host_devices(n: int) -> None:
    """Split the CPU into ``n`` simulated devices (``XLA_FLAGS=--xla_force_host_platform_device_count=n``).

    XLA:CPU runs each device's program on its own threads, so on a multi-core CPU a mesh of simulated devices
    can be faster than one device (``mfattn rates --host-devices``; see ``benchmarks/rates_mesh.py``). Call it
    before anything has run on JAX: the flag is read when JAX first starts its CPU backend. Raises
    ``RuntimeError`` (and leaves ``XLA_FLAGS`` as it was) when the backend is already running with another
    count. On a GPU or TPU the CPU's devices are not used.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"force_host_devices: n must be a positive integer, got {n!r}.")
    before = os.environ.get("XLA_FLAGS")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", before or "").split()
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
    have = len(jax.devices("cpu"))
    if have != n:
        if before is None:
            del os.environ["XLA_FLAGS"]
        else:
            os.environ["XLA_FLAGS"] = before
        raise RuntimeError(
            f"force_host_devices({n}): JAX's CPU backend is already running with {have} device(s). Call it "
            f"before any JAX computation, or set XLA_FLAGS=--xla_force_host_platform_device_count={n} before "
            "starting Python."
        )
