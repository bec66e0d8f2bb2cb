"""Strict test settings (after diffrax's test/conftest.py).

* float64 enabled: gradient checks are made in double precision;
* ``jax_numpy_rank_promotion="raise"``: no silent broadcasting between ranks;
* jaxtyping + beartype runtime shape checking of every annotated function in ``mfattn`` is switched
  on by ``--jaxtyping-packages`` in pyproject's pytest ``addopts``.
"""

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


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
