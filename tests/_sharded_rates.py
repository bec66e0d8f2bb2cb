"""Run in a subprocess with 4 forced host devices: the rates experiment on a (seeds x particles) mesh must give
the numbers of the single-device run.

Two layouts (the quick configuration's one pilot draw is trained beside the seeds, on the seed axis too): 3 seeds
and the pilot, one per device (the seed axis alone), and 1 seed and the pilot on a 2 x 2 mesh (the limit's
parameter particles split too, so XLA sums partial particle averages across devices). In float64 the differences are
rounding only, far below the 7 significant digits that results.csv keeps.
Prints ``RESULT <worst relative difference> <mesh shapes>``.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from mfattn.rates import load_config, run  # noqa: E402
from mfattn.rates.driver import mesh  # noqa: E402
from mfattn.rates.io import folder  # noqa: E402

NUMERIC = ["pointwise_err", "uniform_err", "uniform_test_set", "uniform_search", "param_gap", "pointwise_mc"]


def rows(path, cfg):
    return sorted(folder(cfg, path).rows(), key=lambda r: (r["seed"], r["depth"], r["heads"]))


def main():
    assert len(jax.devices()) == 4
    out = tempfile.mkdtemp()
    worst, shapes = 0.0, []
    for seeds in (3, 1):
        results = {}
        for shard in (True, False):
            cfg = load_config(quick=True, overrides=dict(seeds=seeds, shard_seeds=shard, shard_particles=shard,
                                                         precision="float64", particles=128))  # fmt: skip
            m = mesh(cfg)
            if shard:
                shapes.append(f"{m.shape['seeds']}x{m.shape['particles']}")
            else:
                assert m is None
            path = os.path.join(out, f"{seeds}_{shard}")
            run(cfg, path)
            results[shard] = rows(path, cfg)
        assert len(results[True]) == len(results[False]) == seeds * 4
        for a, b in zip(results[True], results[False]):
            assert a["uniform_source"] == b["uniform_source"]
            for c in NUMERIC:
                x, y = float(a[c]), float(b[c])
                worst = max(worst, abs(x - y) / max(abs(y), 1e-300))
    print(f"RESULT {worst:.3e} {','.join(shapes)}")


if __name__ == "__main__":
    main()
