"""Command line: ``cipherdm train|account|bench ...`` (also ``python -m cipherdm_torch.training
<command> ...``, which adds ``sample``: a plaintext sample grid from a checkpoint).

Commands:

* ``train``: DP-SGD training (progress bar with step, loss and epsilon spent); ``--resume DIR``
  continues a run from its last checkpoint with the same ledger.
* ``sample``: a sample grid PNG from a checkpoint.
* ``account``: noise multiplier for a target (epsilon, delta), or epsilon for a noise multiplier.
* ``bench``: time and peak memory of a DP step vs a non-private step for several K.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from cipherdm_torch.errors import (ArgumentParser, UserError, check_out_dir, finite_float,
                                   nonnegative_float, nonnegative_int, open_unit_float,
                                   positive_float, positive_int)

__all__ = ["main", "build_parser"]


def _ints(s: str):
    try:
        values = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {s!r}")
    return values


def _ints_or_none(s: str):
    return _ints(s) if s.strip() else ()


def _sample_rate(s: str) -> float:
    v = positive_float(s)
    if v > 1:
        raise argparse.ArgumentTypeError(f"a sample rate lies in (0, 1], got {s!r}")
    return v


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from cipherdm_torch.training.trainer import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("data / output")
    g.add_argument("--data", default=d.data,
                   help="mnist | fashion-mnist | IDX directory | ImageFolder directory")
    g.add_argument("--out", "--output-dir", dest="output_dir", default=None,
                   help="output folder (ledger, checkpoints)")
    g.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run in DIR (same ledger); other options override its config")
    g.add_argument("--max-train-examples", type=positive_int, default=None)
    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=["own", "diffusers"], default=d.backbone)
    g.add_argument("--channels", dest="model_channels", type=positive_int, default=d.model_channels)
    g.add_argument("--mults", dest="channel_mult", type=_ints, default=tuple(d.channel_mult),
                   help="channel multipliers, e.g. 1,2,2")
    g.add_argument("--res-blocks", dest="num_res_blocks", type=positive_int, default=d.num_res_blocks)
    g.add_argument("--attn", dest="attn_resolutions", type=_ints_or_none, default=tuple(d.attn_resolutions),
                   help="resolutions with attention, e.g. 7 (own UNet)")
    g.add_argument("--dropout", type=nonnegative_float, default=d.dropout)
    g.add_argument("--unconditional", action="store_true")
    g.add_argument("--precond", choices=["edm", "v"], default=d.precond)
    g.add_argument("--sigma-data", type=positive_float, default=None)
    g = p.add_argument_group("privacy")
    g.add_argument("--epsilon", type=positive_float, default=d.epsilon)
    g.add_argument("--delta", type=open_unit_float, default=d.delta)
    g.add_argument("--accountant", choices=["rdp", "prv"], default=d.accountant)
    g.add_argument("--sigma", dest="noise_multiplier", type=positive_float, default=None,
                   help="noise multiplier (default: computed from epsilon, delta, q, steps)")
    g.add_argument("--clip", dest="max_grad_norm", type=positive_float, default=d.max_grad_norm)
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="expected logical batch")
    g.add_argument("-K", "--noise-multiplicity", dest="noise_multiplicity", type=positive_int,
                   default=d.noise_multiplicity)
    g.add_argument("--epochs", type=positive_float, default=d.epochs)
    g.add_argument("--steps", type=positive_int, default=None, help="overrides --epochs")
    g.add_argument("--physical-batch", dest="max_physical_batch", type=positive_int,
                   default=d.max_physical_batch)
    g.add_argument("--grad-sample-mode", choices=["hooks", "functorch"], default=d.grad_sample_mode)
    g = p.add_argument_group("optimiser / output")
    g.add_argument("--lr", type=positive_float, default=d.lr)
    g.add_argument("--ema", dest="ema_decay", type=nonnegative_float, default=d.ema_decay)
    g.add_argument("--checkpoint-every", type=nonnegative_int, default=d.checkpoint_every)
    g.add_argument("--sample-steps", type=positive_int, default=d.sample_steps)
    g.add_argument("--guidance", type=finite_float, default=d.guidance)
    g.add_argument("--no-sample-grid", dest="sample_grid", action="store_false")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--dp-seed", dest="dp_seed", type=int, default=None,
                   help="seed of the Poisson sampling and DP noise (default: fresh OS randomness; "
                        "for reproducible tests only)")
    g.add_argument("--threads", type=positive_int, default=None)
    g.add_argument("--max-steps", type=nonnegative_int, default=None,
                   help="stop after this many steps in this invocation (resume later)")
    g.add_argument("--no-progress", action="store_true")


def build_parser(prog: str = "cipherdm") -> argparse.ArgumentParser:
    """The parser of ``train``, ``sample``, ``account`` and ``bench``; ``cipherdm <command>`` runs
    train, account and bench, ``python -m cipherdm_torch.training <command>`` all four."""
    p = ArgumentParser(prog=prog, allow_abbrev=False,
                       description="DPDM: differentially private diffusion training")
    sub = p.add_subparsers(dest="command", required=True)
    _add_train_args(sub.add_parser("train", help="train a diffusion model with DP-SGD"))

    s = sub.add_parser("sample", help="sample grid PNG from a checkpoint")
    s.add_argument("checkpoint", help="checkpoint folder, or a run folder (its latest checkpoint)")
    s.add_argument("--out", default="samples.png")
    s.add_argument("-n", "--num", type=positive_int, default=100)
    s.add_argument("--method", choices=["edm", "euler", "ddim"], default="edm")
    s.add_argument("--steps", type=positive_int, default=18)
    s.add_argument("--guidance", type=finite_float, default=1.0)
    s.add_argument("--churn", type=nonnegative_float, default=0.0, help="EDM S_churn (edm method)")
    s.add_argument("--no-ema", action="store_true")
    s.add_argument("--seed", type=int, default=0)

    a = sub.add_parser("account", help="noise multiplier for (epsilon, delta), or epsilon for sigma")
    a.add_argument("--epsilon", type=positive_float, default=None)
    a.add_argument("--sigma", type=positive_float, default=None)
    a.add_argument("--delta", type=open_unit_float, default=1e-5)
    a.add_argument("--q", type=_sample_rate, default=None,
                   help="sample rate (or give --batch-size, --n)")
    a.add_argument("--batch-size", type=positive_int, default=None)
    a.add_argument("--n", type=positive_int, default=60000, help="data set size")
    a.add_argument("--steps", type=positive_int, default=None)
    a.add_argument("--epochs", type=positive_float, default=None)
    a.add_argument("--accountant", choices=["rdp", "prv"], default="rdp")
    a.add_argument("--check", action="store_true", help="also compute with Google's dp_accounting")

    b = sub.add_parser("bench", help="DP step vs non-private step, time and peak memory")
    b.add_argument("--channels", type=positive_int, default=16)
    b.add_argument("--mults", type=_ints, default=(1, 2, 2))
    b.add_argument("--res-blocks", type=positive_int, default=1)
    b.add_argument("--backbone", choices=["own", "diffusers"], default="own")
    b.add_argument("--batch", type=positive_int, default=64)
    b.add_argument("--physical-batch", type=positive_int, default=64)
    b.add_argument("-K", dest="ks", type=_ints, default=(1, 4, 16))
    b.add_argument("--repeats", type=positive_int, default=2)
    b.add_argument("--threads", type=positive_int, default=1)
    b.add_argument("--grad-sample-mode", choices=["hooks", "functorch"], default="hooks")
    b.add_argument("--device", default="cuda" if _cuda() else "cpu")
    return p


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def _explicit(argv: List[str], parser: argparse.ArgumentParser) -> set:
    """Destinations of the options the user actually typed (abbreviations are off)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    given = set()
    for action in train._actions:
        for opt in action.option_strings:
            short = len(opt) == 2  # -K4 as well as -K 4
            if any(tok == opt or tok.startswith(opt + "=") or (short and tok.startswith(opt))
                   for tok in argv):
                given.add(action.dest)
    return given


