"""What the secure links and keyed randomness cost: one denoiser step of the embedded model.

Runs the same secure forward (the embedded DP MNIST denoiser, optimised protocols on the
replicated backend) in two three-party pools side by side, interleaved, in one run:

* secure: mutually authenticated TLS 1.3 links, AES-128-CTR pairwise streams (the default);
* plain: CrypTen's plain gloo links and MT19937 generators (insecure; for this comparison only).

First the cost of one communication round (every party sends to its predecessor) with 8 B and
800 KB per party, then the forward.

Prints per variant the median wall time of a forward (party 0), the payload party 0 sent
(cost meter), and for the secure links the bytes party 0 put on the wire (framing + TLS
records), plus the time ratio and the wire / payload ratio, and the share of a forward's time
spent generating keystream.

    python bench/bench_secure_links.py [--batch 2] [--reps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _body(model_dir: str, batch: int, reps: int):
    import cipherdm_torch
    from cipherdm_torch import CostMeter, party
    from cipherdm_torch import encrypt
    from cipherdm_torch.mpc import prg, secure_comm
    from cipherdm_torch.protocols.replicated import backend as rss_backend
    from cipherdm_torch.diffusion.backbones import image_shape
    from cipherdm_torch.pipelines.job import load_model

    p = party()
    rss_backend.enable()
    model, kind = load_model(model_dir, with_weights=p.is_owner)
    shape = image_shape(model)
    example = {"x": torch.zeros(batch, *shape), "noise_labels": torch.zeros(batch),
               "class_labels": torch.zeros(batch, dtype=torch.long)}
    enc = encrypt(model.backbone, example)
    g = torch.Generator().manual_seed(0)
    x = enc.share_input("x", torch.randn(batch, *shape, generator=g) if p.is_user else None)
    labels = enc.share_input("class_labels", torch.arange(batch) % 10 if p.is_user else None)
    # time spent in keystream generation (wrap the stream's byte source)
    spent = [0.0]
    orig = prg.KeyStream.bytes

    def timed(self, n):
        t0 = time.perf_counter()
        try:
            return orig(self, n)
        finally:
            spent[0] += time.perf_counter() - t0
    prg.KeyStream.bytes = timed
    rows = []
    for _ in range(reps):
        before = secure_comm.mesh().stats() if secure_comm.is_secure() else None
        spent[0] = 0.0
        t0 = time.perf_counter()
        with CostMeter() as meter:
            enc(x=x, noise_labels=torch.full((batch,), 0.25), class_labels=labels)
        row = {"seconds": time.perf_counter() - t0, "payload": meter.total.bytes_sent,
               "rounds": meter.total.rounds, "keystream_seconds": spent[0]}
        if before is not None:
            after = secure_comm.mesh().stats()
            row["wire"] = after["wire_sent"] - before["wire_sent"]
            row["link_payload"] = after["payload_sent"] - before["payload_sent"]
        rows.append(row)
    prg.KeyStream.bytes = orig
    rss_backend.disable()
    del cipherdm_torch
    return rows


def _rounds(n: int, numel: int):
    """Seconds per communication round: every party sends ``numel`` int64 to its predecessor."""
    from cipherdm_torch import party
    from cipherdm_torch.protocols.replicated import arith as ra

    rank = party().rank
    x, buf = torch.zeros(numel, dtype=torch.long), torch.empty(numel, dtype=torch.long)
    ra.exchange([(x, (rank - 1) % 3)], [(buf, (rank + 1) % 3)])  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        ra.exchange([(x, (rank - 1) % 3)], [(buf, (rank + 1) % 3)])
    return (time.perf_counter() - t0) / n


def main() -> None:
    from cipherdm_torch import PartyPool
    from cipherdm_torch.pipelines.job import embedded_model_dir

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = embedded_model_dir()
    pools = {"secure": PartyPool(3, secure=True), "plain": PartyPool(3, secure=False)}
    rows = {k: [] for k in pools}
    try:
        for p in pools.values():
            p.start()
        latency = {}
        for numel in (1, 100_000):
            for name, pool in pools.items():
                latency[(name, numel)] = pool.run(_rounds, 300 if numel == 1 else 30, numel,
                                                  timeout=600)[0]
        for _ in range(args.reps):  # interleaved: one forward of each, repeatedly
            for name, pool in pools.items():
                rows[name] += pool.run(_body, model, args.batch, 1, timeout=1800)[0]
    finally:
        for p in pools.values():
            p.close()
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in rows.items()}
    print(f"one secure forward of the embedded denoiser, batch {args.batch}, party 0, "
          f"{args.reps} interleaved repetitions (median)")
    for name, rs in rows.items():
        r = rs[-1]
        line = (f"  {name:7s} {med[name]:7.2f} s   payload {r['payload'] / 1e6:8.2f} MB   "
                f"rounds {r['rounds']:6d}   keystream {r['keystream_seconds']:.2f} s")
        if "wire" in r:
            line += f"   on the wire {r['wire'] / 1e6:8.2f} MB ({r['wire'] / r['payload']:.3f}x)"
        print(line)
    for numel in (1, 100_000):
        sec, pla = latency[("secure", numel)], latency[("plain", numel)]
        print(f"  one round, {numel * 8:,} B per party: secure {sec * 1e3:.3f} ms, plain (gloo) "
              f"{pla * 1e3:.3f} ms ({sec / pla:.2f}x)")
    ratio = med["secure"] / med["plain"]
    print(f"secure / plain time: {ratio:.3f}x (target <= 1.15x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "median_seconds": med, "time_ratio": ratio,
                       "round_seconds": {f"{k[0]}/{k[1] * 8}B": v for k, v in latency.items()}},
                      f, indent=1)


if __name__ == "__main__":
    main()
