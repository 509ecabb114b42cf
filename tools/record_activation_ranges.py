"""Record the input ranges of every nonlinearity of a small MNIST diffusion UNet.

Builds a diffusers ``UNet2DModel`` of CipherDM's MNIST shape class (28x28, 1
channel, attention at 14x14, GroupNorm, SiLU), trains it briefly in plaintext
(DDPM epsilon loss, 1000-step linear betas) so that activations are those of a
working denoiser, then runs (a) the full DDIM-50 sampling trajectory and (b) one
forward at every 20th of the 1000 training timesteps on noised data, and
records:

* SiLU inputs (min, max, 0.1% / 99.9% quantiles, fraction with |x| > 8),
* GroupNorm inputs and per-group variances,
* attention logits, logits minus row max, softmax row length.

Writes ``protocols/activation_ranges.json`` (used by the protocol tests)::

    python tools/record_activation_ranges.py --train-seconds 180

``--model shipped`` records the embedded DP model (DDPMppUNet, EDM) instead, over the
EDM-18 Heun and the demo's Euler-8 trajectories and 39 noise levels, into
``protocols/activation_ranges_dpdm_mnist.json``. Recording is a torch function
mode, so functional calls (``F.silu``, ``Tensor.softmax``, fused attention) are seen.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch.overrides import TorchFunctionMode

OUT = Path(__file__).resolve().parents[1] / "protocols" / "activation_ranges.json"
OUT_SHIPPED = OUT.with_name("activation_ranges_dpdm_mnist.json")


def build_unet() -> UNet2DModel:
    return UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(32, 64), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=16)


def mnist(n: int) -> torch.Tensor:
    try:
        from cipherdm_torch.data import load_mnist

        data = load_mnist("train")
        return data.float_images()[:n]
    except Exception as exc:  # noqa: BLE001  (data source is optional for ranges)
        print(f"MNIST unavailable ({exc}); training on blurred noise digits instead")
        return F.avg_pool2d(torch.randn(n, 1, 28, 28), 3, 1, 1).clamp(-1, 1)


class Recorder(TorchFunctionMode):
    """Collects per-kind summaries (min / max / quantiles) of every nonlinearity's input.

    A torch function mode, so it sees functional calls too (``F.silu`` inside a
    module's forward, ``Tensor.softmax``, fused ``scaled_dot_product_attention``)
    whatever the model's code looks like; active only while ``active`` is set.
    """

    def __init__(self):
        super().__init__()
        self.stats = defaultdict(lambda: {"min": float("inf"), "max": float("-inf"), "q_lo": [],
                                          "q_hi": [], "count": 0, "beyond_8": 0})
        self.active = False
        self.row_length = 0

    def add(self, kind: str, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        s = self.stats[kind]
        s["min"] = min(s["min"], x.min().item())
        s["max"] = max(s["max"], x.max().item())
        sample = x[:: max(1, x.numel() // 20000)]  # strided sample for the quantiles
        s["q_lo"].append(torch.quantile(sample, 0.001).item())
        s["q_hi"].append(torch.quantile(sample, 0.999).item())
        s["count"] += x.numel()
        s["beyond_8"] += int((x.abs() > 8).sum())

    def _logits(self, logits: torch.Tensor) -> None:
        self.add("softmax_logits", logits)
        self.add("softmax_shifted", logits - logits.amax(-1, keepdim=True))
        self.row_length = max(self.row_length, logits.shape[-1])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            if func is F.silu:
                self.add("silu", args[0])
            elif func is F.mish:
                self.add("mish", args[0])
            elif func is F.gelu:
                self.add("gelu", args[0])
            elif func is F.group_norm:
                x, groups = args[0], args[1] if len(args) > 1 else kwargs["num_groups"]
                eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
                self.add("group_norm_input", x)
                g = x.reshape(x.shape[0], groups, -1)
                self.add("group_norm_variance", g.var(-1, unbiased=False) + eps)
            elif func in (torch.softmax, torch.Tensor.softmax, F.softmax):
                self._logits(args[0])
            elif func is F.scaled_dot_product_attention:
                q, k = args[0], args[1]
                scale = kwargs.get("scale") or q.shape[-1] ** -0.5
                self._logits(scale * q @ k.transpose(-1, -2))
        return func(*args, **kwargs)

    def summary(self) -> dict:
        out = {}
        for kind, s in self.stats.items():
            out[kind] = {"min": s["min"], "max": s["max"], "q001": min(s["q_lo"]),
                         "q999": max(s["q_hi"]), "elements": s["count"],
                         "fraction_abs_gt_8": s["beyond_8"] / max(1, s["count"])}
        out["softmax_row_length"] = self.row_length
        return out


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
    """DDIM-50 trajectory, then noised data at t = 0..980 (diffusers UNet2DModel)."""
    ddim = DDIMScheduler(num_train_timesteps=1000)
    ddim.set_timesteps(50)
    x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with rec:
        rec.active = True
        for t in ddim.timesteps:  # (a) the DDIM-50 sampling trajectory
            x = ddim.step(unet(x, t).sample, t, x).prev_sample
        ddpm = DDPMScheduler(num_train_timesteps=1000)
        x0 = images[:n]
        for t in range(0, 1000, 20):  # (b) noised data over the whole timestep range
            tt = torch.full((n,), t)
            unet(ddpm.add_noise(x0, torch.randn_like(x0), tt), tt)
        rec.active = False


@torch.no_grad()
def record_shipped(denoiser, images, rec: Recorder, n: int = 10) -> None:
    """EDM-18 Heun and Euler-8 (the demo's) trajectories, then noised data over the sigma range."""
    from cipherdm_torch.pipelines.secure import plaintext_edm_sample
    from cipherdm_torch.diffusion.edm import edm_sigmas

    labels = list(range(n))
    with rec:
        rec.active = True
        plaintext_edm_sample(denoiser, n, 18, class_labels=labels, seed=0)
        plaintext_edm_sample(denoiser, n, 8, class_labels=labels, seed=1, heun=False)
        x0 = images[:n]
        for sigma in edm_sigmas(40).tolist()[:-1]:
            denoiser(x0 + sigma * torch.randn_like(x0), torch.tensor(sigma), torch.tensor(labels))
        rec.active = False


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["unet2d", "shipped"], default="unet2d",
                    help="unet2d: train CipherDM's MNIST UNet2DModel briefly; shipped: the "
                         "embedded DP model (cipherdm_torch/assets/dpdm-mnist), no training")
    ap.add_argument("--train-seconds", type=float, default=180)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    images = mnist(20000)
    rec = Recorder()
    if args.model == "shipped":
        from cipherdm_torch.pipelines.job import embedded_model_dir, load_model

        denoiser, _ = load_model(embedded_model_dir(), with_weights=True)
        record_shipped(denoiser.eval(), images, rec)
        info = {"class": "cipherdm_torch DDPMppUNet (shipped dpdm-mnist, EDM, eps 10)",
                "parameters": sum(p.numel() for p in denoiser.parameters()),
                "recorded": "EDM-18 Heun + Euler-8 trajectories (10 samples, digits 0-9) + "
                            "39 noise levels sigma 80..0.002 on MNIST"}
        out = Path(args.out) if args.out else OUT_SHIPPED
    else:
        unet = build_unet()
        steps = train(unet, images, args.train_seconds)
        print(f"trained {steps} steps; recording", flush=True)
        unet.eval()
        record(unet, images, rec)
        info = {"class": "diffusers.UNet2DModel", "block_out_channels": [32, 64],
                "norm_num_groups": 8, "parameters": sum(p.numel() for p in unet.parameters()),
                "train_steps": steps, "train_seconds": args.train_seconds,
                "recorded": "DDIM-50 trajectory (8 samples) + t=0..980 step 20 on noised MNIST"}
        out = Path(args.out) if args.out else OUT
    summary = rec.summary()
    summary["model"] = info
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
