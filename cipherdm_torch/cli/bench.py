"""``cipherdm bench``: time and peak memory of one DP-SGD step vs one non-private step, for several K.

The measurements are :mod:`cipherdm_torch.training.benchmark`'s (each in a fresh child process).
"""

from __future__ import annotations

import argparse
from typing import List

import torch

from cipherdm_torch.cli.options import ints
from cipherdm_torch.errors import positive_int
from cipherdm_torch.training.benchmark import default_bench_config, format_table, run_bench

HELP = "DP-SGD step vs non-private step: time and peak memory for several K"
__all__ = ["HELP", "configure", "run"]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--channels", type=positive_int, default=16)
    p.add_argument("--mults", type=ints, default=(1, 2, 2))
    p.add_argument("--res-blocks", type=positive_int, default=1)
    p.add_argument("--backbone", choices=["own", "diffusers"], default="own")
    p.add_argument("--batch", type=positive_int, default=64)
    p.add_argument("--physical-batch", type=positive_int, default=64)
    p.add_argument("-K", dest="ks", type=ints, default=(1, 4, 16))
    p.add_argument("--repeats", type=positive_int, default=2)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--grad-sample-mode", choices=["hooks", "functorch"], default="hooks")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace, argv: List[str]) -> int:
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
