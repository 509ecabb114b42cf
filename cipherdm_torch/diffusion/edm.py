"""EDM maths for a denoiser ``D(x; sigma, labels)`` in variance-exploding form: noise levels and
the public coefficients of every update.

Every update is *linear* in the current state and the denoiser outputs, with public coefficients
computed by the plain functions below, so the one sampling loop
(:func:`cipherdm_torch.diffusion.sampling.edm_loop`) runs them unchanged on plaintext tensors and on
secret shares.

* ``euler_coefficients(s, s_next) -> (a, b)``: x_next = a x + b D(x; s). On the VE ODE this is
  DDIM (eta = 0).
* ``heun_coefficients(s, s_next) -> (cx, c1, c2)``: x_next = cx x + c1 D(x; s) + c2 D(x_e; s_next),
  where x_e is the Euler step (EDM's 2nd-order correction; for s_next = 0 it is the Euler step).
* ``churn(s, gamma, s_noise) -> (s_hat, noise_std)``: x_hat = x + noise_std z (EDM's churn).
* ``cfg_coefficients(w) -> (cu, cc)``: D = cu D(x; s, null) + cc D(x; s, y); w = 1 is plain
  conditional sampling, w = 0 unconditional, w > 1 stronger guidance.
* ``guided(denoiser, w)``: a plaintext denoise function with classifier-free guidance.

Noise-level schedules: ``edm_sigmas`` (Karras et al., rho = 7) and ``ddpm_sigmas`` (the
VE-equivalent sigmas of a discrete linear-beta DDPM schedule, for DDIM over its timesteps).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

__all__ = [
    "edm_sigmas",
    "ddpm_sigmas",
    "euler_coefficients",
    "heun_coefficients",
    "churn",
    "churn_gamma",
    "cfg_coefficients",
    "guided",
    "DenoiseFn",
]

# D(x, sigma, labels): the plaintext denoiser call the samplers make
DenoiseFn = Callable[[torch.Tensor, float, Optional[torch.Tensor]], torch.Tensor]


# ------------------------------------------------------------------ schedules and coefficients
def edm_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
               rho: float = 7.0) -> torch.Tensor:
    """num_steps decreasing noise levels from sigma_max to sigma_min, then a final 0."""
    i = torch.arange(num_steps, dtype=torch.float64)
    denom = max(num_steps - 1, 1)
    s = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def ddpm_sigmas(num_steps: int, num_train_steps: int = 1000, beta_start: float = 1e-4,
                beta_end: float = 0.02) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) at num_steps evenly spaced DDPM timesteps, then 0."""
    betas = torch.linspace(beta_start, beta_end, num_train_steps, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, dim=0)
    t = torch.linspace(num_train_steps - 1, 0, num_steps).round().long()
    s = ((1 - abar[t]) / abar[t]).sqrt()
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def euler_coefficients(sigma: float, sigma_next: float) -> Tuple[float, float]:
    """x_next = a x + b D  (Euler / DDIM on the VE probability-flow ODE)."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    a = sigma_next / sigma
    return a, 1.0 - a


def heun_coefficients(sigma: float, sigma_next: float) -> Tuple[float, float, float]:
    """x_next = cx x + c1 D(x; sigma) + c2 D(x_euler; sigma_next) (Heun; Euler if sigma_next = 0)."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    if sigma_next == 0.0:
        a, b = euler_coefficients(sigma, sigma_next)
        return a, b, 0.0
    h = sigma_next - sigma
    a, b = euler_coefficients(sigma, sigma_next)
    cx = 1.0 + h / (2 * sigma) + h * a / (2 * sigma_next)
    c1 = -h / (2 * sigma) + h * b / (2 * sigma_next)
    c2 = -h / (2 * sigma_next)
    return cx, c1, c2


def churn_gamma(sigma: float, num_steps: int, s_churn: float, s_min: float = 0.0,
                s_max: float = float("inf")) -> float:
    """EDM's gamma_i: min(S_churn / N, sqrt(2) - 1) inside [S_min, S_max], else 0."""
    if s_churn <= 0 or not (s_min <= float(sigma) <= s_max):
        return 0.0
    return min(s_churn / num_steps, math.sqrt(2.0) - 1.0)


def churn(sigma: float, gamma: float, s_noise: float = 1.0) -> Tuple[float, float]:
    """(sigma_hat, noise_std): raise the noise level to sigma_hat by adding noise_std * z."""
    sigma = float(sigma)
    s_hat = sigma * (1.0 + gamma)
    return s_hat, s_noise * math.sqrt(max(s_hat**2 - sigma**2, 0.0))


def cfg_coefficients(guidance: float) -> Tuple[float, float]:
    """(cu, cc) with D = cu D_uncond + cc D_cond."""
    return 1.0 - float(guidance), float(guidance)


# ------------------------------------------------------------------ guidance
def guided(denoiser: torch.nn.Module, guidance: float = 1.0, null_label: Optional[int] = None) -> DenoiseFn:
    """A denoise function with classifier-free guidance (one batched call for cond + uncond)."""
    null = denoiser.null_label if null_label is None else null_label

    @torch.no_grad()
    def fn(x, sigma, labels):
        s = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
        if labels is None or guidance == 1.0:
            return denoiser(x, s, labels)
        cu, cc = cfg_coefficients(guidance)
        nl = torch.full_like(labels, null)
        out = denoiser(torch.cat([x, x]), torch.cat([s, s]), torch.cat([nl, labels]))
        du, dc = out.chunk(2)
        return cu * du + cc * dc

    return fn
