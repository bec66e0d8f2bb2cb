"""Strict test settings (after diffrax's test/conftest.py).

* float64 enabled: gradient checks are made in double precision;
* ``jax_numpy_rank_promotion="raise"``: no silent broadcasting between ranks;
* jaxtyping + beartype runtime shape checking of every annotated function in ``mfattn`` is switched
  on by ``--jaxtyping-packages`` in pyproject's pytest ``addopts``.
"""

import gc

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs (and the constants they hold) after each test module.

    Each xdist worker runs hundreds of tests in one process; without this its memory only grew (3.1-3.6 GB per
    worker 5 minutes into the suite on the 2-core machine), and both workers died of a segmentation fault inside
    XLA's compiler at ~90% of a run. Costs a recompilation of what a later module shares with an earlier one.
    """
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def getkey():
    """A fresh PRNG key on every call, deterministic per test."""
    key = [jax.random.key(0)]

    def _getkey():
        key[0], sub = jax.random.split(key[0])
        return sub

    return _getkey


@pytest.fixture
def no_jaxtyping():
    """Switch off the jaxtyping runtime checker for one test.

    Tests of mfattn's own error messages use it: with the checker on, a mis-shaped argument is caught
    first by the annotation (a ``TypeCheckError``); users, who run without the pytest hook, get mfattn's
    ``ValueError`` naming the argument, which is what those tests check.
    """
    import jaxtyping

    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)


@pytest.fixture(scope="session")
def rates_quick_run(tmp_path_factory, worker_id):
    """The ``--quick`` rates configuration, run once per test session (about a minute) into a temporary folder.

    Shared by the end-to-end and resume tests (tests/test_rates.py) and by notebook 02, which reads the
    run folder (tests/test_notebooks.py). Under pytest-xdist the workers share one folder: the first to
    arrive runs it under a file lock, the others then find every row written and only redo the fits
    (``run`` resumes). Returns ``(config, folder, summary)``; treat the folder as read-only (copy it to
    modify it).
    """
    from mfattn.rates import load_config, run

    cfg = load_config(quick=True)
    if worker_id == "master":
        out = str(tmp_path_factory.mktemp("rates") / "quick")
        return cfg, out, run(cfg, out)
    root = tmp_path_factory.getbasetemp().parent  # shared by the workers of this session
    out = str(root / "rates-quick")
    with open(root / "rates-quick.lock", "w") as lock:
        _lock(lock)
        return cfg, out, run(cfg, out)


def _lock(f):
    """Block until this process holds an exclusive lock on the open file ``f`` (POSIX; elsewhere no lock,
    and each worker may then run the configuration itself, which is correct but slower)."""
    try:
        import fcntl
    except ImportError:
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
