"""Run in a subprocess with 4 forced host devices: the rates experiment on a (seeds x particles) mesh must give
the numbers of the single-device run.

Two layouts: 4 seeds, one per device (the seed axis alone), and 2 seeds on a 2 x 2 mesh (the limit's parameter
particles split too, so XLA sums partial particle averages across devices). In float64 the differences are
rounding only, far below the 7 significant digits that results.csv keeps.
Prints ``RESULT <worst relative difference> <mesh shapes>``.
"""

import csv
import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from mfattn.rates import RatesConfig, _mesh, run  # noqa: E402

NUMERIC = ["pointwise_err", "uniform_err", "uniform_test_set", "uniform_ascent", "param_gap", "mc_err"]


def rows(path):
    with open(os.path.join(path, "results.csv"), newline="") as f:
        return sorted(csv.DictReader(f), key=lambda r: (r["seed"], r["step"], r["depth"], r["heads"]))


def main():
    assert len(jax.devices()) == 4
    # Small (compile time dominates): training, evaluation, one ascent step and the Monte-Carlo twin.
    base = dict(depths=(1, 2), heads=(1, 2), steps=1, batch_size=2, particles=8, grid_size=3, test_per_family=1,
                ascent_starts=1, ascent_steps=1, precision="float64")  # fmt: skip
    out = tempfile.mkdtemp()
    worst, shapes = 0.0, []
    for seeds in (4, 2):
        results = {}
        for shard in (True, False):
            cfg = RatesConfig(**base, seeds=seeds, shard_seeds=shard, shard_particles=shard).validate()
            mesh = _mesh(cfg)
            if shard:
                shapes.append(f"{mesh.shape['seeds']}x{mesh.shape['particles']}")
            else:
                assert mesh is None
            path = os.path.join(out, f"{seeds}_{shard}")
            run(cfg, path, progress=False)
            with open(os.path.join(path, "summary.json")) as f:
                assert json.load(f)["device"]["mesh"] == (None if mesh is None else dict(mesh.shape))
            results[shard] = rows(path)
        assert len(results[True]) == len(results[False]) == seeds * 4 * 2  # seeds x points x steps {0, 1}
        for a, b in zip(results[True], results[False]):
            assert a["uniform_source"] == b["uniform_source"]
            for c in NUMERIC:
                x, y = float(a[c]), float(b[c])
                worst = max(worst, abs(x - y) / max(abs(y), 1e-300))
    print(f"RESULT {worst:.3e} {','.join(shapes)}")


if __name__ == "__main__":
    sys.exit(main())
