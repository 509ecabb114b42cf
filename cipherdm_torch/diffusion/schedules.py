"""Scheduler steps as public affine maps, so they can run on secret shares.

A DDPM or DDIM step of diffusers is, for one timestep,

    x0   = x0_from_sample * x_t + x0_from_output * m      (m: the UNet's output)
    x0   = clamp(x0, -r, r)                                (only with clip_sample)
    prev = c_x0 * x0 + c_sample * x_t + c_output * m + noise_std * z

with coefficients that depend only on the public schedule. :func:`affine_step`
reads them from a configured diffusers scheduler (its ``alphas_cumprod``,
timesteps and config); :func:`apply_step` evaluates the map with ``*`` and
``+`` only, so the same code runs on torch tensors and on CrypTen tensors.
The test suite checks ``apply_step`` against ``scheduler.step`` for every
timestep, prediction type, eta and clipping setting supported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


__all__ = ["AffineStep", "affine_step", "apply_step", "public_clamp"]


@dataclass(frozen=True)
class AffineStep:
    timestep: int
    x0_from_sample: float
    x0_from_output: float
    c_x0: float
    c_sample: float
    c_output: float
    noise_std: float
    clip: Optional[float]  # clamp range r of the x0 prediction, or None


def _x0_and_eps(prediction_type: str, a_t: float):
    """(x0_from_sample, x0_from_output, eps_from_sample, eps_from_output) for one noise level."""
    sa, sb = a_t ** 0.5, (1 - a_t) ** 0.5
    if prediction_type == "epsilon":
        return 1 / sa, -sb / sa, 0.0, 1.0
    if prediction_type == "v_prediction":
        return sa, -sb, sb, sa
    if prediction_type == "sample":
        return 0.0, 1.0, 1 / sb, -sa / sb
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def affine_step(scheduler: Any, timestep: int, eta: float = 0.0) -> AffineStep:
    """Coefficients of ``scheduler.step`` at ``timestep`` (DDPMScheduler or DDIMScheduler).

    ``set_timesteps`` must have been called on the scheduler, as for diffusers' own loop.
    """
    cfg = scheduler.config
    if getattr(cfg, "thresholding", False):
        raise NotImplementedError("dynamic thresholding (a per-sample quantile) is not supported "
                                  "on secret shares; use clip_sample instead")
    t = int(timestep)
    acp = scheduler.alphas_cumprod
    a_t = float(acp[t])
    clip = float(cfg.clip_sample_range) if cfg.clip_sample else None
    x0_s, x0_m, eps_s, eps_m = _x0_and_eps(cfg.prediction_type, a_t)
    name = type(scheduler).__name__
    if name == "DDPMScheduler":
        if cfg.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
            raise NotImplementedError(f"DDPM variance_type {cfg.variance_type!r} is not supported")
        prev_t = int(scheduler.previous_timestep(t))
        a_prev = float(acp[prev_t]) if prev_t >= 0 else 1.0
        beta_t = 1 - a_t / a_prev
        c_x0 = a_prev ** 0.5 * beta_t / (1 - a_t)
        c_sample = (a_t / a_prev) ** 0.5 * (1 - a_prev) / (1 - a_t)
        if t == 0:
            std = 0.0
        elif cfg.variance_type == "fixed_large":
            std = beta_t ** 0.5
        else:
            std = max((1 - a_prev) / (1 - a_t) * beta_t, 1e-20) ** 0.5
        return AffineStep(t, x0_s, x0_m, c_x0, c_sample, 0.0, std, clip)
    if name == "DDIMScheduler":
        prev_t = t - cfg.num_train_timesteps // scheduler.num_inference_steps
        a_prev = float(acp[prev_t]) if prev_t >= 0 else float(scheduler.final_alpha_cumprod)
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * variance ** 0.5
        direction = (1 - a_prev - std ** 2) ** 0.5
        return AffineStep(t, x0_s, x0_m, a_prev ** 0.5, direction * eps_s, direction * eps_m,
                          std, clip)
    raise NotImplementedError(f"{name} is not supported; use DDPMScheduler or DDIMScheduler")


def public_clamp(x: Any, r: float) -> Any:
    """clamp(x, -r, r) with ReLU only: works on torch tensors and on secret shares (2 comparisons)."""
    return x - (x - r).relu() + (-r - x).relu()


def apply_step(step: AffineStep, sample: Any, model_output: Any, noise: Any = None,
               clamp: Callable = public_clamp) -> Any:
    """One scheduler step from public coefficients; ``noise`` is required iff ``noise_std > 0``."""
    if step.clip is None:  # fold x0 into the step: two public products instead of four
        prev = (sample * (step.c_x0 * step.x0_from_sample + step.c_sample)
                + model_output * (step.c_x0 * step.x0_from_output + step.c_output))
    else:
        x0 = clamp(sample * step.x0_from_sample + model_output * step.x0_from_output, step.clip)
        prev = x0 * step.c_x0 + sample * step.c_sample
        if step.c_output:
            prev = prev + model_output * step.c_output
    if step.noise_std > 0:
        if noise is None:
            raise ValueError(f"timestep {step.timestep} needs noise (std {step.noise_std:.3g})")
        prev = prev + noise * step.noise_std
    return prev
