"""Secure DDIM sampling of a diffusers UNet2DModel from Python, on the replicated backend.

    python examples/secure_sampling_python.py path/to/unet [--steps 50] [--batch-size 4]

P0 (the owner) loads the weights; P1 (the user) holds the seed and receives the images;
P2 helps. Every party runs ``job``; only the owner reads the weights file.
"""

import argparse

import torch
from diffusers import DDIMScheduler, UNet2DModel

from cipherdm_torch import Roles, encrypt, launch, party
from cipherdm_torch.pipelines import SecureDDIMPipeline
from cipherdm_torch.protocols.replicated import replicated_backend


def job(model_dir, steps=50, batch_size=4):
    p = party()
    unet = UNet2DModel.from_pretrained(model_dir) if p.is_owner else \
        UNet2DModel.from_config(UNet2DModel.load_config(model_dir))      # architecture only
    c, s = unet.config.in_channels, unet.config.sample_size
    with replicated_backend():                                          # dealer-free 3PC
        enc = encrypt(unet, {"sample": torch.zeros(batch_size, c, s, s), "timestep": 999})
        pipe = SecureDDIMPipeline(enc, DDIMScheduler(num_train_timesteps=1000))
        out = pipe(batch_size=batch_size, num_inference_steps=steps,   # shape from unet.config
                   seed=1234 if p.is_user else None)
    return out.images, out.report()        # images: the user's rank only (None elsewhere)


if __name__ == "__main__":               # spawned parties re-import this file: keep the guard
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    results = launch(job, args.model_dir, args.steps, args.batch_size)   # one entry per party
    images, report = results[Roles().user]
    print(f"images {tuple(images.shape)} in [{images.min():.2f}, {images.max():.2f}]; party 0 "
          f"sent {results[0][1]['total']['bytes_sent'] / 1e6:.1f} MB in "
          f"{results[0][1]['total']['rounds']} rounds")
