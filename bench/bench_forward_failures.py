"""Rate of wrong encrypted forwards and its cause: truncation wraps, counted one by one.

Runs the CipherDM-sized MNIST UNet of ``bench_unet_forward.py`` (attention at 14x14) on the
rss backend ``--forwards`` times, reusing the same input shares (as a sampler does), with
the truncation method given by ``--truncation`` (``probabilistic`` = the two-share method the
backend used before issue 13, ``exact`` = the default now). With ``--audit`` every
truncation input is also opened (benchmark only, not secure) so that each forward reports:

* the number of truncated elements and the expected number of wraps of the two-share method,
  sum over elements of |x| / 2^64 (x the encoded value before the division),
* the number of elements whose truncation result is off by more than one unit (a wrap),
* the forward's max / mean error against the plaintext forward.

It also prints party 0's MB sent and rounds per forward (with ``--audit`` these include the
audit's openings). A forward is "wrong" when its max error exceeds 1.0 (the outputs are
about unit scale)::

    python bench/bench_forward_failures.py --forwards 20 --truncation probabilistic --audit
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

import cipherdm_torch
from cipherdm_torch import launch


def _audited(original, log):
    """Wrap ``truncate_shares``: open input and output (benchmark only) and count wraps."""
    import crypten

    def run(z, y, method=None):
        t, t_next = original(z, y, method=method)
        comm = crypten.communicator.get()
        x = comm.all_reduce(z.clone())
        got = comm.all_reduce(t.clone())
        yy = y if isinstance(y, int) else y.to(torch.long)
        if torch.is_tensor(yy):
            x = x.expand(torch.broadcast_shapes(x.shape, yy.shape))
        want = torch.div(x, yy, rounding_mode="floor")
        log["elements"] += x.numel()
        log["expected_wraps"] += (x.abs().double() / 2.0 ** 64).sum().item()
        log["wraps"] += int(((got - want).abs() > 1).sum())
        log["max_abs_x_bits"] = max(log["max_abs_x_bits"],
                                    float(torch.log2(x.abs().double().max() + 1)))
        return t, t_next

    return run


def _party(forwards, truncation, audit, variant="optimised"):
    from bench_unet_forward import _inputs, make_model
    from cipherdm_torch import encrypt
    from cipherdm_torch.mpc.cost import CostMeter
    from cipherdm_torch.protocols import config
    from cipherdm_torch.protocols.replicated import arith as rss_arith, backend as rss_backend

    info = cipherdm_torch.party()
    x, t, y = _inputs(1)
    enc = encrypt(make_model(0 if info.is_owner else 1), (x, t, y))
    original = rss_arith.truncate_shares
    rows = []
    with rss_backend.replicated_backend(), config.use(variant, truncation=truncation):
        sx = enc.share_input("sample", x if info.is_user else None)
        sy = enc.share_input("class_labels", y if info.is_user else None)
        for _ in range(forwards):
            log = {"elements": 0, "expected_wraps": 0.0, "wraps": 0, "max_abs_x_bits": 0.0}
            if audit:
                rss_arith.truncate_shares = _audited(original, log)
            t0 = time.perf_counter()
            try:
                with CostMeter() as m:
                    out = enc(sx, t, sy)[0]
            finally:
                rss_arith.truncate_shares = original
            log["seconds"] = time.perf_counter() - t0
            log["mb_sent"], log["rounds"] = m.total.bytes_sent / 1e6, m.total.rounds
            log["opened"] = enc.reveal(out)
            rows.append(log)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forwards", type=int, default=20)
    ap.add_argument("--truncation", default="probabilistic", choices=["probabilistic", "exact"])
    ap.add_argument("--audit", action="store_true")
    ap.add_argument("--variant", default="optimised", choices=["optimised", "baseline"],
                    help="nonlinear protocols (protocols.config)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_unet_forward import _inputs, make_model

    x, t, y = _inputs(1)
    with torch.no_grad():
        ref = make_model(0)(x, t, y).sample
    per_party = launch(_party, args.forwards, args.truncation, args.audit, args.variant,
                       timeout=7200)
    user = cipherdm_torch.Roles().user
    rows = per_party[user]
    print(f"{args.forwards} forwards, {args.variant} protocols, truncation={args.truncation}, output scale "
          f"max|ref| {ref.abs().max():.3f}")
    print(f"{'#':>3}{'max err':>12}{'mean err':>12}{'wrong':>7}{'trunc. elts':>13}"
          f"{'exp. wraps':>12}{'wraps':>7}{'max|x| bits':>12}{'sec':>7}{'MB P0':>8}{'rounds':>8}")
    wrong = 0
    for k, r in enumerate(rows):
        err = (r["opened"] - ref).abs()
        bad = bool(err.max() > 1.0)
        wrong += bad
        r.update(max_error=err.max().item(), mean_error=err.mean().item(), wrong=bad)
        print(f"{k:>3}{r['max_error']:>12.3e}{r['mean_error']:>12.3e}{'YES' if bad else '':>7}"
              f"{r['elements']:>13}{r['expected_wraps']:>12.2e}{r['wraps']:>7}"
              f"{r['max_abs_x_bits']:>12.1f}{r['seconds']:>7.1f}{per_party[0][k]['mb_sent']:>8.2f}"
              f"{per_party[0][k]['rounds']:>8}")
    print(f"wrong forwards: {wrong} / {len(rows)}")
    if args.json:
        for r in rows:
            r.pop("opened")
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
