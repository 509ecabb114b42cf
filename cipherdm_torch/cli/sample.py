"""``cipherdm sample``: three local parties securely sample images from a trained model.

The model owner's rank loads the weights; the other ranks build the same architecture from its
public config only (no weights) and receive the weights as secret shares. The user's rank draws
the noise from the seed and shares it together with the class labels; only the user gets the
images. Writes a PNG grid and a JSON cost report (per party: totals, per op type, per step), and
with ``--check`` the fidelity against plaintext sampling of the same model with the same noise.

Process boundaries: the seed and labels are sent only to the user's party process and the
weights are read only by the owner's. ``--check`` is the owner's debugging tool: it also gives
the owner's process the seed and labels and computes the plaintext twin there.
Everything that can be checked before the parties start is checked here (model folder, weights
header against the config, sampler, labels, link, output folder).
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional

from cipherdm_torch.errors import UserError, check_out_dir, finite_float, positive_float, positive_int
from cipherdm_torch.mpc import netsim
from cipherdm_torch.training.trainer import resolve_checkpoint
from cipherdm_torch.pipelines.job import (DEVICES, SAMPLERS, SampleSpec, check_device, check_weights, embedded_model_dir,
                                          load_model, plaintext_twin, run_job, summary,
                                          write_samples)

HELP = "securely sample images from a model with three parties (or --plaintext in this process)"
__all__ = ["HELP", "configure", "run", "parse_labels", "spec_from_args", "add_timeout_arg",
           "apply_timeout"]


def configure(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="DPDM checkpoint folder or diffusers UNet2DModel "
                    "folder (default: the embedded DP MNIST model)")
    ap.add_argument("--sampler", choices=SAMPLERS, default="euler",
                    help="edm (Heun) / euler for DPDM checkpoints; ddim / ddpm for UNet2DModel")
    ap.add_argument("--steps", type=positive_int, default=10)
    ap.add_argument("--labels", default="all",
                    help="comma-separated class labels, one image each, or 'all' (one per class)")
    ap.add_argument("--seed", type=int, default=None,
                    help="the user's noise seed (secret; default: a fresh one from the OS CSPRNG, "
                         "never printed)")
    ap.add_argument("--guidance", type=finite_float, default=1.0,
                    help="classifier-free guidance scale")
    ap.add_argument("--protocols", choices=("optimised", "baseline"), default="optimised")
    ap.add_argument("--backend", choices=("rss", "crypten"), default="rss",
                    help="rss: dealer-free replicated 3PC; crypten: CrypTen's own protocols")
    ap.add_argument("--link", default="loopback", help="loopback, lan, wan or <Mbit/s>:<ms>")
    ap.add_argument("--device", choices=DEVICES, default="cpu",
                    help="where each party's ring products (matmul, convolutions) run: cpu, "
                         "cuda (party k on GPU k mod GPUs) or auto (cuda when available); "
                         "shares, links and the PRG streams stay in host memory")
    ap.add_argument("--out", default="cipherdm-out")
    ap.add_argument("--check", action="store_true",
                    help="the model owner's debugging tool: also give the owner's party the "
                         "seed and labels, sample in plaintext there and report the fidelity "
                         "(never with a real user's secrets)")
    ap.add_argument("--no-ema", action="store_true", help="use the raw instead of the EMA weights")
    ap.add_argument("--plaintext", action="store_true",
                    help="sample in plaintext in this process (no parties): the same model, "
                         "sampler, labels and seed, for comparison or for the model owner")
    add_timeout_arg(ap)


def add_timeout_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS",
                    help="name a hung party within about this many seconds: a party that sends "
                         "nothing, not even a heartbeat (one every SECONDS/4), for that long "
                         "while another waits on it (stopped, frozen, cut off) stops the run "
                         "with an error naming its rank and role; a party that is only "
                         "computing keeps beating and is never reported. Default: "
                         "$CIPHERDM_HANG_TIMEOUT or 60 s ($CIPHERDM_LINK_TIMEOUT, default 900 s, "
                         "bounds a wait on a party that beats but sends no data)")


def apply_timeout(seconds: Optional[float]) -> None:
    """Hand a user-set hang timeout to the launcher and the party processes
    (``launch`` / ``PartyPool`` read ``$CIPHERDM_HANG_TIMEOUT`` when none is passed)."""
    if seconds is not None:
        os.environ["CIPHERDM_HANG_TIMEOUT"] = repr(float(seconds))


def parse_labels(text: str, num_classes: int) -> List[int]:
    if text == "all":
        if num_classes <= 0:
            raise UserError("--labels all needs a class-conditional model; pass e.g. --labels 0,0,0")
        return list(range(num_classes))
    try:
        labels = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--labels: expected integers, got {text!r}") from None
    if not labels:
        raise UserError("--labels: at least one label (one image per label)")
    bad = [v for v in labels if num_classes > 0 and not 0 <= v < num_classes]
    if bad:
        raise UserError(f"--labels: {bad} outside 0..{num_classes - 1}")
    return labels


def spec_from_args(args: argparse.Namespace) -> SampleSpec:
    folder = args.model or embedded_model_dir()
    if args.model is None and not os.path.isdir(folder):
        raise UserError(f"no embedded model at {folder}; pass --model FOLDER")
    folder = resolve_checkpoint(folder)  # a training run folder: its latest checkpoint
    check_out_dir(args.out)
    try:
        if args.link not in ("", "loopback"):
            netsim.parse(args.link)
    except ValueError as exc:
        raise UserError(f"--{exc}") from None
    try:
        model, kind = load_model(folder, with_weights=False, ema=not args.no_ema)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--model {folder}: cannot build the model from its config "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    check_weights(folder, kind, model, ema=not args.no_ema)
    if kind == "dpdm" and args.sampler not in ("edm", "euler"):
        raise UserError(f"--sampler {args.sampler}: DPDM checkpoints use edm or euler")
    if kind == "unet2d" and args.sampler not in ("ddim", "ddpm"):
        raise UserError(f"--sampler {args.sampler}: UNet2DModel folders use ddim or ddpm")
    classes = model.num_classes if kind == "dpdm" else (model.config.get("num_class_embeds") or 0)
    return SampleSpec(model=folder, sampler=args.sampler, steps=args.steps,
                      labels=parse_labels(args.labels, classes),
                      seed=args.seed if args.seed is not None
                      else int.from_bytes(os.urandom(8), "little") >> 1,
                      guidance=args.guidance, protocols=args.protocols, backend=args.backend,
                      link=args.link, ema=not args.no_ema, device=check_device(args.device))


def run(args: argparse.Namespace, argv: List[str]) -> int:
    spec = spec_from_args(args)
    if args.plaintext:
        paths = write_samples(plaintext_twin(spec), spec.labels, args.out)
        print(f"plaintext samples ({spec.sampler}, {spec.steps} steps): {paths['png']}")
        return 0
    apply_timeout(args.timeout)
    print(f"three local parties sample {len(spec.labels)} image(s) with {spec.sampler}, "
          f"{spec.steps} steps, {spec.protocols} protocols on the {spec.backend} backend"
          + ("" if spec.device == "cpu" else f", ring products on {spec.device}"))
    report = run_job(spec, args.out, check=args.check)
    print(summary(report))
    return 0
