"""The cost meter against hand-computed costs (bytes per party, rounds)."""

import torch

import cipherdm_torch  # noqa: F401
from cipherdm_torch import CostMeter, party
from cipherdm_torch.mpc.cost import region
import crypten
import crypten.communicator as comm

N = 4096  # elements; int64 shares are 8 bytes


def _measure():
    """Run a few operations, each in its own region; return every region's cost."""
    rank = party().rank
    x, y = torch.randn(64, 64), torch.randn(64, 64)
    c = comm.get()
    with CostMeter() as meter:
        with meter.region("share"):
            ex, ey = crypten.cryptensor(x, src=0), crypten.cryptensor(y, src=1)
        with meter.region("reveal"):
            ex.get_plain_text()
        with crypten.cfg.temp_override({"mpc.protocol": "replicated"}):
            with meter.region("replicated_mul"):
                ex * ey
        with meter.region("ring_exchange"):  # each party sends N int64 to the next, receives from the previous
            t = torch.zeros(N, dtype=torch.long)
            reqs = [c.isend(t, dst=(rank + 1) % 3), c.irecv(t.clone(), src=(rank - 1) % 3)]
            for r in reqs:
                r.wait()
        with meter.region("broadcast_from_2"):
            c.broadcast(torch.zeros(N, dtype=torch.long), src=2)
        with region("module_level"):  # the module-level helper reaches the active meter too
            with meter.region("nested"):
                c.all_reduce(torch.zeros(10, dtype=torch.long))
    with CostMeter() as idle:
        pass
    return {"regions": {k: (v.bytes_sent, v.bytes_received, v.rounds, v.calls)
                        for k, v in meter.regions.items()},
            "total": (meter.total.bytes_sent, meter.total.bytes_received, meter.total.rounds),
            "idle": idle.as_dict()["total"], "table": meter.table()}


def test_cost_meter_matches_hand_computed_costs(parties):
    results = parties.run(_measure)
    B = 8 * N
    for rank, r in enumerate(results):
        reg = r["regions"]
        # sharing uses pseudo-random zero sharings: no communication at all
        assert reg["share"] == (0, 0, 0, 1)
        # reveal = all_reduce of the share: send it to the 2 others, receive 2, one round
        assert reg["reveal"] == (2 * B, 2 * B, 1, 1)
        # replicated mul: each party sends its shares of x and y to the next party (one round);
        # CrypTen's 3-party truncation then has party 2 send one tensor to party 1.
        expected_mul = {0: (2 * B, 2 * B, 1), 1: (2 * B, 3 * B, 2), 2: (3 * B, 2 * B, 1)}[rank]
        assert reg["replicated_mul"][:3] == expected_mul
        assert reg["ring_exchange"] == (B, B, 1, 1)
        assert reg["broadcast_from_2"] == ((2 * B, 0, 1, 1) if rank == 2 else (0, B, 1, 1))
        assert reg["module_level"] == reg["nested"] == (160, 160, 1, 1)
        sent = sum(v[0] for k, v in reg.items() if k != "nested")
        received = sum(v[1] for k, v in reg.items() if k != "nested")
        assert r["total"][:2] == (sent, received)
        assert r["idle"]["bytes_sent"] == 0 and r["idle"]["rounds"] == 0
        assert "TOTAL" in r["table"] and "replicated_mul" in r["table"]
