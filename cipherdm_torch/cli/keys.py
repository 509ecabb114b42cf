"""``cipherdm keys --out DIR``: one TLS identity (private key + pinned self-signed certificate)
per party, for runs across machines (see SECURITY.md)."""

from __future__ import annotations

import argparse
from typing import List

from cipherdm_torch.errors import UserError, positive_int
from cipherdm_torch.mpc import identity

HELP = "create the parties' TLS identities (one key and pinned certificate per party)"
__all__ = ["HELP", "configure", "run"]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder to create (mode 0700)")
    p.add_argument("--parties", type=positive_int, default=3, help="number of parties (default 3)")


def run(args: argparse.Namespace, argv: List[str]) -> int:
    try:
        identity.create(args.out, args.parties)
    except (FileExistsError, ValueError, OSError) as exc:
        raise UserError(f"cipherdm keys: {exc}") from None
    print(f"wrote {args.parties} identities to {args.out}/ (party<r>.key, party<r>.crt).\n"
          f"Copy every .crt to every host and party<r>.key only to party r's host; start each "
          f"party with CIPHERDM_KEYS=<folder> (see SECURITY.md).")
    return 0
