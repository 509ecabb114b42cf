"""Secure sampling time per step on loopback and on emulated LAN / WAN links.

Runs `cipherdm sample` (three local parties) for one model with each protocol variant and each
link, and prints per step: seconds, MB sent by party 0, rounds, plus the ratio to loopback.
Links are emulated at the communicator (cipherdm_torch.mpc.netsim: one one-way latency per round
plus bytes / bandwidth; LAN 1 Gbit/s 0.1 ms, WAN 100 Mbit/s 40 ms), since this machine's kernel
has no netem.

    python bench/bench_network.py [--model DIR] [--steps 1] [--labels 0]
        [--variants optimised/rss baseline/crypten] [--links loopback lan wan] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile

from cipherdm_torch.pipelines.job import SampleSpec, embedded_model_dir, run_job


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=embedded_model_dir())
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--labels", default="0")
    ap.add_argument("--variants", nargs="+", default=["optimised/rss", "baseline/crypten"])
    ap.add_argument("--links", nargs="+", default=["loopback", "lan", "wan"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    labels = [int(v) for v in args.labels.split(",")]
    rows = []
    for variant in args.variants:
        protocols, backend = variant.split("/")
        for link in args.links:
            spec = SampleSpec(model=args.model, sampler="euler", steps=args.steps, labels=labels,
                              protocols=protocols, backend=backend, link=link)
            with tempfile.TemporaryDirectory() as out:
                report = run_job(spec, out)
            p0 = report["parties"][0]
            steps = p0["steps"]
            rows.append({"variant": variant, "link": link,
                         "seconds_per_step": sum(s["seconds"] for s in steps) / len(steps),
                         "mb_sent_per_step": sum(s["bytes_sent"] for s in steps) / len(steps) / 1e6,
                         "rounds_per_step": sum(s["rounds"] for s in steps) / len(steps)})
            r = rows[-1]
            print(f"{variant:<18} {link:<9} {r['seconds_per_step']:8.1f} s/step "
                  f"{r['mb_sent_per_step']:9.1f} MB/step {r['rounds_per_step']:8.0f} rounds/step",
                  flush=True)
    print("\nratio to loopback (same variant):")
    for r in rows:
        base = next(b for b in rows if b["variant"] == r["variant"] and b["link"] == "loopback")
        print(f"  {r['variant']:<18} {r['link']:<9} x{r['seconds_per_step'] / base['seconds_per_step']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
