"""Record the input ranges of every nonlinearity of a small MNIST diffusion UNet.

Builds a diffusers ``UNet2DModel`` of CipherDM's MNIST shape class (28x28, 1
channel, attention at 14x14, GroupNorm, SiLU), trains it briefly in plaintext
(DDPM epsilon loss, 1000-step linear betas) so that activations are those of a
working denoiser, then runs (a) the full DDIM-50 sampling trajectory and (b) one
forward at every one of the 1000 training timesteps on noised data, and
records with forward hooks:

* SiLU inputs (min, max, 0.1% / 99.9% quantiles, fraction with |x| > 8),
* GroupNorm inputs and per-group variances,
* attention logits, logits minus row max, softmax row length.

Writes ``protocols/activation_ranges.json`` (used by the protocol tests)::

    python bench/record_activation_ranges.py --train-seconds 180
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import cipherdm_torch  # noqa: F401
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor

OUT = Path(__file__).resolve().parents[1] / "protocols" / "activation_ranges.json"


def build_unet() -> UNet2DModel:
    return UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(32, 64), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=16)


def mnist(n: int) -> torch.Tensor:
    try:
        from cipherdm_torch.training.data import load_mnist

        data = load_mnist("train")
        return data.float_images()[:n]
    except Exception as exc:  # noqa: BLE001  (data source is optional for ranges)
        print(f"MNIST unavailable ({exc}); training on blurred noise digits instead")
        return F.avg_pool2d(torch.randn(n, 1, 28, 28), 3, 1, 1).clamp(-1, 1)


class Recorder:
    """Collects per-kind summaries: min / max / quantiles, aggregated over all calls."""

    def __init__(self):
        self.stats = defaultdict(lambda: {"min": float("inf"), "max": float("-inf"), "q_lo": [],
                                          "q_hi": [], "count": 0, "beyond_8": 0})
        self.active = False
        self.row_length = 0

    def add(self, kind: str, x: torch.Tensor) -> None:
        if not self.active:
            return
        x = x.detach().float().flatten()
        s = self.stats[kind]
        s["min"] = min(s["min"], x.min().item())
        s["max"] = max(s["max"], x.max().item())
        sample = x[:: max(1, x.numel() // 20000)]  # strided sample for the quantiles
        s["q_lo"].append(torch.quantile(sample, 0.001).item())
        s["q_hi"].append(torch.quantile(sample, 0.999).item())
        s["count"] += x.numel()
        s["beyond_8"] += int((x.abs() > 8).sum())

    def summary(self) -> dict:
        out = {}
        for kind, s in self.stats.items():
            out[kind] = {"min": s["min"], "max": s["max"], "q001": min(s["q_lo"]),
                         "q999": max(s["q_hi"]), "elements": s["count"],
                         "fraction_abs_gt_8": s["beyond_8"] / max(1, s["count"])}
        return out


def install_hooks(unet: UNet2DModel, rec: Recorder) -> None:
    for mod in unet.modules():
        if isinstance(mod, nn.SiLU):
            mod.register_forward_pre_hook(lambda m, a: rec.add("silu", a[0]))
        elif isinstance(mod, nn.GroupNorm):
            def gn_hook(m, a):
                x = a[0]
                rec.add("group_norm_input", x)
                g = x.reshape(x.shape[0], m.num_groups, -1)
                rec.add("group_norm_variance", g.var(-1, unbiased=False) + m.eps)
            mod.register_forward_pre_hook(gn_hook)
        elif isinstance(mod, Attention):
            mod.set_processor(AttnProcessor())  # explicit softmax (not fused SDPA)
            original = mod.get_attention_scores

            def scores(query, key, attention_mask=None, _m=mod, _orig=original):
                logits = _m.scale * query @ key.transpose(-1, -2)
                rec.add("softmax_logits", logits)
                rec.add("softmax_shifted", logits - logits.amax(-1, keepdim=True))
                rec.row_length = max(rec.row_length, logits.shape[-1])
                return _orig(query, key, attention_mask)
            mod.get_attention_scores = scores


def train(unet, images, seconds: float, batch: int = 32) -> int:
    sched = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    t0, steps = time.time(), 0
    while time.time() - t0 < seconds:
        x0 = images[torch.randint(0, len(images), (batch,))]
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x0)
        loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        if steps % 10 == 0:
            print(f"step {steps} loss {loss.item():.4f}", flush=True)
    return steps


@torch.no_grad()
def record(unet, images, rec: Recorder, n: int = 8) -> None:
    rec.active = True
    ddim = DDIMScheduler(num_train_timesteps=1000)
    ddim.set_timesteps(50)
    x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for t in ddim.timesteps:  # (a) the DDIM-50 sampling trajectory
        x = ddim.step(unet(x, t).sample, t, x).prev_sample
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    x0 = images[:n]
    for t in range(0, 1000, 20):  # (b) noised data over the whole timestep range
        tt = torch.full((n,), t)
        unet(ddpm.add_noise(x0, torch.randn_like(x0), tt), tt)
    rec.active = False


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-seconds", type=float, default=180)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    unet = build_unet()
    images = mnist(20000)
    steps = train(unet, images, args.train_seconds)
    print(f"trained {steps} steps; recording", flush=True)
    rec = Recorder()
    install_hooks(unet, rec)
    unet.eval()
    record(unet, images, rec)
    summary = rec.summary()
    summary["softmax_row_length"] = rec.row_length
    summary["model"] = {"class": "diffusers.UNet2DModel", "block_out_channels": [32, 64],
                        "norm_num_groups": 8, "parameters": sum(p.numel() for p in unet.parameters()),
                        "train_steps": steps, "train_seconds": args.train_seconds,
                        "recorded": "DDIM-50 trajectory (8 samples) + t=0..980 step 20 on noised MNIST"}
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
