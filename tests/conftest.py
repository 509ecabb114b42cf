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


# Every multi-party call is bounded: a deadlock fails this fast instead of hanging CI. A party
# that stops responding (no message, no heartbeat) is named sooner, after the pool's
# hang_timeout ($CIPHERDM_HANG_TIMEOUT, default 60 s).
DEFAULT_PARTY_TIMEOUT = float(os.environ.get("CIPHERDM_TEST_PARTY_TIMEOUT", 900))


class _BoundedPool(PartyPool):
    def run(self, fn, *args, timeout=None, **kwargs):
        return super().run(fn, *args, timeout=timeout or DEFAULT_PARTY_TIMEOUT, **kwargs)


@pytest.fixture(scope="session")
def parties():
    """Three long-lived parties (secure links, CrypTen initialised, communicator metered);
    every ``run`` has a timeout (``DEFAULT_PARTY_TIMEOUT`` unless the test passes one). The
    start-up gets the same bound: on a loaded machine it can take minutes, and no test
    measures it."""
    pool = _BoundedPool(world_size=3, threads=1, start_timeout=DEFAULT_PARTY_TIMEOUT)
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
