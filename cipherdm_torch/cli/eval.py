"""``cipherdm eval``: downstream accuracy and FID of a trained model or of generated images.

Examples::

    cipherdm eval runs/mnist --per-class 1000 --out runs/mnist/eval      # sample, then evaluate
    cipherdm eval samples.pt --out eval/                                  # images + labels file
    cipherdm eval --real test --classifiers '' --out eval/real-test       # sanity: real test images
    cipherdm eval --real train --max-samples 10000 --out eval/real-train  # sanity: downstream

Writes ``report.json`` (accuracies of Log Reg / MLP / CNN, FID-classifier, FID-Inception when
available, number of samples, times) and ``grid.png`` (10 images per class) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import List

import torch

from cipherdm_torch.data import load_dataset
from cipherdm_torch.diffusion.checkpoints import is_checkpoint_dir
from cipherdm_torch.diffusion.images import save_image_grid
from cipherdm_torch.errors import (UserError, check_out_dir, finite_float, nonnegative_float,
                                   positive_int)
from cipherdm_torch.evaluation.evaluate import (evaluate, find_ledger, grid_by_class,
                                                load_generated, sample_checkpoint)
from cipherdm_torch.files import atomic_write_json
from cipherdm_torch.training.trainer import resolve_checkpoint

HELP = "evaluate a trained model: downstream accuracy, FID"
__all__ = ["HELP", "configure", "run"]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", default=None,
                   help="checkpoint or run folder (samples with the plaintext sampler), or a "
                        ".pt/.npz/folder of generated images + labels")
    p.add_argument("--real", choices=["train", "test"], default=None,
                   help="evaluate real images of this split instead of a source (sanity figures); "
                        "'test' images compare fairly with the training-set FID statistics, "
                        "'train' images are the fair input for the downstream classifiers")
    p.add_argument("--data", default="mnist", help="real data set: mnist | fashion-mnist | folder")
    p.add_argument("--out", default=None, help="output folder (default: <source>/eval or ./eval)")
    g = p.add_argument_group("sampling (checkpoint sources)")
    g.add_argument("--per-class", type=positive_int, default=100, help="images sampled per class")
    g.add_argument("--method", choices=["edm", "euler", "ddim"], default="edm")
    g.add_argument("--steps", type=positive_int, default=18)
    g.add_argument("--guidance", type=finite_float, default=1.0)
    g.add_argument("--s-churn", type=nonnegative_float, default=0.0,
                   help="EDM churn (edm sampler only)")
    g.add_argument("--batch-size", type=positive_int, default=250)
    g.add_argument("--no-ema", action="store_true", help="use the raw, not the EMA, weights")
    g.add_argument("--save-samples", action="store_true", help="also write samples.pt")
    g = p.add_argument_group("metrics")
    g.add_argument("--classifiers", default="logreg,mlp,cnn",
                   help="comma list of logreg, mlp, cnn ('' for none)")
    g.add_argument("--epochs", type=positive_int, default=5, help="downstream classifier epochs")
    g.add_argument("--no-fid-classifier", action="store_true")
    inc = g.add_mutually_exclusive_group()
    inc.add_argument("--inception", dest="inception", action="store_true", default=None,
                     help="force FID-Inception (default: only when installed and on a GPU)")
    inc.add_argument("--no-inception", dest="inception", action="store_false")
    g.add_argument("--inception-max", type=positive_int, default=None,
                   help="cap generated images for FID-Inception")
    g.add_argument("--inception-ref-max", type=positive_int, default=None,
                   help="cap training images for the FID-Inception reference statistics")
    p.add_argument("--max-samples", type=positive_int, default=None,
                   help="use a fixed-seed subset of this many images (sample-file / --real sources)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace, argv: List[str]) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.source is None) == (args.real is None):
        raise UserError("cipherdm eval: give a source (checkpoint / samples) or --real SPLIT, "
                        "not both")
    if args.out is not None:
        check_out_dir(args.out)
    kinds = [k.strip() for k in args.classifiers.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ("logreg", "mlp", "cnn")]
    if unknown:
        raise UserError(f"--classifiers: unknown {', '.join(unknown)} (use logreg, mlp, cnn)")
    progress = not args.quiet
    t0 = time.perf_counter()
    source_info = {}
    if args.real:
        gen = load_dataset(args.data, args.real)
        source_info = {"kind": f"real-{args.real}", "data": args.data}
        if args.real == "test" and args.classifiers.strip():
            source_info["note"] = "classifiers trained on test images are scored on those same images"
        out = args.out or os.path.join("eval", f"real-{args.real}")
    elif os.path.isdir(args.source) and is_checkpoint_dir(resolve_checkpoint(args.source)):
        kw = {"s_churn": args.s_churn} if args.method == "edm" and args.s_churn else {}
        gen = sample_checkpoint(args.source, per_class=args.per_class, method=args.method,
                                num_steps=args.steps, guidance=args.guidance,
                                batch_size=args.batch_size, seed=args.seed, ema=not args.no_ema,
                                progress=progress, **kw)
        source_info = {"kind": "checkpoint", "path": os.path.abspath(args.source),
                       "sampler": {"method": args.method, "steps": args.steps, "guidance": args.guidance,
                                   "s_churn": args.s_churn, "ema": not args.no_ema, "seed": args.seed}}
        led = find_ledger(args.source)
        if led:
            source_info["privacy"] = {k: led.get(k) for k in ("epsilon_spent", "delta", "steps", "accountant")}
        out = args.out or os.path.join(args.source, "eval")
    else:
        if not os.path.exists(args.source):
            raise UserError(f"{args.source} does not exist (give a checkpoint or run folder, or "
                            f"a .pt / .npz of generated images and labels)")
        gen = load_generated(args.source)
        source_info = {"kind": "samples", "path": os.path.abspath(args.source)}
        out = args.out or "eval"
    source_info["seconds_to_obtain"] = round(time.perf_counter() - t0, 1)
    check_out_dir(out)
    if args.max_samples and args.max_samples < len(gen):
        gen = gen.subset(args.max_samples, args.seed)
    os.makedirs(out, exist_ok=True)
    if args.save_samples:
        torch.save({"images": gen.images, "labels": gen.labels}, os.path.join(out, "samples.pt"))
    grid_path = os.path.join(out, "grid.png")
    save_image_grid(grid_by_class(gen, 10), grid_path, nrow=10)

    report = evaluate(gen, data=args.data, classifiers=kinds, epochs=args.epochs,
                      fid_classifier=not args.no_fid_classifier, inception=args.inception,
                      inception_max=args.inception_max, inception_ref_max=args.inception_ref_max,
                      device=args.device, seed=args.seed, progress=progress)
    report["source"] = source_info
    report["grid"] = os.path.abspath(grid_path)
    report["seconds"]["wall"] = round(time.perf_counter() - t0, 1)
    path = os.path.join(out, "report.json")
    atomic_write_json(path, report, indent=1, sort_keys=False, allow_nan=True)
    print(json.dumps({k: report.get(k) for k in ("num_samples", "accuracy", "fid_classifier", "fid_inception")}, indent=1))
    print(f"report: {path}\ngrid:   {grid_path}")
    return 0

