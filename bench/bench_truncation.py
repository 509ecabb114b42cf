"""Failure rate of the rss backend's fixed-point truncation vs the magnitude before truncation.

For each magnitude 2^k (k = encoded bits of |x| before the division, e.g. a product at
double scale 2^32 of two reals whose product is about 2^(k-32)) it truncates N additive
sharings of values with |x| in [2^(k-1), 2^k) by 2^16 in three real processes, with
both methods of :mod:`cipherdm_torch.protocols.replicated.arith`:

* ``probabilistic`` (ABY3's two-share truncation, the backend's method before issue 13),
* ``exact`` (P2-assisted, the default),

and prints per method and magnitude: the number of elements off by more than one unit
(a "failure"), the measured and the predicted rate (|x| / 2^64 averaged for the
probabilistic method, 0 for the exact one), the spread of the ordinary rounding error
and the bytes / rounds of party 0 per element::

    python bench/bench_truncation.py [--elements 1000000] [--bits 40,48,52,56,60,61] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from cipherdm_torch import PartyPool


def _values(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mag = torch.randint(2 ** (k - 1), 2 ** k, (n,), generator=g)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1, 1)
    return mag * sign


def _party(n: int, bits, divisor: int, chunk: int):
    import crypten
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor

    from cipherdm_torch.mpc.cost import CostMeter
    from cipherdm_torch.protocols.replicated import arith as ra

    comm = crypten.communicator.get()
    rank = comm.get_rank()
    rows = []
    for method in ("probabilistic", "exact"):
        for k in bits:
            x = _values(n, k, seed=k)
            fails, errs, sent, rounds = 0, {}, 0, 0
            for lo in range(0, n, chunk):
                xs = x[lo:lo + chunk]
                z = ArithmeticSharedTensor.PRZS(xs.size()).share
                if rank == 0:
                    z = z + xs
                with CostMeter() as m:
                    t, _ = ra.truncate_shares(z, divisor, method=method)
                sent += m.total.bytes_sent
                rounds = max(rounds, m.total.rounds)
                total = comm.all_reduce(t.clone())  # open (benchmark only)
                err = total - torch.div(xs, divisor, rounding_mode="floor")
                bad = err.abs() > 1
                fails += int(bad.sum())
                for v, c in zip(*err[~bad].unique(return_counts=True)):
                    errs[int(v)] = errs.get(int(v), 0) + int(c)
            predicted = (x.abs().double() / 2.0 ** 64).sum().item() if method == "probabilistic" \
                else 0.0
            rows.append(dict(method=method, bits=k, n=n, failures=fails, rate=fails / n,
                             predicted_rate=predicted / n, rounding=errs,
                             bytes_per_element=sent / n, rounds=rounds))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=1_000_000)
    ap.add_argument("--bits", default="32,40,48,52,56,58,60,61")
    ap.add_argument("--divisor", type=int, default=2 ** 16)
    ap.add_argument("--chunk", type=int, default=250_000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    bits = [int(b) for b in args.bits.split(",")]
    with PartyPool(3, threads=1) as pool:
        per_party = pool.run(_party, args.elements, bits, args.divisor, args.chunk, timeout=3600)
    rows = per_party[0]
    for r, r1, r2 in zip(rows, per_party[1], per_party[2]):
        r["bytes_per_element_p1_p2"] = (r1["bytes_per_element"], r2["bytes_per_element"])
        r["rounds"] = max(r["rounds"], r1["rounds"], r2["rounds"])
    hdr = (f"{'method':<14}{'|x| bits':>9}{'elements':>10}{'failures':>10}{'rate':>11}"
           f"{'predicted':>11}  {'rounding error (count)':<34}{'B/elt P0/P1/P2':>16}{'rounds':>7}")
    print(f"truncation by {args.divisor}; failure = off by more than one unit")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        rnd = " ".join(f"{k:+d}:{v}" for k, v in sorted(r["rounding"].items()))
        b = "/".join(f"{v:.0f}" for v in (r["bytes_per_element"], *r["bytes_per_element_p1_p2"]))
        print(f"{r['method']:<14}{r['bits']:>9}{r['n']:>10}{r['failures']:>10}{r['rate']:>11.2e}"
              f"{r['predicted_rate']:>11.2e}  {rnd:<34}{b:>16}{r['rounds']:>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
