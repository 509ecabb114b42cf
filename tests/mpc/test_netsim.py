"""Emulated links delay each party by latency per round plus bytes / bandwidth."""

import time

import pytest
import torch

import cipherdm_torch  # noqa: F401
from cipherdm_torch.mpc import netsim
import crypten


def test_profiles_and_parsing():
    assert netsim.parse("lan").latency_s == 1e-4 and netsim.parse("lan").bandwidth_bps == 1e9
    wan = netsim.parse("wan")
    assert wan.delay(sent_bytes=12_500_000, rounds=2) == pytest.approx(1.0 + 0.08)
    custom = netsim.parse("10:5")
    assert custom.bandwidth_bps == 10e6 and custom.latency_s == 5e-3
    with pytest.raises(ValueError, match="Mbit/s"):
        netsim.parse("fast")


def _timed_reveals(link):
    x = crypten.cryptensor(torch.zeros(125_000))  # 1 MB of shares
    x.get_plain_text()  # warm-up
    if link:
        netsim.activate(link)
    try:
        t0 = time.perf_counter()
        for _ in range(3):
            x.get_plain_text()  # 3 rounds, 2 MB sent each
        return time.perf_counter() - t0
    finally:
        netsim.deactivate()


def test_emulated_link_slows_parties_by_the_model(parties):
    base = max(parties.run(_timed_reveals, None))
    slow = max(parties.run(_timed_reveals, "100:50"))  # 100 Mbit/s, 50 ms
    expected = 3 * 0.05 + 3 * 8 * 2e6 / 100e6  # 0.15 s latency + 0.48 s bandwidth
    assert slow >= expected  # each party sleeps the modelled delay itself
    assert slow < base + expected + 2.0
