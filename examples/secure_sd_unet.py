"""Stable-Diffusion-style UNet on secret shares: a tiny random UNet2DConditionModel whose
cross-attention reads a secret prompt embedding (GEGLU, LayerNorm, softmax over tokens).

    python examples/secure_sd_unet.py

Stable Diffusion's real weights cannot be downloaded here; the architecture is the same,
only smaller. Prints the plaintext-vs-secure difference and the per-op cost of one forward.
"""

import torch
from diffusers import UNet2DConditionModel

from cipherdm_torch import encrypt, launch, party
from cipherdm_torch.pipelines import model_output


def tiny_sd_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=4).eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 6, 16, generator=g)


def party_job():
    p = party()
    latents, prompt = inputs()
    enc = encrypt(tiny_sd_unet(), {"sample": latents, "timestep": 500,
                                   "encoder_hidden_states": prompt})
    secret = enc.share_inputs(sample=latents if p.is_user else None,
                              encoder_hidden_states=prompt if p.is_user else None)
    out, meter = enc.profile(timestep=500, **secret)
    return enc.reveal(model_output(out)), meter.table()


if __name__ == "__main__":
    results = launch(party_job)
    secure, table = results[1]  # the user (rank 1) holds the revealed output
    latents, prompt = inputs()
    with torch.no_grad():
        plain = tiny_sd_unet()(latents, 500, encoder_hidden_states=prompt).sample
    print(table)
    print(f"max |secure - plaintext| = {(secure - plain).abs().max():.4f} "
          f"(output std {plain.std():.3f})")
