"""``protocols.config.use(backend=...)``: one setting selects the protocols and CrypTen's
backend."""

import contextlib
import subprocess
import sys

import pytest
import torch

import cipherdm_torch  # noqa: F401
import crypten
import crypten.mpc

from cipherdm_torch import CostMeter
from cipherdm_torch.protocols import config, functions as P
from cipherdm_torch.protocols.replicated import arith as rss_arith, backend as rss_backend


def test_config_imports_neither_crypten_nor_a_backend():
    code = ("import sys\n"
            "import cipherdm_torch.protocols.config as c\n"
            "assert 'rss' in c.BACKENDS and 'crypten' in c.BACKENDS\n"
            "heavy = [m for m in sys.modules if m == 'crypten' or m.startswith('crypten.')\n"
            "         or m.startswith('cipherdm_torch.protocols.replicated')]\n"
            "assert not heavy, heavy\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_backend_switches_crypten_protocol_for_the_block():
    before = crypten.cfg.mpc.protocol
    assert config.current().backend is None
    with config.use(backend="rss") as outer:
        assert outer.backend == "rss" and crypten.cfg.mpc.protocol == "rss"
        assert rss_backend.is_active()
        with config.use("baseline", backend="crypten") as inner:
            assert crypten.cfg.mpc.protocol == "beaver" and not rss_backend.is_active()
            assert inner.backend == "crypten" and inner.silu == "baseline"
        assert crypten.cfg.mpc.protocol == "rss" and config.current().silu == "optimised"
        with config.use(exp_squarings=5) as knob:  # no backend given: the one in force stays
            assert knob.backend == "rss" and crypten.cfg.mpc.protocol == "rss"
    assert crypten.cfg.mpc.protocol == before and config.current().backend is None


def test_unknown_backend_is_refused_before_anything_changes():
    before = crypten.cfg.mpc.protocol
    with pytest.raises(ValueError, match="backend must be one of"):
        with config.use("baseline", backend="aby3"):
            pass
    assert crypten.cfg.mpc.protocol == before and config.current() == config.Settings()


def _body(x, how):
    calls = []
    original = crypten.mpc.get_default_provider

    def counting():
        calls.append(1)
        return original()

    crypten.mpc.get_default_provider = counting
    try:
        with contextlib.ExitStack() as blocks:
            if how == "two settings":  # what a caller had to write before
                rss_backend.install()
                blocks.enter_context(crypten.cfg.temp_override({"mpc.protocol": "rss"}))
                blocks.enter_context(config.use("optimised"))
            else:
                blocks.enter_context(config.use("optimised", backend=how))
            rss_arith.helper_rotation.calls = 0  # same truncation helpers in both runs
            ex = crypten.cryptensor(x)
            with CostMeter() as m:
                y = P.softmax(ex * ex, -1)
            protocol = crypten.cfg.mpc.protocol
        return y.get_plain_text(), m.total.bytes_sent, m.total.rounds, len(calls), protocol
    finally:
        crypten.mpc.get_default_provider = original


def test_one_setting_runs_the_backend_in_three_parties(parties):
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    ref = (x * x).softmax(-1)
    rss = parties.run(_body, x, "rss", timeout=300)
    both = parties.run(_body, x, "two settings", timeout=300)
    beaver = parties.run(_body, x, "crypten", timeout=300)
    for (y, sent, rounds, provider, protocol), (_, sent2, rounds2, _, _) in zip(rss, both):
        assert protocol == "rss" and provider == 0  # dealer-free: no Beaver provider asked
        assert (sent, rounds) == (sent2, rounds2)  # same protocols as setting both by hand
        assert (y - ref).abs().max() < 0.01
    for y, _, _, provider, protocol in beaver:
        assert protocol == "beaver" and provider > 0
        assert (y - ref).abs().max() < 0.01
