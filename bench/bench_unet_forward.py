"""One encrypted forward of the small (CipherDM-sized) MNIST UNet: per-op cost breakdown.

Model: diffusers UNet2DModel, 28x28x1, base 4 channels, mults (1, 2), 2 res blocks per level,
GroupNorm with 2 groups, attention at 14x14 (6 softmaxes over 196 positions), SiLU, 2 classes
(the CipherDM MNIST shape; REFERENCES.md). Runs the forward once per protocol variant
(``baseline`` = CrypTen-direct, ``optimised`` = cipherdm_torch.protocols; a ``+rss`` suffix
runs on the project's replicated backend instead of CrypTen's Beaver protocol) in three local
processes and prints, for party 0, bytes sent / received, rounds and seconds per op type,
the totals, and optimised/baseline ratios. Error vs the plaintext forward is printed too.
``calibrated`` is ``optimised`` with the knobs of
:func:`cipherdm_torch.protocols.recorded_ranges.calibrated_settings` (no exp clip comparison,
rsqrt magnitude comparisons over the recorded GroupNorm variance range only). A ``@DEVICE``
suffix (``optimised+rss@cuda``) runs the ring products on that device (``product_device``;
``cuda``: party k on GPU k mod GPUs), the shares staying in host memory. A ``:knob=value,...``
suffix sets ``protocols.config`` knobs (``optimised+rss:exp_squarings=5``): accuracy against
cost, side by side.

Profile (issue 15): every table has the seconds blocked in the communicator ("wait s", from the
cost meter) next to the wall seconds per op kind; the profile table splits them into waiting
vs local work, and, with ``--cprofile``, party 0's local work of the last variant into torch
kernels vs Python overhead; it also times a ping-pong round of 8 bytes through the mesh (one
ring re-share) next to the average round inside the forward. ``--no-cse`` exports without
common-subexpression elimination (the graph before issue 15).

Ops that run side by side (independent products of the graph, on the replicated backend) share
their rounds: each of their regions counts the shared rounds, bytes waited and seconds, so
per-op rows of such ops overlap; TOTAL counts every round once.

    python bench/bench_unet_forward.py [--batch 1] [--variants baseline optimised optimised+rss]
        [--cprofile] [--no-cse]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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


def _ping_pong(n=200):
    """Seconds per round of an 8-byte ring exchange (each party sends to the next, receives
    from the previous: one re-share round) through the parties' secure mesh."""
    from cipherdm_torch.protocols.replicated import arith

    rank, ws = arith._rank_ws()
    buf, msg = torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long)
    for _ in range(10):  # warm-up
        arith.exchange([(msg, (rank + 1) % ws)], [(buf, (rank - 1) % ws)])
    t0 = time.perf_counter()
    for _ in range(n):
        arith.exchange([(msg, (rank + 1) % ws)], [(buf, (rank - 1) % ws)])
    return (time.perf_counter() - t0) / n


def _kernel_split(prof):
    """(torch kernel seconds, communicator wait seconds, other Python seconds) of a cProfile."""
    import pstats

    st = pstats.Stats(prof)
    kernel = wait = other = 0.0
    for (file, _, name), (_, _, tottime, _, _) in st.stats.items():
        if name.startswith("<method 'wait'") or "socket" in name.lower() or "recv" in name \
                or "select" in name or "acquire" in name or "sleep" in name:
            wait += tottime
        elif file == "~" and ("torch" in name or "Tensor" in name or "of 'torch" in name):
            kernel += tottime
        else:
            other += tottime
    top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:12]
    top = [(f"{name} ({file.rsplit('/', 1)[-1]}:{line})", calls, tottime)
           for (file, line, name), (calls, _, tottime, _, _) in top]
    return kernel, wait, other, top


