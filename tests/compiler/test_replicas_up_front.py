"""A forward's secret weights and inputs are re-shared in ONE round before it runs (replicated
backend): a model's weights cost one round and 8 B per element per party once, in the first
forward, and never a round of their own deep inside the network; the first and the second
forward have the same rounds."""

import torch
import torch.nn as nn

import cipherdm_torch
from cipherdm_torch import CostMeter, encrypt
from cipherdm_torch.protocols import config
from cipherdm_torch.protocols.replicated import arith


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        h = torch.nn.functional.silu(self.norm(self.conv(x)))
        return self.head(h.flatten(1))


def _body(x):
    info = cipherdm_torch.party()
    torch.manual_seed(0 if info.is_owner else 7 + info.rank)
    model = _Block().eval()
    out = {"weights": sum(p.numel() for p in model.parameters())}
    with config.use("optimised", backend="rss"):
        enc = encrypt(model, (x,))
        for k in ("first", "second"):
            sx = enc.share_input("x", x if info.is_user else None)
            arith.helper_rotation.calls = 0  # the same truncation helpers in both forwards
            with CostMeter() as m:
                y = enc(sx)
            out[k] = (enc.reveal(y), m.total.rounds, m.total.bytes_sent)
    with torch.no_grad():
        out["plain"] = model(x) if info.is_owner else None
    return out


def test_weights_are_replicated_once_up_front(parties):
    x = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(2))
    results = parties.run(_body, x)
    plain = next(r["plain"] for r in results if r["plain"] is not None)
    user = next(r for r in results if r["first"][0] is not None)
    for k in ("first", "second"):
        assert (user[k][0] - plain).abs().max() < 0.02, k
    for r in results:
        assert r["first"][1] == r["second"][1], (r["first"][1], r["second"][1])
        # every party sends its share of each weight element once, to its predecessor
        assert r["first"][2] - r["second"][2] == 8 * r["weights"], (r["first"][2], r["second"][2])
