"""softmax(x) @ v with the normalisation after the product (``functions.softmax_matmul``,
what the compiler's attention uses) in three real processes on the rss backend: the same
values as softmax then the product (both against the plaintext), on attention-shaped inputs
from the recorded UNet logit range, and fewer rounds and bytes than the two steps."""

import torch

import cipherdm_torch  # noqa: F401
import crypten

from cipherdm_torch import CostMeter
from cipherdm_torch.protocols import config, functions as P
from cipherdm_torch.protocols.replicated import arith as ra, backend as rss_backend


def _body(x, v):
    out = {}
    with rss_backend.replicated_backend(), config.use("optimised"):
        for name in ("fused", "apart"):
            ex, ev = crypten.cryptensor(x), crypten.cryptensor(v)
            ra.replicate_many([ex.share, ev.share])  # as after the q / k / v projections
            with CostMeter() as m, ra.exchange_log() as waits:
                y = P.softmax_matmul(ex, ev) if name == "fused" else P.softmax(ex, -1).matmul(ev)
            out[name] = (y.get_plain_text(), m.total.as_dict(), waits)
    with rss_backend.replicated_backend(), config.use("baseline"):
        out["baseline"] = P.softmax_matmul(crypten.cryptensor(x[:1]), crypten.cryptensor(v[:1])
                                           ).get_plain_text()
    return out


def test_softmax_matmul_normalises_after_the_product(parties):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 49, 49, generator=g) * 3  # logits of a 7x7 attention, spread ~10
    x[1, :, 0] += 9.0  # rows with one dominant entry
    v = torch.randn(2, 49, 8, generator=g) * 4
    want = torch.softmax(x, -1) @ v
    results = parties.run(_body, x, v, timeout=300)
    # rounds in which any party waits (a party's own count depends on its truncation roles)
    rounds = {name: ra.rounds_any_party([r[name][2] for r in results])
              for name in ("fused", "apart")}
    assert rounds["fused"] is not None and rounds["fused"] <= rounds["apart"] - 2, rounds
    # bytes summed over the parties (which party helps a truncation rotates)
    sent = {name: sum(r[name][1]["bytes_sent"] for r in results) for name in ("fused", "apart")}
    assert sent["fused"] < 0.95 * sent["apart"], sent
    for r in results:
        fused = r["fused"][0]
        apart = r["apart"][0]
        assert float((fused - want).abs().max()) < 0.02, float((fused - want).abs().max())
        assert float((fused - apart).abs().max()) < 0.02
        assert float((r["baseline"] - want[:1]).abs().max()) < 0.1