def _knob_value(text):
    """A knob's value from the command line: int, float, true/false or the text itself."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _variant(variant, rank):
    """``protocols[+backend][@device][:knob=value,...]`` -> (protocols, backend, protocol
    settings); e.g. ``optimised+rss:exp_squarings=5`` (a knob of ``protocols.config``). The
    knob suffix is the last ``:`` part and holds a ``=``, so a device may keep its index
    (``optimised+rss@cpu:0``)."""
    from cipherdm_torch.protocols import recorded_ranges

    head, _, spec = variant.rpartition(":")
    if "=" in spec:
        variant = head
    else:
        spec = ""
    name, _, device = variant.partition("@")
    protocols, _, backend = name.partition("+")
    knobs = {}
    if protocols == "calibrated":
        protocols, knobs = "optimised", recorded_ranges.calibrated_settings()
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        knobs[key] = _knob_value(value)
    if device:
        knobs["product_device"] = (f"cuda:{rank % torch.cuda.device_count()}"
                                   if device == "cuda" else device)
    return protocols, backend, knobs


@contextlib.contextmanager
def _exchange_log(active):
    """This party's wait log on the rss backend (:func:`...arith.exchange_log`), for the rounds
    in which ANY party waits; nothing elsewhere."""
    if not active:
        yield []
        return
    from cipherdm_torch.protocols.replicated import arith as ra

    with ra.exchange_log() as waits:
        yield waits


def protocol_rounds(waits_per_party):
    """Exchanges in which at least one party waits (None when the logs do not line up)."""
    from cipherdm_torch.protocols.replicated import arith as ra

    return ra.rounds_any_party(waits_per_party)


def _batch_sweep(enc, info, batches, variant):
    """One forward per batch size in ``batches`` on ``variant`` (export and weight sharing of a
    new batch size done before the meter starts): {batch: cost totals}."""
    from cipherdm_torch.compiler import graph as graph_mod
    from cipherdm_torch.protocols import config
    from cipherdm_torch.protocols.replicated import backend as rss_backend

    protocols, backend, knobs = _variant(variant, info.rank)
    out = {}
    for b in batches:
        x, t, y = _inputs(b)
        with enc.fixed_point():  # export this batch size now, outside the measurement
            enc._share_weights(enc._compile(graph_mod.bind_inputs(enc._model, (x, t, y))))
        ctx = rss_backend.replicated_backend() if backend == "rss" else contextlib.nullcontext()
        with ctx, config.use(protocols, **knobs):
            sx = enc.share_input("sample", x if info.is_user else None)
            sy = enc.share_input("class_labels", y if info.is_user else None)
            _, meter = enc.profile(sx, t, sy)
        out[b] = meter.total.as_dict()
    return out


def _party(batch, variants, cprofile=False, cse=True, batches=()):
    from cipherdm_torch import encrypt
    from cipherdm_torch.compiler import graph as graph_mod
    from cipherdm_torch.protocols import config

    info = cipherdm_torch.party()
    x, t, y = _inputs(batch)
    graph_mod.CSE = cse
    t0 = time.perf_counter()
    enc = encrypt(make_model(0 if info.is_owner else 1), (x, t, y))
    encrypt_s = time.perf_counter() - t0
    out = {"encrypt_s": encrypt_s, "runs": {}}
    for i, variant in enumerate(variants):
        protocols, backend, knobs = _variant(variant, info.rank)
        ctx = contextlib.nullcontext()
        if backend == "rss":  # this project's dealer-free replicated backend
            from cipherdm_torch.protocols.replicated import backend as rss_backend
            ctx = rss_backend.replicated_backend()
        prof = None
        if cprofile and info.rank == 0 and i == len(variants) - 1:
            import cProfile
            prof = cProfile.Profile()
        with ctx, config.use(protocols, **knobs):
            sx = enc.share_input("sample", x if info.is_user else None)
            sy = enc.share_input("class_labels", y if info.is_user else None)
            if prof is not None:
                prof.enable()
            with _exchange_log(backend == "rss") as waits:
                res, meter = enc.profile(sx, t, sy)
            if prof is not None:
                prof.disable()
        out["runs"][variant] = {"cost": meter.as_dict(), "table": meter.table(),
                                "opened": enc.reveal(res[0]), "waits": waits}
        if prof is not None:
            out["runs"][variant]["cprofile"] = _kernel_split(prof)
            if os.environ.get("CIPHERDM_CPROFILE_OUT"):  # raw stats, for pstats / snakeviz
                prof.dump_stats(os.environ["CIPHERDM_CPROFILE_OUT"])
    out["ping_pong_s"] = _ping_pong()
    if batches:
        out["batches"] = _batch_sweep(enc, info, batches, variants[-1])
    return out


def _profile_table(name, run, ping):
    """Per op kind: wall s, blocked-in-network s, local (compute + Python) s, rounds, ms per
    round blocked; then the totals, the ping-pong round and (with --cprofile) the local split."""
    regions, total = run["cost"]["regions"], run["cost"]["total"]
    lines = [f"\n== profile: {name} (party 0) ==",
             f"{'region':<12} {'wall s':>8} {'wait s':>8} {'local s':>8} {'wait %':>7} "
             f"{'rounds':>7} {'wait ms/rnd':>11}"]
    rows = sorted(regions.items(), key=lambda kv: -kv[1]["seconds"])
    for k, c in rows + [("TOTAL", total)]:
        if c["seconds"] < 0.005 and k != "TOTAL":
            continue
        local = c["seconds"] - c["wait_seconds"]
        per = 1e3 * c["wait_seconds"] / c["rounds"] if c["rounds"] else float("nan")
        lines.append(f"{k:<12} {c['seconds']:>8.2f} {c['wait_seconds']:>8.2f} {local:>8.2f} "
                     f"{100 * c['wait_seconds'] / max(c['seconds'], 1e-9):>6.0f}% "
                     f"{c['rounds']:>7} {per:>11.2f}")
    if total["rounds"]:
        lines.append(f"one round inside the forward: {1e3 * total['seconds'] / total['rounds']:.2f}"
                     f" ms wall ({1e3 * total['wait_seconds'] / total['rounds']:.2f} ms blocked); "
                     f"8-byte ping-pong round on this mesh: {1e3 * ping:.2f} ms")
    if "cprofile" in run:
        kernel, wait, other, top = run["cprofile"]
        lines.append(f"cProfile of party 0 (inflates Python): torch kernels {kernel:.2f} s, "
                     f"blocked {wait:.2f} s, Python overhead {other:.2f} s; top by own time:")
        lines += [f"    {t:8.2f} s {c:>8} calls  {name}" for name, c, t in top]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=["baseline", "optimised"])
    ap.add_argument("--json", default=None, help="write the figures to this file")
    ap.add_argument("--cprofile", action="store_true",
                    help="cProfile party 0's forward of the last variant (kernels vs Python)")
    ap.add_argument("--batches", type=int, nargs="*", default=[],
                    help="after the variants, one forward of the last variant per batch size "
                         "(side by side in one run: time and bytes per image)")
    ap.add_argument("--no-cse", action="store_true",
                    help="no common-subexpression elimination (the graph before issue 15)")
    args = ap.parse_args(argv)

    model = make_model(0)
    print(f"model: UNet2DModel 28x28, {sum(p.numel() for p in model.parameters())} parameters, "
          f"batch {args.batch}")
    x, t, y = _inputs(args.batch)
    with torch.no_grad():
        ref = model(x, t, y).sample
    results = launch(_party, args.batch, args.variants, args.cprofile, not args.no_cse,
                     args.batches)
    p0, user = results[0], results[cipherdm_torch.Roles().user]
    print(f"encrypt() (export + share weights): {p0['encrypt_s']:.2f} s")
    summary = {}
    for v in args.variants:
        err = (user["runs"][v]["opened"] - ref).abs().max().item()
        rel = ((user["runs"][v]["opened"] - ref).norm() / ref.norm()).item()
        total = p0["runs"][v]["cost"]["total"]
        summary[v] = {"regions": p0["runs"][v]["cost"]["regions"], "total": total,
                      "max_abs_err": err, "rel_l2_err": rel, "batch": args.batch,
                      "ping_pong_s": p0["ping_pong_s"],
                      "cprofile": p0["runs"][v].get("cprofile")}
        print(f"\n== {v} (party 0) ==  max |err| {err:.4f}, rel L2 err {rel:.4f}")
        print(p0["runs"][v]["table"])
        print(_profile_table(v, p0["runs"][v], p0["ping_pong_s"]))
        every = [r["runs"][v]["cost"]["total"]["rounds"] for r in results]
        summary[v]["rounds_per_party"] = every
        rounds = protocol_rounds([r["runs"][v]["waits"] for r in results])
        summary[v]["protocol_rounds"] = rounds
        print(f"rounds per party {every} (a party counts the rounds it waits for; the truncation "
              f"helper and the comparisons' inputter only send in some)"
              + (f"; rounds in which any party waits: {rounds}" if rounds else ""))
        print(f"per image (batch {args.batch}): {total['bytes_sent'] / 1e6 / args.batch:.3f} MB "
              f"sent, {total['seconds'] / args.batch:.2f} s; rounds {total['rounds']} (party 0)"
              + (f", {rounds} (any party)" if rounds else ""))
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
    if args.batches:
        print(f"\n== batch throughput: {args.variants[-1]} (party 0, one run) ==")
        print(f"{'batch':>5} {'MB/image':>9} {'s/image':>8} {'rounds':>7} {'wait s':>7}")
        for b, c in p0["batches"].items():
            print(f"{b:>5} {c['bytes_sent'] / 1e6 / b:>9.3f} {c['seconds'] / b:>8.2f} "
                  f"{c['rounds']:>7} {c['wait_seconds']:>7.2f}")
        summary["batches"] = p0["batches"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
