"""Samplers (linear public-coefficient updates), preconditioning and noise-level distributions."""

import math

import pytest
import torch

from cipherdm_torch.diffusion.denoiser import Denoiser, EDMPrecond, VPrecond, edm_coefficients
from cipherdm_torch.diffusion.edm import cfg_coefficients, churn, churn_gamma, ddpm_sigmas, edm_sigmas, euler_coefficients, guided, heun_coefficients
from cipherdm_torch.diffusion.sampling import sample, sample_edm, sample_euler
from cipherdm_torch.diffusion.backbones import DDPMppUNet

torch.set_num_threads(1)


def test_edm_sigmas_schedule():
    s = edm_sigmas(18)
    assert len(s) == 19 and s[-1] == 0
    assert s[0] == pytest.approx(80.0) and s[-2] == pytest.approx(0.002)
    assert torch.all(s[:-1] > s[1:])
    d = ddpm_sigmas(50)
    assert torch.all(d[:-1] > d[1:]) and d[-1] == 0
    abar_T = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[-1]
    assert float(d[0]) == pytest.approx(math.sqrt((1 - abar_T) / abar_T))


def test_heun_coefficients_equal_the_two_stage_update():
    g = torch.Generator().manual_seed(0)
    x, d1, d2 = (torch.randn(5, generator=g) for _ in range(3))
    s, sn = 2.3, 1.1
    xe = x + (sn - s) * (x - d1) / s
    direct = x + (sn - s) * 0.5 * ((x - d1) / s + (xe - d2) / sn)
    cx, c1, c2 = heun_coefficients(s, sn)
    assert torch.allclose(cx * x + c1 * d1 + c2 * d2, direct, atol=1e-6)
    a, b = euler_coefficients(s, sn)
    assert torch.allclose(a * x + b * d1, xe, atol=1e-6)
    assert heun_coefficients(s, 0.0) == (0.0, 1.0, 0.0)
    assert cfg_coefficients(3.0) == (-2.0, 3.0)
    s_hat, std = churn(1.0, 0.2)
    assert s_hat == pytest.approx(1.2) and std == pytest.approx(math.sqrt(1.44 - 1))
    assert churn_gamma(1.0, 10, 40.0) == pytest.approx(math.sqrt(2) - 1)
    assert churn_gamma(1.0, 10, 5.0, s_min=2.0) == 0.0


def _gaussian_denoiser(sd):
    """Ideal denoiser for data ~ N(0, sd^2): E[x0 | x] = x sd^2 / (sigma^2 + sd^2)."""
    return lambda x, sigma, labels: x * sd**2 / (float(sigma) ** 2 + sd**2)


@pytest.mark.parametrize("method", ["euler", "heun", "churn"])
def test_samplers_reproduce_gaussian_data(method):
    sd = 0.5
    g = torch.Generator().manual_seed(0)
    shape = (20000,)
    if method == "euler":
        x = sample_euler(_gaussian_denoiser(sd), shape, num_steps=200, generator=g)
    elif method == "heun":
        x = sample_edm(_gaussian_denoiser(sd), shape, num_steps=32, generator=g)
    else:
        x = sample_edm(_gaussian_denoiser(sd), shape, num_steps=64, s_churn=20.0, generator=g)
    assert float(x.std()) == pytest.approx(sd, rel=0.03)
    assert abs(float(x.mean())) < 0.02


def test_edm_preconditioning_identities():
    sd = math.sqrt(1 / 3)
    c_skip, c_out, c_in, c_noise = edm_coefficients(torch.tensor([1e-4, 1.0, 100.0]), sd)
    assert float(c_skip[0]) == pytest.approx(1.0, abs=1e-6)  # D ~ x at tiny noise
    assert float(c_skip[2]) == pytest.approx(0.0, abs=1e-4)
    # unit-variance network input and target: c_in^2 (sd^2 + s^2) = 1, c_skip^2 sd^2 + c_out^2 = sd^2 ...
    s = torch.tensor([1e-4, 1.0, 100.0])
    assert torch.allclose(c_in**2 * (sd**2 + s**2), torch.ones(3))
    assert torch.allclose(c_noise, s.log() / 4)


def test_noise_level_distributions():
    g = torch.Generator().manual_seed(0)
    s_edm = EDMPrecond().sample_sigma(200000, generator=g)
    s_v = VPrecond().sample_sigma(200000, generator=g)
    assert float((s_edm > 1).float().mean()) == pytest.approx(0.16, abs=0.01)
    assert float((s_v > 1).float().mean()) == pytest.approx(0.50, abs=0.01)
    logsnr = -2 * s_v.log()
    assert float(logsnr.min()) >= -9.0 - 1e-3 and float(logsnr.max()) <= 13.0 + 1e-3


