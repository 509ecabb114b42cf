"""One encrypted forward of the small (CipherDM-sized) MNIST UNet: per-op cost breakdown.

Model: diffusers UNet2DModel, 28x28x1, base 4 channels, mults (1, 2), 2 res blocks per level,
GroupNorm with 2 groups, attention at 14x14 (6 softmaxes over 196 positions), SiLU, 2 classes
(the CipherDM MNIST shape; REFERENCES.md). Runs the forward once per protocol variant
(``baseline`` = CrypTen-direct, ``optimised`` = cipherdm_torch.protocols; a ``+rss`` suffix
runs on the project's replicated backend instead of CrypTen's Beaver protocol) in three local
processes and prints, for party 0, bytes sent / received, rounds and seconds per op type,
the totals, and optimised/baseline ratios. Error vs the plaintext forward is printed too.

    python bench/bench_unet_forward.py [--batch 1] [--variants baseline optimised optimised+rss]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

import cipherdm_torch
from cipherdm_torch import launch


def make_model(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(4, 8),
                       layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=2,
                       attention_head_dim=8, num_class_embeds=2).eval()


def _inputs(batch):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 1, 28, 28, generator=g), torch.full((batch,), 500),
            torch.randint(0, 2, (batch,), generator=g))


def _party(batch, variants):
    from cipherdm_torch import encrypt
    from cipherdm_torch.protocols import config

    info = cipherdm_torch.party()
    x, t, y = _inputs(batch)
    t0 = time.perf_counter()
    enc = encrypt(make_model(0 if info.is_owner else 1), (x, t, y))
    encrypt_s = time.perf_counter() - t0
    out = {"encrypt_s": encrypt_s, "runs": {}}
    for variant in variants:
        protocols, _, backend = variant.partition("+")
        ctx = contextlib.nullcontext()
        if backend == "rss":  # this project's dealer-free replicated backend
            from cipherdm_torch.protocols.replicated import backend as rss_backend
            ctx = rss_backend.replicated_backend()
        with ctx, config.use(protocols):
            sx = enc.share_input("sample", x if info.is_user else None)
            sy = enc.share_input("class_labels", y if info.is_user else None)
            res, meter = enc.profile(sx, t, sy)
        out["runs"][variant] = {"cost": meter.as_dict(), "table": meter.table(),
                                "opened": enc.reveal(res[0])}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=["baseline", "optimised"])
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args(argv)

    model = make_model(0)
    print(f"model: UNet2DModel 28x28, {sum(p.numel() for p in model.parameters())} parameters, "
          f"batch {args.batch}")
    x, t, y = _inputs(args.batch)
    with torch.no_grad():
        ref = model(x, t, y).sample
    results = launch(_party, args.batch, args.variants)
    p0, user = results[0], results[cipherdm_torch.Roles().user]
    print(f"encrypt() (export + share weights): {p0['encrypt_s']:.2f} s")
    summary = {}
    for v in args.variants:
        err = (user["runs"][v]["opened"] - ref).abs().max().item()
        rel = ((user["runs"][v]["opened"] - ref).norm() / ref.norm()).item()
        total = p0["runs"][v]["cost"]["total"]
        summary[v] = {"regions": p0["runs"][v]["cost"]["regions"], "total": total,
                      "max_abs_err": err, "rel_l2_err": rel}
        print(f"\n== {v} (party 0) ==  max |err| {err:.4f}, rel L2 err {rel:.4f}")
        print(p0["runs"][v]["table"])
    for other in [v for v in args.variants if v != "baseline" and "baseline" in summary]:
        b, o = summary["baseline"], summary[other]
        print(f"\n== {other} / baseline ==")
        print(f"{'region':<12} {'bytes':>8} {'rounds':>8} {'seconds':>8}")
        names = sorted(set(b["regions"]) | set(o["regions"]),
                       key=lambda k: -b["regions"].get(k, {}).get("bytes_sent", 0))
        rows = [(k, b["regions"].get(k), o["regions"].get(k)) for k in names] + \
               [("TOTAL", b["total"], o["total"])]
        for k, cb, co in rows:
            if not cb or not co:
                continue

            def ratio(f):
                return f"{co[f] / cb[f]:.3f}" if cb[f] else "-"
            print(f"{k:<12} {ratio('bytes_sent'):>8} {ratio('rounds'):>8} {ratio('seconds'):>8}")
        summary[f"ratio_total_{other}"] = {f: (o["total"][f] / b["total"][f] if b["total"][f] else None)
                                  for f in ("bytes_sent", "rounds", "seconds")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
