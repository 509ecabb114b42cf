"""Benchmark every nonlinear protocol: baseline (CrypTen direct) vs optimised, per backend.

Prints, in one three-party run, per function / variant / backend: bytes sent by
party 0 per element, by the busiest party ("max B"), rounds (the most any party waited), seconds, max and mean absolute error (relative for reciprocal / rsqrt) against the
exact function on the recorded UNet input ranges (protocols/recorded_ranges: both recorded models),
then the ratios optimised / baseline. Backends: CrypTen's ``replicated`` protocol,
and the project's dealer-free replicated backend ``rss`` (protocols.replicated)
when it is present::

    python bench/bench_protocols.py [--elements 4096] [--json out.json]
        [--truncation exact|probabilistic]   # rss backend's truncation (default exact)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from cipherdm_torch import CostMeter, launch


def _ranges():
    from cipherdm_torch.protocols import recorded_ranges

    r = recorded_ranges.load()
    if r:
        return r
    return {"silu": {"min": -20.0, "max": 20.0}, "softmax_logits": {"min": -10.0, "max": 10.0},
            "group_norm_variance": {"min": 1e-3, "max": 100.0}}


def workloads(n: int, seed: int = 0):
    """name -> (input, exact function, element count used for per-element figures, kwargs)."""
    g = torch.Generator().manual_seed(seed)
    r = _ranges()
    lo, hi = r["silu"]["min"], r["silu"]["max"]
    act = lo + (hi - lo) * torch.rand(n, generator=g)
    spread = max(abs(r["softmax_logits"]["min"]), abs(r["softmax_logits"]["max"]))
    logits = torch.randn(64, 196, generator=g) * spread / 3
    vlo, vhi = r["group_norm_variance"]["min"], r["group_norm_variance"]["max"]
    pos = torch.exp(math.log(vlo) + (math.log(vhi) - math.log(vlo)) * torch.rand(n // 4, generator=g))
    img = torch.randn(2, 64, 14, 14, generator=g) * 2 + 0.5
    tokens = torch.randn(2, 196, 64, generator=g) * 3
    return {
        "silu": (act, F.silu, {}),
        "mish": (act, F.mish, {}),
        "gelu": (act, F.gelu, {}),
        "gelu_tanh": (act, lambda t: F.gelu(t, approximate="tanh"), {"approximate": "tanh"}),
        "exp": (-16 * torch.rand(n, generator=g), torch.exp, {}),
        "softmax196": (logits, lambda t: t.softmax(-1), {"dim": -1}),
        "reciprocal": (pos, lambda t: 1 / t, {}),
        "rsqrt": (pos, torch.rsqrt, {}),
        "group_norm": (img, lambda t: F.group_norm(t, 8), {"num_groups": 8}),
        "layer_norm": (tokens, lambda t: F.layer_norm(t, (64,)), {"normalized_shape": 64}),
    }


RELATIVE = ("reciprocal", "rsqrt")


def _call(name, x, kwargs):
    from cipherdm_torch.protocols import functions as P

    fn = {"gelu_tanh": P.gelu, "softmax196": P.softmax}.get(name, getattr(P, name, None))
    return fn(x, **kwargs)


def _party(n: int, backends, truncation: str = "exact"):
    import crypten

    out = []
    loads = workloads(n)
    for backend in backends:
        if backend == "rss":
            from cipherdm_torch.protocols.replicated import backend as rss_backend

            rss_backend.install()
        from cipherdm_torch.protocols import config

        with crypten.cfg.temp_override({"mpc.protocol": backend}):
            for name, (x, exact, kwargs) in loads.items():
                for variant in ("baseline", "optimised"):
                    ex = crypten.cryptensor(x)
                    with config.use(variant, truncation=truncation), CostMeter() as m:
                        y = _call(name, ex, kwargs)
                    ref = exact(x)
                    err = (y.get_plain_text() - ref).abs()
                    if name in RELATIVE:  # outputs span decades: relative error
                        err = err / ref.abs()
                    out.append({"function": name, "variant": variant, "backend": backend,
                                "bytes_per_element": m.total.bytes_sent / x.numel(),
                                "rounds": m.total.rounds, "seconds": m.total.seconds,
                                "max_error": err.max().item(), "mean_error": err.mean().item()})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=4096)
    ap.add_argument("--backends", default="replicated,rss")
    ap.add_argument("--json", default=None)
    ap.add_argument("--truncation", default="exact", choices=["exact", "probabilistic"],
                    help="rss backend truncation method (probabilistic: before issue 13)")
    args = ap.parse_args()
    backends = args.backends.split(",")
    if "rss" in backends:
        try:
            import cipherdm_torch.protocols.replicated.backend  # noqa: F401
        except ImportError:
            backends.remove("rss")
    per_party = launch(_party, args.elements, backends, args.truncation)
    rows = per_party[0]
    for k, r in enumerate(rows):  # rounds: the most any party waited; bytes: also the busiest
        r["rounds"] = max(p[k]["rounds"] for p in per_party)
        r["max_party_bytes_per_element"] = max(p[k]["bytes_per_element"] for p in per_party)
    hdr = f"{'function':<12}{'backend':<12}{'variant':<10}{'B/elem':>10}{'max B':>8}{'rounds':>8}{'sec':>8}{'max err':>10}{'mean err':>10}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['function']:<12}{r['backend']:<12}{r['variant']:<10}{r['bytes_per_element']:>10.1f}"
              f"{r['max_party_bytes_per_element']:>8.1f}"
              f"{r['rounds']:>8}{r['seconds']:>8.2f}{r['max_error']:>10.2e}{r['mean_error']:>10.2e}")
    print("\nratios optimised / baseline (bytes, rounds, seconds); 'vs CrypTen' = optimised on this"
          " backend / baseline on CrypTen replicated")
    key = {(r["function"], r["backend"], r["variant"]): r for r in rows}
    for (fn, be, var), r in key.items():
        if var != "optimised":
            continue
        b = key[fn, be, "baseline"]
        c = key.get((fn, "replicated", "baseline"), b)
        print(f"{fn:<12}{be:<12} bytes {r['bytes_per_element'] / b['bytes_per_element']:.3f}"
              f"  rounds {r['rounds'] / max(1, b['rounds']):.3f}  seconds {r['seconds'] / b['seconds']:.3f}"
              f"  bytes vs CrypTen {c['bytes_per_element'] / r['bytes_per_element']:.2f}x fewer")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