def test_guided_denoiser_is_linear_cfg():
    torch.manual_seed(0)
    den = Denoiser(DDPMppUNet(img_resolution=8, model_channels=8, channel_mult=(1, 2),
                          num_res_blocks=1, attn_resolutions=(), dropout=0.0),
                   EDMPrecond(), num_classes=3).eval()
    x = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        dc = den(x, torch.full((2,), 0.7), labels)
        du = den(x, torch.full((2,), 0.7), torch.full((2,), 3))
    out = guided(den, 2.5)(x, 0.7, labels)
    assert torch.allclose(out, -1.5 * du + 2.5 * dc, atol=1e-5)
    assert not torch.allclose(dc, du)  # the label matters
    imgs = sample(den, labels=[0, 1, 2], num_steps=3, guidance=2.0, method="edm",
                  generator=torch.Generator().manual_seed(0))
    assert imgs.shape == (3, 1, 8, 8) and imgs.abs().max() <= 1
    for m in ("euler", "ddim"):
        assert sample(den, labels=[1], num_steps=3, method=m).shape == (1, 1, 8, 8)


# ------------------------------------------------------------------ the one loop, bit for bit
# The plaintext samplers as they were before they became callers of ``edm_loop`` (frozen here):
# the same generator must give the same bits.
def _reference_init_noise(shape, sigma0, generator, device):
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float64).float() * float(sigma0)


@torch.no_grad()
def _reference_sample_euler(denoise, shape, labels=None, sigmas=None, num_steps=50, generator=None,
                            device="cpu"):
    sigmas = edm_sigmas(num_steps) if sigmas is None else sigmas
    x = _reference_init_noise(shape, sigmas[0], generator, device)
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        a, b = euler_coefficients(s, s_next)
        x = a * x + b * denoise(x, s, labels)
    return x


@torch.no_grad()
def _reference_sample_edm(denoise, shape, labels=None, num_steps=18, sigma_min=0.002,
                          sigma_max=80.0, rho=7.0, s_churn=0.0, s_min=0.0, s_max=float("inf"),
                          s_noise=1.0, generator=None, device="cpu"):
    sigmas = edm_sigmas(num_steps, sigma_min, sigma_max, rho)
    x = _reference_init_noise(shape, sigmas[0], generator, device)
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        gamma = churn_gamma(s, num_steps, s_churn, s_min, s_max)
        s_hat, std = churn(s, gamma, s_noise)
        if std > 0:
            x = x + std * torch.randn(x.shape, generator=generator, device=x.device)
        d1 = denoise(x, s_hat, labels)
        a, b = euler_coefficients(s_hat, s_next)
        if s_next == 0.0:
            x = a * x + b * d1
            continue
        x_e = a * x + b * d1
        d2 = denoise(x_e, s_next, labels)
        cx, c1, c2 = heun_coefficients(s_hat, s_next)
        x = cx * x + c1 * d1 + c2 * d2
    return x


def _toy(x, sigma, labels):
    return torch.tanh(x * 0.7) * 0.5 + x * (0.1 / (1.0 + float(sigma)))


def _gen(seed=3):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kw", [dict(), dict(s_churn=7.0), dict(s_churn=40.0, s_min=0.05, s_max=10.0,
                                                                 s_noise=1.01, num_steps=7),
                                dict(sigma_min=0.2, rho=5.0, num_steps=4)])
def test_sample_edm_bit_identical_to_the_reference(kw):
    shape = (3, 1, 5, 5)
    want = _reference_sample_edm(_toy, shape, generator=_gen(), **kw)
    got = sample_edm(_toy, shape, generator=_gen(), **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("sigmas", [None, "ddpm"])
def test_sample_euler_bit_identical_to_the_reference(sigmas):
    shape = (2, 1, 4, 4)
    sig = ddpm_sigmas(9) if sigmas == "ddpm" else None
    want = _reference_sample_euler(_toy, shape, sigmas=sig, num_steps=9, generator=_gen())
    got = sample_euler(_toy, shape, sigmas=sig, num_steps=9, generator=_gen())
    assert torch.equal(got, want)


def test_sample_bit_identical_to_the_reference():
    torch.manual_seed(0)
    den = Denoiser(DDPMppUNet(img_resolution=8, model_channels=8, channel_mult=(1, 2),
                          num_res_blocks=1, attn_resolutions=(4,), dropout=0.0),
                   EDMPrecond(), num_classes=3).eval()
    labels = torch.tensor([0, 2, 1])
    shape = (3, 1, 8, 8)
    fn = guided(den, 1.5)
    cases = {
        "edm": _reference_sample_edm(fn, shape, labels, num_steps=3, s_churn=2.0, generator=_gen()),
        "euler": _reference_sample_euler(fn, shape, labels, num_steps=3, generator=_gen()),
        "ddim": _reference_sample_euler(fn, shape, labels, sigmas=ddpm_sigmas(3), generator=_gen()),
    }
    for method, want in cases.items():
        kw = {"s_churn": 2.0} if method == "edm" else {}
        got = sample(den, labels=labels, method=method, num_steps=3, guidance=1.5,
                     generator=_gen(), **kw)
        assert torch.equal(got, want.clamp(-1, 1)), method
