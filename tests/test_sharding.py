"""Sharding over 4 simulated host devices gives the single-device numbers (to 1e-12)."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from mfattn import sharding


def test_sharded_equals_single_device():
    script = pathlib.Path(__file__).with_name("_sharded_run.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][0]
    err_limit, err_discrete = map(float, line.split()[1:])
    assert err_limit <= 1e-12 and err_discrete <= 1e-12, line


def test_uneven_split_is_rejected(no_jaxtyping):
    mesh = sharding.make_mesh(jax.devices()[:1] * 1)
    assert sharding.shard_batch(np.zeros((3, 2)), mesh).shape == (3, 2)  # one device: anything divides
    fake = type("M", (), {"devices": np.zeros(4), "axis_names": ("devices",)})()
    with pytest.raises(ValueError, match="cannot be split evenly over 4 devices"):
        sharding.shard_batch(np.zeros((3, 2)), fake)


@pytest.mark.slow  # four rates runs in a subprocess, about 90 s; the sharded kernels are checked above
def test_rates_on_a_device_mesh_equals_single_device():
    script = pathlib.Path(__file__).with_name("_sharded_rates.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][0]
    _, worst, shapes = line.split()
    assert shapes == "4x1,2x2", line  # the seed axis alone, then seeds and particles
    # results.csv holds 7 significant digits: a float64 rounding difference may move the last one
    assert float(worst) <= 2e-6, line


def test_rates_mesh_shape(no_jaxtyping):
    """The mesh takes the largest share of the devices each axis divides, and none on one device."""
    from mfattn.rates import RatesConfig
    from mfattn.rates.driver import mesh

    devices = [object()] * 8  # the mesh only arranges them
    shape = lambda **kw: dict(mesh(RatesConfig(**{"search_pilots": 0, **kw}), devices).shape)  # noqa: E731
    assert shape(seeds=2, particles=4096) == {"seeds": 2, "particles": 4}  # 1024 per replica
    assert shape(seeds=8, particles=4096) == {"seeds": 8, "particles": 1}
    assert shape(seeds=3, particles=4096) == {"seeds": 1, "particles": 8}
    assert shape(seeds=6, particles=24) == {"seeds": 2, "particles": 2}  # 6 per replica; 2 of 8 devices idle
    assert shape(seeds=2, particles=4096, shard_particles=False) == {"seeds": 2, "particles": 1}
    assert shape(seeds=4, particles=4096, shard_seeds=False) == {"seeds": 1, "particles": 8}
    assert mesh(RatesConfig(seeds=2, particles=4096), devices[:1]) is None
    assert mesh(RatesConfig(seeds=3, particles=20, search_pilots=0), devices[:4]) is None
    # The pilots are trained draws too: 6 seeds and 2 pilots fill the seed axis of 8 devices.
    assert shape(seeds=6, search_pilots=2, particles=4096) == {"seeds": 8, "particles": 1}


def test_force_host_devices():
    """Before JAX runs anything the CPU splits into n devices; afterwards a clear error, XLA_FLAGS untouched."""
    code = (
        "from mfattn.sharding import force_host_devices; import jax; "
        "force_host_devices(3); assert len(jax.devices()) == 3, jax.devices(); "
        "force_host_devices(3)"  # the same count again is fine
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=7"  # replaced, not appended to
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jax.devices()  # this process's backend is running with its one CPU device
    before = os.environ.get("XLA_FLAGS")
    with pytest.raises(RuntimeError, match="already running with 1 device"):
        sharding.force_host_devices(2)
    assert os.environ.get("XLA_FLAGS") == before
    with pytest.raises(ValueError, match="positive integer"):
        sharding.force_host_devices(0)
