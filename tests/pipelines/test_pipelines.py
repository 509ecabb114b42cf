"""Secure DDPM / DDIM / EDM pipelines on tiny models match their plaintext twins (same noise)."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

import cipherdm_torch
from cipherdm_torch import party
from cipherdm_torch.pipelines.secure import SecureDDIMPipeline, SecureDDPMPipeline, SecureEDMPipeline, plaintext_edm_sample, plaintext_scheduler_sample
from cipherdm_torch.diffusion.sampling import Noise, fidelity
from party_views import received_recorder, tensors

SHAPE = (1, 8, 8)
LABELS = [0, 2]


def tiny_unet2d():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=2,
                       add_attention=False, num_class_embeds=3).eval()


def tiny_denoiser():
    from cipherdm_torch.diffusion.denoiser import Denoiser, EDMPrecond
    from cipherdm_torch.diffusion.backbones import DDPMppUNet

    torch.manual_seed(1)
    net = DDPMppUNet(img_resolution=8, num_classes=3, model_channels=4, channel_mult=(1, 2),
                 num_res_blocks=1, attn_resolutions=(4,), noise_emb_dim=8, dropout=0.0)
    return Denoiser(net, EDMPrecond(), num_classes=3).eval()


def _user_args(seed):
    p = party()
    return dict(seed=seed if p.is_user else None, class_labels=LABELS if p.is_user else None)


def _secure_scheduler_runs(seed):
    from cipherdm_torch.protocols.replicated import backend as rss_backend

    rss_backend.enable()  # the dealer-free replicated backend, as `cipherdm sample` uses
    out = {}
    unet = tiny_unet2d()
    enc = cipherdm_torch.encrypt(unet, {"sample": torch.zeros(2, *SHAPE), "timestep": 10,
                                        "class_labels": torch.zeros(2, dtype=torch.long)})
    user_args = _user_args(seed)
    ddim = SecureDDIMPipeline(enc, DDIMScheduler(num_train_timesteps=1000))
    got, restore = received_recorder()
    try:
        out["ddim"] = ddim(batch_size=2, num_inference_steps=3, image_shape=SHAPE, progress=False,
                           **user_args)
    finally:
        restore()
    # the whole view: every payload sent or received on the links, every gloo buffer
    received = [t.clone() for t in tensors(got) if t.dtype == torch.long]
    gloo_calls = list(got.gloo_calls)
    ddpm = SecureDDPMPipeline(enc, DDPMScheduler(num_train_timesteps=1000))
    out["ddpm"] = ddpm(batch_size=2, num_inference_steps=3, image_shape=SHAPE, progress=False,
                       **user_args)
    rss_backend.disable()
    return {"received": received, "gloo_calls": gloo_calls,
            **{k: (v.images, v.report()) for k, v in out.items()}}


# Heun's correction multiplies the denoiser's error by h / (2 sigma_next): from sigma 80 straight
# to 0.002 (2 steps) that is 20,000x, so few-step Heun runs need a larger sigma_min (here 11x).
EDM_ARGS = dict(num_inference_steps=3, image_shape=SHAPE, guidance_scale=2.0, sigma_min=0.2,
                s_churn=1.0)


def _secure_edm_run(seed):
    den = tiny_denoiser()
    enc_b = cipherdm_torch.encrypt(den.backbone, {"x": torch.zeros(4, *SHAPE),
                                                  "noise_labels": torch.zeros(4),
                                                  "class_labels": torch.zeros(4, dtype=torch.long)})
    edm = SecureEDMPipeline(enc_b, den.precond, num_classes=3)
    out = edm(batch_size=2, progress=False, **EDM_ARGS, **_user_args(seed))
    return {"edm": (out.images, out.report())}


# Tolerance on images in [-1, 1] from untrained (random) tiny models, whose first DDIM / DDPM
# step multiplies the UNet's approximation error by 1/sqrt(alpha_bar_T) ~ 156.
MAX_ABS, MEAN_ABS = 0.1, 0.02


def _check(results, plain, steps, error_gain=1.0):
    for kind, ref in plain.items():
        images, report = results[1][kind]  # the user
        fid = fidelity(images, ref)
        assert fid["max_abs"] < MAX_ABS * error_gain and fid["mean_abs"] < MEAN_ABS, (kind, fid)
        assert results[0][kind][0] is None and results[2][kind][0] is None  # only the user sees it
        for r in results:
            rep = r[kind][1]
            assert rep["total"]["bytes_sent"] > 0 and len(rep["steps"]) == steps
            assert "unet" in rep["regions"] and "step" in rep["regions"]


def _assert_never_received(received, secrets):
    """No ring element a non-user party received equals a fixed-point encoding of a secret."""
    from crypten.encoder import FixedPointEncoder

    enc = FixedPointEncoder()
    secret_codes = {v for v in torch.cat([enc.encode(s).flatten() for s in secrets]).tolist()
                    if abs(v) >= 256}  # values within 2^-8 of zero are not distinctive
    seen = torch.cat([t.flatten() for t in received]) if received else torch.empty(0)
    assert seen.numel() > 1000  # the parties did talk
    hits = sum(int(v) in secret_codes for v in seen.tolist())
    assert hits <= 2, f"{hits} received values equal encoded secrets"


def test_secure_ddim_and_ddpm_match_plaintext(parties):
    results = parties.run(_secure_scheduler_runs, 5)
    x_t = Noise(5).draw((2, *SHAPE))  # the user's initial noise
    for rank in (0, 2):  # the owner and the helper never see the noise, labels or images
        _assert_never_received(results[rank]["received"], [x_t, results[1]["ddim"][0]])
    weights = [w.detach() for w in tiny_unet2d().state_dict().values() if w.is_floating_point()]
    for rank in (1, 2):  # the user and the helper never see the owner's weights
        _assert_never_received(results[rank]["received"], weights)
    for r in results:  # nothing secret-dependent goes through gloo (no collectives at all)
        assert r["gloo_calls"] == [], r["gloo_calls"]
    _check(results, {
        "ddim": plaintext_scheduler_sample(tiny_unet2d(), DDIMScheduler(num_train_timesteps=1000),
                                           2, 3, SHAPE, 5, LABELS),
        "ddpm": plaintext_scheduler_sample(tiny_unet2d(), DDPMScheduler(num_train_timesteps=1000),
                                           2, 3, SHAPE, 5, LABELS, ddpm=True),
    }, steps=3)


@pytest.mark.slow
def test_secure_edm_with_guidance_matches_plaintext(parties):
    results = parties.run(_secure_edm_run, 5)
    # guidance w = 2 forms -1 * D_uncond + 2 * D_cond: the network's error grows by |1-w| + |w| = 3
    _check(results, {"edm": plaintext_edm_sample(tiny_denoiser(), 2, seed=5, class_labels=LABELS,
                                                 **EDM_ARGS)}, steps=3, error_gain=3.0)
