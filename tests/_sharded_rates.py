"""Run in a subprocess with 4 forced host devices: the rates experiment with its 4 seeds sharded over the
devices must give the numbers of the single-device run."""

import csv
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from mfattn.rates import RatesConfig, run  # noqa: E402

NUMERIC = ["pointwise_err", "uniform_err", "uniform_test_set", "param_gap"]


def rows(path):
    with open(os.path.join(path, "results.csv"), newline="") as f:
        return sorted(csv.DictReader(f), key=lambda r: (r["seed"], r["step"], r["depth"], r["heads"]))


def main():
    assert len(jax.devices()) == 4
    # Small and without the ascent and the Monte-Carlo twin (compile time): training and evaluation of 4
    # seeds, sharded one per device, against the same run on one device.
    base = dict(
        depths=(1, 2),
        heads=(1, 2),
        seeds=4,
        steps=1,
        batch_size=2,
        particles=8,
        grid_size=3,
        test_per_family=1,
        ascent_starts=0,
        ascent_steps=0,
        mc_check=False,
        precision="float64",
    )
    out = tempfile.mkdtemp()
    results = {}
    for shard in (True, False):
        run(RatesConfig(**base, shard_seeds=shard).validate(), os.path.join(out, str(shard)), progress=False)
        results[shard] = rows(os.path.join(out, str(shard)))
    assert len(results[True]) == len(results[False]) == 4 * 4 * 2  # seeds x points x steps {0, 1}
    worst = 0.0
    for a, b in zip(results[True], results[False]):
        for c in NUMERIC:
            x, y = float(a[c]), float(b[c])
            worst = max(worst, abs(x - y) / max(abs(y), 1e-300))
    print(f"RESULT {worst:.3e}")


if __name__ == "__main__":
    sys.exit(main())
