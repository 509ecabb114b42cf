"""``cipherdm demo``: the end-to-end job on the embedded DP-trained MNIST model.

Three local parties securely sample one digit per class from the model shipped in the package
(trained with DP-SGD by ``cipherdm train``; its privacy ledger ships beside the weights), then
the demo prints where the PNG grid and the JSON cost report are, the ledger, and the fidelity
against plaintext sampling with the same noise. ``cipherdm demo --basic`` runs the small
tensor demo instead: the user's secret tensor is shared, computed on, revealed to the user.
"""

from __future__ import annotations

import argparse
import os
from typing import List

import torch

from cipherdm_torch.cli.sample import add_timeout_arg, apply_timeout
from cipherdm_torch.errors import check_out_dir, positive_int
from cipherdm_torch.mpc.cost import CostMeter
from cipherdm_torch.mpc.crypten_compat import crypten
from cipherdm_torch.mpc.runtime import Roles, launch, party
from cipherdm_torch.pipelines.job import (DEVICES, SampleSpec, check_device, embedded_model_dir,
                                          run_job, summary)
from cipherdm_torch.training.ledger import LEDGER_FILE, PrivacyLedger

HELP = "end-to-end demo: three parties securely sample digits from the embedded DP model"
__all__ = ["HELP", "configure", "run", "run_demo"]


def _demo_party(x: torch.Tensor = None, w: torch.Tensor = None):
    """One party's view: share x (from the user) and w (from the owner), compute relu(x @ w)."""
    p = party()
    with CostMeter() as meter:
        with meter.region("share"):  # x exists only in the user's process, w in the owner's
            ex = crypten.cryptensor(x if p.is_user else torch.empty(0), src=p.roles.user,
                                    broadcast_size=True)
            ew = crypten.cryptensor(w if p.is_owner else torch.empty(0), src=p.roles.owner,
                                    broadcast_size=True)
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
    roles = Roles()
    results = launch(_demo_party, roles=roles, private={roles.user: {"x": x},
                                                         roles.owner: {"w": w}})
    user = next(r for r in results if r["result"] is not None)
    return {"x": x, "w": w, "expected": (x @ w).relu(), "result": user["result"],
            "parties": results}


def basic_demo(seed: int) -> int:
    print("Three local parties: P0 = model owner (w), P1 = user (x), P2 = helper.")
    print("Computing relu(x @ w) on secret shares...")
    out = run_demo(seed)
    err = (out["result"] - out["expected"]).abs().max().item()
    print("\nresult revealed to the user:\n", out["result"])
    print(f"plaintext reference max abs difference: {err:.2e}")
    print("\nper party: first shares of x it holds (ring elements), bytes sent / received, rounds")
    for r in out["parties"]:
        t = r["cost"]["total"]
        print(f"  P{r['rank']}: shares {r['share_view'][0][:2]}...  sent {t['bytes_sent']:,} B  "
              f"received {t['bytes_received']:,} B  rounds {t['rounds']}")
    return 0 if err < 1e-2 else 1


def ledger_summary(model_dir: str) -> str:
    """The privacy ledger shipped with the weights, in a few lines."""
    path = os.path.join(model_dir, LEDGER_FILE)
    if not os.path.exists(path):
        return f"no privacy ledger at {path}"
    led = PrivacyLedger.load(path).to_dict()  # epsilon recomputed from the history
    keys = ("epsilon_spent", "epsilon_budget", "delta", "accountant", "steps",
            "expected_batch_size", "noise_multiplicity", "max_grad_norm", "dataset_name",
            "dataset_size", "dataset_fingerprint")
    shown = {k: led[k] for k in keys if k in led}
    notes = led.get("notes", {})
    for k in ("noise_multiplier", "sample_rate", "parameters"):
        if k in notes:
            shown[k] = notes[k]
    return f"privacy ledger ({path}):\n" + "\n".join(f"  {k}: {v}" for k, v in shown.items())


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--basic", action="store_true", help="the small tensor demo only")
    parser.add_argument("--seed", type=int, default=0, help="the user's noise seed")
    parser.add_argument("--steps", type=positive_int, default=8, help="Euler sampling steps")
    parser.add_argument("--out", default="cipherdm-demo", help="output folder")
    parser.add_argument("--backend", choices=("rss", "crypten"), default="rss")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="where the ring products run: cpu, cuda or auto (see sample)")
    add_timeout_arg(parser)


def run(args: argparse.Namespace, argv: List[str]) -> int:
    apply_timeout(args.timeout)
    if args.basic:
        return basic_demo(args.seed)
    check_out_dir(args.out)
    check_device(args.device)
    model = embedded_model_dir()
    print(ledger_summary(model))
    print(f"\nthree local parties (P0 owner, P1 user, P2 helper) securely sample one digit per "
          f"class, Euler {args.steps} steps, optimised protocols on the {args.backend} backend...")
    spec = SampleSpec(model=model, sampler="euler", steps=args.steps, labels=list(range(10)),
                      seed=args.seed, backend=args.backend, device=args.device)
    print(summary(run_job(spec, args.out, check=True)))
    return 0
