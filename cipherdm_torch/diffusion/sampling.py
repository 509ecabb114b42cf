"""The sampling loops: one EDM loop and one scheduler loop, run on plaintext tensors and on shares.

The UNet call is the only expensive part of a step; everything else is a public affine map
(:mod:`cipherdm_torch.diffusion.schedules` for diffusers' DDPM / DDIM, :mod:`cipherdm_torch.diffusion.edm`
coefficients for the EDM / Euler sampler of DPDM-trained denoisers). The loops only use ``*``,
``+`` and ``relu`` on the state, so feeding them CrypTen tensors gives the secure sampler and
feeding them torch tensors gives its plaintext twin, which draws the same noise in the same order
(:class:`Noise`) for a like-for-like fidelity check.

The plaintext samplers of a trained :class:`~cipherdm_torch.diffusion.denoiser.Denoiser`
(:func:`sample`, :func:`sample_edm`, :func:`sample_euler`) are thin callers of :func:`edm_loop`
with a :class:`Noise` around the caller's ``torch.Generator``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from cipherdm_torch.diffusion.backbones import image_shape
from cipherdm_torch.diffusion.edm import (DenoiseFn, churn, churn_gamma, ddpm_sigmas, edm_sigmas,
                                          euler_coefficients, guided, heun_coefficients)
from cipherdm_torch.diffusion.schedules import affine_step, apply_step, public_clamp
from cipherdm_torch.mpc import cost

__all__ = ["Noise", "SharedNoise", "StepLog", "scheduler_loop", "edm_loop", "sample_edm",
           "sample_euler", "sample", "fidelity"]


class Noise:
    """The user's randomness in plaintext, drawn in a fixed order.

    ``Noise(seed)`` owns a generator seeded with ``seed``; ``Noise(generator=g)`` draws from the
    caller's generator (``None``: torch's global one), on ``device``.
    """

    def __init__(self, seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 device: Optional[Union[str, torch.device]] = None):
        if seed is not None and generator is not None:
            raise ValueError("give a seed or a generator, not both")
        self.generator = torch.Generator().manual_seed(int(seed)) if seed is not None else generator
        self.device = device

    def _randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, device=self.device, dtype=dtype)

    def draw(self, shape: Sequence[int], scale: float = 1.0) -> Any:
        """``scale`` times a standard normal draw of ``shape`` (a tensor; a share in SharedNoise)."""
        return self._randn(shape) * scale


class SharedNoise(Noise):
    """The same draws, made by the user and secret-shared from the user's rank.

    Other ranks never hold the values: they pass zeros of the right shape, which
    CrypTen ignores except for their size (shares come from pseudo-random zero sharings).
    """

    def __init__(self, seed: Optional[int], user: int, rank: int):
        self.user, self.is_user = user, rank == user
        self.generator = torch.Generator().manual_seed(int(seed)) if self.is_user else None
        self.device = None

    def draw(self, shape: Sequence[int], scale: float = 1.0) -> Any:
        import crypten  # only on the secure path: plaintext sampling (and training) never loads it

        z = self._randn(shape) * scale if self.is_user else torch.zeros(tuple(shape))
        return crypten.cryptensor(z, src=self.user)


class StepLog:
    """Per-step cost snapshots of an active CostMeter (bytes, rounds, seconds per step)."""

    def __init__(self, meter: Optional[cost.CostMeter]):
        self.meter, self.steps = meter, []
        self._last = self._snapshot()

    def _snapshot(self):
        t = self.meter.total if self.meter else None
        return (t.bytes_sent, t.bytes_received, t.rounds) if t else (0, 0, 0)

    def __call__(self, index: int, label, seconds: float) -> dict:
        now = self._snapshot()
        entry = {"step": index, "t": label, "seconds": seconds,
                 "bytes_sent": now[0] - self._last[0], "bytes_received": now[1] - self._last[1],
                 "rounds": now[2] - self._last[2]}
        self._last = now
        self.steps.append(entry)
        return entry


def _progress(total: int, enabled: bool, desc: str):
    return tqdm(total=total, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)


def _run_steps(steps: Sequence, body: Callable, log: Optional[StepLog], progress: bool, desc: str):
    bar = _progress(len(steps), progress, desc)
    sent = 0
    try:
        for i, s in enumerate(steps):
            t0 = time.perf_counter()
            with cost.region("step"):
                body(i, s)
            if log is not None:
                entry = log(i, s, time.perf_counter() - t0)
                sent += entry["bytes_sent"]
                bar.set_postfix_str(f"sent {sent / 1e6:,.1f} MB")
            bar.update(1)
    finally:
        bar.close()


def scheduler_loop(denoise: Callable, scheduler: Any, x: Any, noise: Noise, eta: float = 0.0,
                   clamp: Callable = public_clamp, log: Optional[StepLog] = None,
                   progress: bool = False) -> Any:
    """diffusers-style loop: ``model_output = denoise(x, t)``, then the scheduler's affine step."""
    state = {"x": x}

    def body(i, t):
        step = affine_step(scheduler, t, eta)
        with cost.region("unet"):
            m = denoise(state["x"], int(t))
        with cost.region("update"):
            z = noise.draw(m.shape if hasattr(m, "shape") else m.size()) if step.noise_std > 0 else None
            state["x"] = apply_step(step, state["x"], m, z, clamp)

    _run_steps([int(t) for t in scheduler.timesteps], body, log, progress, "sampling")
    return state["x"]