def _cmd_train(args, argv: List[str]) -> int:
    from cipherdm_torch.training.trainer import FIXED_ON_RESUME, DPDMTrainer, TrainConfig

    keys = {f for f in TrainConfig.__dataclass_fields__}
    given = {k: v for k, v in vars(args).items() if k in keys}
    given["class_conditional"] = not args.unconditional
    if args.resume:
        if not os.path.isdir(args.resume):
            raise UserError(f"--resume {args.resume!r}: no such run folder")
        explicit = _explicit(argv, build_parser())
        if "unconditional" in explicit:
            explicit.add("class_conditional")
        explicit.discard("output_dir")
        if args.output_dir and os.path.abspath(args.output_dir) != os.path.abspath(args.resume):
            raise UserError("--resume continues the run in its own folder: drop --out")
        fixed = sorted(k for k in explicit if k in FIXED_ON_RESUME)
        stored = {}
        path = os.path.join(args.resume, "train_config.json")
        if os.path.exists(path):
            with open(path) as f:
                stored = json.load(f)
        from cipherdm_torch.training.trainer import _differs

        changed = [k for k in fixed if k in stored and _differs(given[k], stored[k])]
        if changed:
            names = {a.dest: a.option_strings[-1] for a in _train_actions()}
            raise UserError(
                "cannot resume with a different "
                + ", ".join(f"{names.get(k, k)} (the run has {stored[k]!r})" for k in changed)
                + ": the privacy ledger and the checkpoint fix it; drop the option to continue the "
                  "run, or start a new run in a new --out folder")
        overrides = {k: given[k] for k in explicit if k in given and k not in FIXED_ON_RESUME}
        trainer = DPDMTrainer.resume(args.resume, **overrides)
    else:
        if not given.get("output_dir"):
            raise UserError("--out is required for a new run (a new folder for its ledger and "
                            "checkpoints)")
        check_out_dir(given["output_dir"])
        if os.path.exists(os.path.join(given["output_dir"], "ledger.json")):
            raise UserError(f"{given['output_dir']} already holds a privacy ledger: continue that "
                            f"run with --resume {given['output_dir']}, or choose a new --out "
                            "folder (a ledger is never overwritten)")
        trainer = DPDMTrainer(TrainConfig(**given))
    cfg = trainer.config
    print(f"data {trainer.dataset.name}: {len(trainer.dataset)} images; q = {trainer.sample_rate:.5f}, "
          f"sigma = {cfg.noise_multiplier:.4f} for eps {cfg.epsilon} at delta {cfg.delta} "
          f"({cfg.accountant}), {trainer.total_steps} steps, K = {cfg.noise_multiplicity}, "
          f"C = {cfg.max_grad_norm}; model {trainer.ledger.notes['parameters']:,} parameters",
          file=sys.stderr)
    led = trainer.train(progress=not args.no_progress, max_steps=args.max_steps)
    print(json.dumps({"output_dir": cfg.output_dir, "steps": led.steps,
                      "epsilon_spent": round(led.epsilon_spent, 5), "delta": led.delta,
                      "checkpoint": led.checkpoint,
                      "stopped_by_budget": led.notes.get("stopped_by_budget")}))
    return 0


