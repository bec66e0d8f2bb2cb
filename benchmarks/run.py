"""The whole benchmark suite (the same as ``mfattn bench``): forward, hand adjoint against
``jax.value_and_grad``, a training step, compile times, the limit's forward-backward solve and, with
``--rates``, the default ``mfattn rates``; one table with every target met or its gap, JSON in ``--out``.

    python benchmarks/run.py [--quick] [--only NAME ...] [--rates] [--out benchmarks/results/bench.json]
"""

from __future__ import annotations

import sys

from mfattn.bench import main

if __name__ == "__main__":
    sys.exit(main())
