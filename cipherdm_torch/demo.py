"""A small three-party demo: the user's secret tensor is shared, computed on, revealed to the user."""

from __future__ import annotations

import torch

from .cost import CostMeter
from .runtime import launch, party


def _demo_party(x: torch.Tensor, w: torch.Tensor):
    """One party's view: share x (from the user) and w (from the owner), compute relu(x @ w)."""
    import crypten

    p = party()
    with CostMeter() as meter:
        with meter.region("share"):
            ex = crypten.cryptensor(x, src=p.roles.user)
            ew = crypten.cryptensor(w, src=p.roles.owner)
        with meter.region("matmul"):
            y = ex.matmul(ew)
        with meter.region("relu"):
            y = y.relu()
        with meter.region("reveal"):  # only the user receives the other shares
            out = y.get_plain_text(dst=p.roles.user)
    share_view = ex.share[:4].tolist()  # what this party holds of x: random-looking ring elements
    return {"rank": p.rank, "result": out if p.is_user else None, "share_view": share_view,
            "cost": meter.as_dict()}


def run_demo(seed: int = 0) -> dict:
    """Run the demo in three local parties and return what each reported."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(4, 8, generator=g), torch.randn(8, 3, generator=g)
    results = launch(_demo_party, x, w)
    user = next(r for r in results if r["result"] is not None)
    return {"x": x, "w": w, "expected": (x @ w).relu(), "result": user["result"],
            "parties": results}


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="cipherdm demo", description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print("Three local parties: P0 = model owner (w), P1 = user (x), P2 = helper.")
    print("Computing relu(x @ w) on secret shares...")
    out = run_demo(args.seed)
    err = (out["result"] - out["expected"]).abs().max().item()
    print("\nresult revealed to the user:\n", out["result"])
    print(f"plaintext reference max abs difference: {err:.2e}")
    print("\nper party: first shares of x it holds (ring elements), bytes sent / received, rounds")
    for r in out["parties"]:
        t = r["cost"]["total"]
        print(f"  P{r['rank']}: shares {r['share_view'][0][:2]}...  sent {t['bytes_sent']:,} B  "
              f"received {t['bytes_received']:,} B  rounds {t['rounds']}")
    return 0 if err < 1e-2 else 1
