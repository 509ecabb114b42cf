"""Shared fixtures: one three-party pool for the whole test session.

A test body that must run inside the parties is a *module-level* function
(picklable); the test calls ``parties.run(body, *args)`` and gets every party's
result, ordered by rank::

    def _body(x):
        return crypten.cryptensor(x).get_plain_text()

    def test_share(parties):
        results = parties.run(_body, torch.ones(3))
"""

import os

import pytest

from cipherdm_torch import PartyPool


@pytest.fixture(scope="session")
def parties():
    """Three long-lived parties (gloo, CrypTen initialised, communicator metered)."""
    pool = PartyPool(world_size=3, threads=1)
    with pool:
        yield pool


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """A fresh CIPHERDM_CACHE (FID statistics, feature nets) for one test module."""
    old = os.environ.get("CIPHERDM_CACHE")
    os.environ["CIPHERDM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("CIPHERDM_CACHE", None)
    else:
        os.environ["CIPHERDM_CACHE"] = old
