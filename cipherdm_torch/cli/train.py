"""``cipherdm train``: DP-SGD training of a diffusion model (DPDM recipe).

A progress bar shows step, loss and epsilon spent; ``--resume DIR`` continues a run from its last
checkpoint with the same privacy ledger (options the ledger fixes are refused, not ignored).

Data-parallel on several GPUs (or CPU processes), one process each, started by torchrun:

  torchrun --nproc-per-node=8 -m cipherdm_torch train --device cuda --out runs/m ...

Every process takes its part of each Poisson batch; rank 0 adds the noise once per step and alone
writes the ledger and checkpoints; --batch-size stays the global expected batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List

from cipherdm_torch.cli.options import ints, ints_or_none
from cipherdm_torch.errors import (ArgumentParser, UserError, check_out_dir, finite_float,
                                   nonnegative_float, nonnegative_int, open_unit_float,
                                   positive_float, positive_int)
from cipherdm_torch.training.trainer import FIXED_ON_RESUME, DPDMTrainer, TrainConfig, _differs

HELP = "train a diffusion model with DP-SGD (DPDM)"
__all__ = ["HELP", "configure", "run"]


def configure(p: argparse.ArgumentParser) -> None:
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
    g.add_argument("--mults", dest="channel_mult", type=ints, default=tuple(d.channel_mult),
                   help="channel multipliers, e.g. 1,2,2")
    g.add_argument("--res-blocks", dest="num_res_blocks", type=positive_int, default=d.num_res_blocks)
    g.add_argument("--attn", dest="attn_resolutions", type=ints_or_none, default=tuple(d.attn_resolutions),
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
    g.add_argument("--device", choices=["cpu", "cuda", "auto"], default=d.device,
                   help="cpu, cuda (under torchrun: GPU LOCAL_RANK) or auto (CUDA if available)")
    g.add_argument("--max-steps", type=nonnegative_int, default=None,
                   help="stop after this many steps in this invocation (resume later)")
    g.add_argument("--no-progress", action="store_true")


def _explicit(argv: List[str]) -> set:
    """Destinations of the options the user actually typed (abbreviations are off)."""
    train = _standalone_parser()
    given = set()
    for action in train._actions:
        for opt in action.option_strings:
            short = len(opt) == 2  # -K4 as well as -K 4
            if any(tok == opt or tok.startswith(opt + "=") or (short and tok.startswith(opt))
                   for tok in argv):
                given.add(action.dest)
    return given


def run(args: argparse.Namespace, argv: List[str]) -> int:
    keys = {f for f in TrainConfig.__dataclass_fields__}
    given = {k: v for k, v in vars(args).items() if k in keys}
    given["class_conditional"] = not args.unconditional
    if args.resume:
        if not os.path.isdir(args.resume):
            raise UserError(f"--resume {args.resume!r}: no such run folder")
        explicit = _explicit(argv)
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
    try:
        return _train(trainer, args)
    finally:
        trainer.close()


def _train(trainer: DPDMTrainer, args: argparse.Namespace) -> int:
    cfg = trainer.config
    main = trainer.world.is_main
    world = (f"; {trainer.world.size} processes on {trainer.device.type}"
             if trainer.world.distributed else "")
    if main:
        print(f"data {trainer.dataset.name}: {len(trainer.dataset)} images; "
              f"q = {trainer.sample_rate:.5f}, sigma = {cfg.noise_multiplier:.4f} for eps "
              f"{cfg.epsilon} at delta {cfg.delta} ({cfg.accountant}), {trainer.total_steps} "
              f"steps, K = {cfg.noise_multiplicity}, C = {cfg.max_grad_norm}; model "
              f"{trainer.ledger.notes['parameters']:,} parameters{world}", file=sys.stderr)
    led = trainer.train(progress=not args.no_progress, max_steps=args.max_steps)
    if main:
        print(json.dumps({"output_dir": cfg.output_dir, "steps": led.steps,
                          "epsilon_spent": round(led.epsilon_spent, 5), "delta": led.delta,
                          "checkpoint": led.checkpoint,
                          "stopped_by_budget": led.notes.get("stopped_by_budget")}))
    return 0


def _train_actions():
    return [a for a in _standalone_parser()._actions if a.option_strings]


def _standalone_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="cipherdm train", allow_abbrev=False)
    configure(p)
    return p


