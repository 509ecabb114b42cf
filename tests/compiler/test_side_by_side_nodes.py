"""Independent secret ops of the graph run side by side: the same values as one after the
other, in fewer rounds (three parties, replicated backend)."""

import torch
import torch.nn as nn

import cipherdm_torch
from cipherdm_torch import CostMeter, encrypt
from cipherdm_torch.protocols import config, side_by_side
from cipherdm_torch.protocols.replicated import lockstep


class _ThreeHeads(nn.Module):
    """q, k, v projections of one input (independent), then a product of two of them."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        return (q * k) + v


def _body(x):
    info = cipherdm_torch.party()
    torch.manual_seed(0 if info.is_owner else 5 + info.rank)
    model = _ThreeHeads().eval()
    out = {}
    with config.use("optimised", backend="rss"):
        enc = encrypt(model, (x,))
        enc(enc.share_input("x", x if info.is_user else None))  # re-shares the weights once
        for mode, runner in (("together", lockstep.run_together), ("sequential", None)):
            side_by_side.register_runner(runner)
            try:
                sx = enc.share_input("x", x if info.is_user else None)
                with CostMeter() as m:
                    y = enc(sx)
                out[mode] = (enc.reveal(y), m.total.rounds, m.total.bytes_sent)
            finally:
                side_by_side.register_runner(lockstep.run_together)
    with torch.no_grad():
        out["plain"] = model(x) if info.is_owner else None
    return out


def test_independent_projections_share_rounds(parties):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    results = parties.run(_body, x)
    plain = next(r["plain"] for r in results if r["plain"] is not None)
    user = next(r for r in results if r["together"][0] is not None)  # reveal: user only
    for mode in ("together", "sequential"):
        assert torch.allclose(user[mode][0], plain, atol=2e-3), mode
    rounds = {mode: sum(r[mode][1] for r in results) for mode in ("together", "sequential")}
    sent = {mode: sum(r[mode][2] for r in results) for mode in ("together", "sequential")}
    assert sent["together"] == sent["sequential"]
    # three projections (2 rounds of truncation each) in the rounds of one: 4 rounds fewer on
    # the critical path; a party counts only rounds in which it receives (a truncation's helper
    # receives nothing), so per party at least 2 fewer and over the parties at least 6
    per_party = {mode: [r[mode][1] for r in results] for mode in ("together", "sequential")}
    assert max(per_party["together"]) <= max(per_party["sequential"]) - 2, per_party
    assert rounds["together"] <= rounds["sequential"] - 6, per_party