def _train_actions():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices["train"]._actions if a.option_strings]


def _cmd_sample(args) -> int:
    import torch

    from cipherdm_torch.diffusion.samplers import sample
    from cipherdm_torch.training.trainer import latest_checkpoint, load_denoiser, save_image_grid

    path = args.checkpoint
    if os.path.exists(os.path.join(path, "ledger.json")) and not os.path.exists(
            os.path.join(path, "denoiser.json")):
        path = latest_checkpoint(path)
    den = load_denoiser(path, ema=not args.no_ema)
    labels = (torch.arange(args.num) % den.num_classes) if den.num_classes > 0 else None
    kw = {"s_churn": args.churn} if args.method == "edm" else {}
    imgs = sample(den, labels=labels, num_samples=args.num, method=args.method,
                  num_steps=args.steps, guidance=args.guidance,
                  generator=torch.Generator().manual_seed(args.seed), **kw)
    save_image_grid(imgs, args.out)
    print(args.out)
    return 0


def _cmd_account(args) -> int:
    import math

    from cipherdm_torch.training.accounting import dp_accounting_epsilon, epsilon_spent, noise_multiplier_for

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


def _cmd_bench(args) -> int:
    from cipherdm_torch.cli.bench import default_bench_config, format_table, run_bench

    cfg = default_bench_config(model_channels=args.channels, channel_mult=args.mults,
                               num_res_blocks=args.res_blocks, backbone=args.backbone,
                               max_physical_batch=args.physical_batch,
                               grad_sample_mode=args.grad_sample_mode)
    rows = run_bench(cfg, ks=args.ks, batch=args.batch, repeats=args.repeats,
                     threads=args.threads, device=args.device)
    print(f"model: {cfg.backbone} UNet, {rows[0]['params']:,} parameters; batch {args.batch} "
          f"examples (physical {args.physical_batch}); device {args.device}, threads {args.threads}")
    print(format_table(rows))
    return 0


def main(argv: Optional[List[str]] = None, prog: str = "cipherdm") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    if args.command == "train":
        return _cmd_train(args, argv)
    return {"sample": _cmd_sample, "account": _cmd_account, "bench": _cmd_bench}[args.command](args)


if __name__ == "__main__":
    from cipherdm_torch.errors import run_main

    sys.exit(run_main(lambda a: main(a, "python -m cipherdm_torch.training"), sys.argv[1:]))