def edm_loop(denoise: Callable, sigmas: Sequence[float], x: Any, noise: Noise, heun: bool = True,
             s_churn: float = 0.0, s_min: float = 0.0, s_max: float = float("inf"),
             s_noise: float = 1.0, log: Optional[StepLog] = None, progress: bool = False) -> Any:
    """EDM sampler (Heun or Euler, optional churn) for ``D = denoise(x, sigma)``; VE form.

    ``sigmas`` ends with 0; the churn noise comes from ``noise`` (one draw per churned step).
    """
    sig = [float(s) for s in sigmas]
    n = len(sig) - 1
    state = {"x": x}

    def body(i, s):
        s_next = sig[i + 1]
        x = state["x"]
        s_hat, std = churn(s, churn_gamma(s, n, s_churn, s_min, s_max), s_noise)
        if std > 0:
            x = x + noise.draw(_shape(x), std)
        with cost.region("unet"):
            d1 = denoise(x, s_hat)
        a, b = euler_coefficients(s_hat, s_next)
        x_e = x * a + d1 * b
        if not heun or s_next == 0.0:
            state["x"] = x_e
            return
        with cost.region("unet"):
            d2 = denoise(x_e, s_next)
        cx, c1, c2 = heun_coefficients(s_hat, s_next)
        state["x"] = x * cx + d1 * c1 + d2 * c2

    _run_steps(sig[:-1], body, log, progress, "sampling")
    return state["x"]


def _shape(x):
    return tuple(x.shape) if hasattr(x, "shape") else tuple(x.size())


# ------------------------------------------------------------------ plaintext samplers
def _initial_noise(noise: Noise, shape: Sequence[int], sigma0: float) -> torch.Tensor:
    # drawn in float64, then rounded: the plaintext samplers' draws since their first release
    # (kept so a seed gives the same images as before)
    return noise._randn(shape, torch.float64).float() * float(sigma0)


@torch.no_grad()
def sample_euler(denoise: DenoiseFn, shape: Sequence[int], labels: Optional[torch.Tensor] = None,
                 sigmas: Optional[torch.Tensor] = None, num_steps: int = 50,
                 generator: Optional[torch.Generator] = None,
                 device: Union[str, torch.device] = "cpu",
                 x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Deterministic Euler / DDIM sampling along ``sigmas`` (default: EDM schedule)."""
    sigmas = edm_sigmas(num_steps) if sigmas is None else sigmas
    noise = Noise(generator=generator, device=device if x is None else x.device)
    if x is None:
        x = _initial_noise(noise, shape, sigmas[0])
    return edm_loop(lambda x, s: denoise(x, s, labels), sigmas, x, noise, heun=False)


@torch.no_grad()
def sample_edm(denoise: DenoiseFn, shape: Sequence[int], labels: Optional[torch.Tensor] = None,
               num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
               rho: float = 7.0, s_churn: float = 0.0, s_min: float = 0.0,
               s_max: float = float("inf"), s_noise: float = 1.0,
               generator: Optional[torch.Generator] = None,
               device: Union[str, torch.device] = "cpu",
               x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """EDM's stochastic sampler (Heun, churn): ``s_churn = 0`` gives the deterministic Heun ODE."""
    sigmas = edm_sigmas(num_steps, sigma_min, sigma_max, rho)
    noise = Noise(generator=generator, device=device if x is None else x.device)
    if x is None:
        x = _initial_noise(noise, shape, sigmas[0])
    return edm_loop(lambda x, s: denoise(x, s, labels), sigmas, x, noise, heun=True,
                    s_churn=s_churn, s_min=s_min, s_max=s_max, s_noise=s_noise)


def sample(denoiser: torch.nn.Module, labels: Optional[Sequence[int]] = None,
           num_samples: Optional[int] = None, method: str = "edm", num_steps: int = 18,
           guidance: float = 1.0, generator: Optional[torch.Generator] = None,
           shape: Optional[Tuple[int, ...]] = None, **kw) -> torch.Tensor:
    """Images in [-1, 1] from a ``Denoiser``: ``method`` "edm" (Heun + churn), "euler", "ddim".

    ``labels`` (one image each) or ``num_samples``; ``shape`` defaults to the model's image shape.
    ``kw`` goes to :func:`sample_edm` / :func:`sample_euler` (e.g. ``s_churn``).
    """
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        num_samples = len(labels)
    if shape is None:
        per_image = image_shape(denoiser)
        if per_image is None or num_samples is None:
            raise ValueError("give labels or num_samples, and shape if the model's config has no "
                             "image size")
        shape = (num_samples, *per_image)
    if method not in ("edm", "euler", "ddim"):
        raise ValueError(f"unknown sampler {method!r}: choose edm, euler or ddim")
    was_training = denoiser.training
    denoiser.eval()
    fn = guided(denoiser, guidance)
    try:
        if method == "edm":
            x = sample_edm(fn, shape, labels, num_steps=num_steps, generator=generator, **kw)
        elif method == "euler":
            x = sample_euler(fn, shape, labels, num_steps=num_steps, generator=generator, **kw)
        else:
            x = sample_euler(fn, shape, labels, sigmas=ddpm_sigmas(num_steps), generator=generator,
                             **kw)
    finally:
        denoiser.train(was_training)
    return x.clamp(-1, 1)


def fidelity(secure: torch.Tensor, plain: torch.Tensor, data_range: float = 2.0) -> dict:
    """Max / mean absolute difference and PSNR (images in [-1, 1] by default)."""
    diff = (secure.float() - plain.float()).abs()
    mse = float((diff ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * math.log10(data_range ** 2 / mse)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "psnr_db": psnr}
