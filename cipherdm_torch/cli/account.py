"""``cipherdm account``: the noise multiplier for a budget (epsilon, delta), or the epsilon of
a noise multiplier, for Poisson-sampled DP-SGD (``--check`` cross-checks with Google's
``dp-accounting``)."""

from __future__ import annotations

import argparse
import json
import math
from typing import List

from cipherdm_torch.cli.options import sample_rate
from cipherdm_torch.errors import UserError, open_unit_float, positive_float, positive_int
from cipherdm_torch.training.accounting import (dp_accounting_epsilon, epsilon_spent,
                                                noise_multiplier_for)

HELP = "noise multiplier for (epsilon, delta), or epsilon for a noise multiplier"
__all__ = ["HELP", "configure", "run"]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epsilon", type=positive_float, default=None)
    p.add_argument("--sigma", type=positive_float, default=None)
    p.add_argument("--delta", type=open_unit_float, default=1e-5)
    p.add_argument("--q", type=sample_rate, default=None,
                   help="sample rate (or give --batch-size, --n)")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--n", type=positive_int, default=60000, help="data set size")
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--epochs", type=positive_float, default=None)
    p.add_argument("--accountant", choices=["rdp", "prv"], default="rdp")
    p.add_argument("--check", action="store_true", help="also compute with Google's dp_accounting")


def run(args: argparse.Namespace, argv: List[str]) -> int:
    if args.q is not None and args.batch_size is not None:
        raise UserError("give either --q or --batch-size (with --n), not both")
    if args.batch_size is not None and args.batch_size > args.n:
        raise UserError(f"--batch-size {args.batch_size} is larger than the data set (--n "
                        f"{args.n}): the expected batch is at most the data set")
    q = args.q if args.q is not None else (args.batch_size / args.n if args.batch_size else None)
    if q is None:
        raise UserError("give --q or --batch-size (with --n)")
    if args.steps is not None and args.epochs is not None:
        raise UserError("give either --steps or --epochs, not both")
    steps = args.steps if args.steps is not None else (
        max(1, int(round(args.epochs / q))) if args.epochs is not None else None)
    if steps is None:
        raise UserError("give --steps or --epochs")
    out = {"q": q, "steps": steps, "delta": args.delta, "accountant": args.accountant}
    if args.sigma is None:
        if args.epsilon is None:
            raise UserError("give --epsilon (to get sigma) or --sigma (to get epsilon)")
        out["sigma"] = noise_multiplier_for(args.epsilon, args.delta, q, steps, args.accountant)
    elif args.epsilon is not None:
        raise UserError("give either --epsilon (to get sigma) or --sigma (to get epsilon), not both")
    else:
        out["sigma"] = args.sigma
    hist = [(out["sigma"], q, steps)]
    out["epsilon"] = epsilon_spent(hist, args.delta, args.accountant)
    if args.check:
        out["dp_accounting_rdp"] = dp_accounting_epsilon(hist, args.delta, "rdp")
        out["dp_accounting_pld"] = dp_accounting_epsilon(hist, args.delta, "pld")
    print(json.dumps(out, indent=2))
    return 0 if math.isfinite(out["epsilon"]) else 1
