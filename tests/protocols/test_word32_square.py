"""Squarings on 32-bit words (:mod:`protocols.replicated.word32_square`) in three real
processes: floor(y^2 / 2^d) or one more for every y with y^2 < 2^31 (edges included), the
result replicated in both output rings, every party as helper, 28 B per element over the
parties for 32-bit output; and exp on the rss backend (whose chain uses them) against its
plaintext twin."""

import torch

import cipherdm_torch  # noqa: F401
import crypten

from cipherdm_torch import CostMeter
from cipherdm_torch.protocols import config, exp_softmax
from cipherdm_torch.protocols.replicated import arith as ra, backend as rss_backend, \
    word32_square as w32


def _square_body(y, d):
    rank = crypten.communicator.get().get_rank()
    out = []
    with rss_backend.replicated_backend():
        x = crypten.cryptensor(y, precision=0)
        words = w32.to_words32(x.share)
        for out64 in (False, True, False):  # the helper rotates: three different helpers
            with CostMeter() as m:
                share, nxt = w32.square_truncate32(words, d, out64=out64)
            out.append((share, nxt, m.total.as_dict()))
        with config.use("optimised"):
            e = crypten.cryptensor(-y.float() / 2 ** 12)
            out.append(exp_softmax.exp(e).get_plain_text())
    return rank, out


def test_square_truncate32_exact_within_one_and_replicated(parties):
    g = torch.Generator().manual_seed(4)
    top = int((2 ** 31 - 1) ** 0.5)  # largest y with y^2 < 2^31
    y = torch.cat([torch.tensor([0, 1, 2, 2 ** 15, top - 1, top]),
                   torch.randint(0, top + 1, (5000,), generator=g)])
    d = 15
    results = dict(parties.run(_square_body, y, d, timeout=300))
    truth = (y * y) >> d
    for call, out64 in enumerate((False, True, False)):
        shares = [results[r][call][0] for r in range(3)]
        total = (shares[0] + shares[1] + shares[2]) if out64 else \
            (shares[0].long() + shares[1].long() + shares[2].long()) & (2 ** 32 - 1)
        err = truth - total
        assert bool(((err == 0) | (err == -1)).all()), err.unique()  # floor or floor + 1
        assert shares[0].dtype == (torch.long if out64 else torch.int32)
        for r in range(3):
            assert torch.equal(results[r][call][1], shares[(r + 1) % 3])
            assert results[r][call][2]["rounds"] <= 2
        sent = sum(results[r][call][2]["bytes_sent"] for r in range(3))
        assert sent == (48 if out64 else 28) * y.numel(), (out64, sent / y.numel())
    # exp on inputs in [-8, 0] (y / 2^12): the chain's 32-bit steps against the plaintext twin
    x = -y.float() / 2 ** 12
    want = exp_softmax.reference_exp(x, config.Settings().replace(exp_squarings=6))
    for r in range(3):
        assert float((results[r][3] - want).abs().max()) < 2e-3
        assert float((results[r][3] - torch.exp(x)).abs().max()) < 2e-3
