"""Micro-benchmark: CrypTen's ``replicated`` mode vs the dealer-free replicated backend (rss).

Both run in one session of three real processes on the same inputs. For each
operation it prints bytes sent per element by each party (P0/P1/P2), rounds (the
most any party waited, CostMeter conventions), wall time (slowest party) and the
max error against plaintext. Rows marked "(operands replicated)" start from
operands whose replica share is already cached (the steady state inside a
network, where inputs come out of a previous multiplication / truncation);
the other rows start from freshly input sharings (CrypTen's layout).

    /work/venv/bin/python bench/bench_replicated.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

import crypten

from cipherdm_torch import PartyPool
from cipherdm_torch.mpc.cost import CostMeter


def _cases(g):
    x = torch.randn(64, 64, generator=g) * 4
    y = torch.randn(64, 64, generator=g) * 4
    a = torch.randn(64, 256, generator=g)
    b = torch.randn(256, 256, generator=g) / 16
    img = torch.randn(1, 32, 28, 28, generator=g)
    k = torch.randn(32, 32, 3, 3, generator=g) / 16
    return x, y, a, b, img, k


def _party(x, y, a, b, img, k):
    from cipherdm_torch.protocols.replicated import arith as ra
    from cipherdm_torch.protocols.replicated import backend as rss_backend, compare as rss_compare

    rss_backend.install()
    rows = []

    def measure(name, mode, fn, ref, n, replicated=False):
        """Run ``fn`` on fresh sharings of the inputs (or on replicated ones)."""
        fn(*fresh())  # warm-up (first calls pay one-off allocation costs)
        ops = fresh()
        if replicated:
            ra.replicate_many([o.share for o in ops])
        with CostMeter() as m:
            out = fn(*ops)
        # decoded by hand: CrypTen 0.4.1's decoder divides negatives by 2^16 - 1
        err = (out.reveal().double() / out.encoder.scale - ref.double()).abs().max().item()
        t = m.total
        rows.append(dict(op=name, mode=mode, n=n, sent=t.bytes_sent, rounds=t.rounds,
                         seconds=t.seconds, err=err))

    for mode in ("replicated", "rss"):
        with crypten.cfg.temp_override({"mpc.protocol": mode}):
            def fresh():
                ex, ey = crypten.cryptensor(x, src=0), crypten.cryptensor(y, src=1)
                return ex, ey

            n = x.numel()
            measure("mul 64x64", mode, lambda ex, ey: ex * ey, x * y, n)
            if mode == "rss":
                measure("mul 64x64 (operands replicated)", mode, lambda ex, ey: ex * ey, x * y,
                        n, replicated=True)
            measure("truncation (x * 0.37)", mode, lambda ex, ey: ex * 0.37, x * 0.37, n)
            measure("ReLU 64x64", mode, lambda ex, ey: ex.relu(), x.relu(), n)
            measure("x < 0.5 64x64", mode, lambda ex, ey: ex < 0.5, (x < 0.5).float(), n)
            measure("max over rows 64x64 (MPCTensor.max)", mode,
                    lambda ex, ey: ex.max(dim=1)[0], x.max(1)[0], n)
            if mode == "rss":
                measure("max over rows 64x64 (tree)", mode,
                        lambda ex, ey: rss_compare.max(ex, 1), x.max(1)[0], n)

            def fresh():  # noqa: F811  (the secret bit is made outside the meter)
                ex, ey = crypten.cryptensor(x, src=0), crypten.cryptensor(y, src=1)
                return ex < ey, ex, ey

            measure("select by secret bit 64x64 (where)", mode,
                    lambda bit, ex, ey: crypten.where(bit, ex, ey), torch.minimum(x, y), n)
            if mode == "rss":
                measure("select by secret bit 64x64 (rss_compare.select)", mode,
                        lambda bit, ex, ey: rss_compare.select(bit, ex, ey), torch.minimum(x, y),
                        n)

            def fresh():  # noqa: F811
                return crypten.cryptensor(a, src=1), crypten.cryptensor(b, src=0)

            measure("matmul 64x256x256", mode, lambda ea, eb: ea.matmul(eb), a @ b, 64 * 256)
            if mode == "rss":
                measure("matmul 64x256x256 (operands replicated)", mode,
                        lambda ea, eb: ea.matmul(eb), a @ b, 64 * 256, replicated=True)

            def fresh():  # noqa: F811
                return crypten.cryptensor(img, src=1), crypten.cryptensor(k, src=0)

            ref_conv = torch.conv2d(img, k, padding=1)
            measure("conv2d 32x28x28, 32x3x3", mode, lambda ei, ek: ei.conv2d(ek, padding=1),
                    ref_conv, ref_conv.numel())
            if mode == "rss":
                measure("conv2d 32x28x28, 32x3x3 (operands replicated)", mode,
                        lambda ei, ek: ei.conv2d(ek, padding=1), ref_conv, ref_conv.numel(),
                        replicated=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the raw rows here")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    with PartyPool(3, threads=1) as pool:
        results = pool.run(_party, *_cases(g))
    merged = []
    for k, row in enumerate(results[0]):
        per = [r[k] for r in results]
        merged.append(dict(op=row["op"], mode=row["mode"], n=row["n"],
                           bytes_per_elem=[p["sent"] / p["n"] for p in per],
                           rounds=max(p["rounds"] for p in per),
                           seconds=max(p["seconds"] for p in per), max_err=row["err"]))
    hdr = f"{'operation':48s} {'backend':10s} {'B/elem sent P0/P1/P2':>24s} {'rounds':>6s} " \
          f"{'time s':>8s} {'max err':>10s}"
    print(hdr)
    print("-" * len(hdr))
    order = {}
    for r in merged:
        key = r["op"].replace(" (operands replicated)", "").split(" (")[0]
        order.setdefault(key, []).append(r)
    for _, group in order.items():
        for r in group:
            b = "/".join(f"{v:.1f}" for v in r["bytes_per_elem"])
            print(f"{r['op']:48s} {r['mode']:10s} {b:>24s} {r['rounds']:6d} "
                  f"{r['seconds']:8.3f} {r['max_err']:10.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(merged, f, indent=1)


if __name__ == "__main__":
    main()
