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


@pytest.mark.slow  # two rates runs in a subprocess, about 45 s; the sharded kernels are checked above
def test_rates_with_seeds_sharded_equals_single_device():
    script = pathlib.Path(__file__).with_name("_sharded_rates.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][0]
    assert float(line.split()[1]) <= 1e-12, line
