"""Secure sampling pipelines, called like diffusers pipelines, run inside every party.

``SecureDDPMPipeline`` / ``SecureDDIMPipeline`` wrap an encrypted noise-prediction UNet
(diffusers ``UNet2DModel`` or any model converted by :func:`cipherdm_torch.encrypt`) and a
diffusers scheduler; ``SecureEDMPipeline`` wraps the encrypted backbone of a DPDM-trained
denoiser (:mod:`cipherdm_torch.diffusion`). Each party calls the pipeline with the same public
arguments (batch size, steps, guidance); only the user passes the seed and class labels, which
are secret-shared from the user's rank. The images are revealed to the user only; the other
parties get ``images=None``. Timesteps and scheduler coefficients are public.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import torch

from cipherdm_torch.mpc import cost
from cipherdm_torch.mpc.crypten_compat import crypten
from cipherdm_torch.mpc.runtime import party
from cipherdm_torch.diffusion.backbones import image_shape as model_sample_shape
from cipherdm_torch.diffusion.edm import cfg_coefficients, edm_sigmas, guided
from cipherdm_torch.diffusion.sampling import Noise, SharedNoise, StepLog, edm_loop, scheduler_loop

__all__ = ["SecureSampleOutput", "SecureDDPMPipeline", "SecureDDIMPipeline", "SecureEDMPipeline",
           "model_output", "model_image_shape", "plaintext_scheduler_sample", "plaintext_edm_sample"]


@dataclass
class SecureSampleOutput:
    images: Optional[torch.Tensor]  # in [-1, 1]; the user's rank only
    cost: cost.CostMeter
    steps: List[dict] = field(default_factory=list)

    def report(self) -> dict:
        """JSON-ready cost report: totals, per op type (region) and per step."""
        return {**self.cost.as_dict(), "steps": self.steps}


def model_image_shape(unet: Any) -> Optional[tuple]:
    """(channels, height, width) of a model's samples from its config; ``unet`` may be an
    :class:`~cipherdm_torch.compiler.EncryptedModule` (read through the model it wraps)."""
    return model_sample_shape(getattr(unet, "_model", unet))


def model_output(out: Any) -> Any:
    """The sample tensor of a model's output (diffusers output classes, tuples or a tensor)."""
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, dict):
        return out["sample"]
    return out


class _SecurePipeline:
    def __init__(self, unet, label_input: str = "class_labels"):
        self.unet, self.label_input = unet, label_input
        self.party = party()

    def _share_labels(self, class_labels, guided: bool, null_label: Optional[int]):
        if self.label_input not in self.unet.one_hot_inputs:
            return None
        value = None
        if self.party.is_user:
            if class_labels is None:
                raise ValueError("this model is class-conditional: the user must pass class_labels")
            value = torch.as_tensor(class_labels).long().reshape(-1)
            if guided:
                value = torch.cat([torch.full_like(value, null_label), value])  # uncond first
        return self.unet.share_input(self.label_input, value)

    def _image_shape(self, image_shape) -> tuple:
        if image_shape is not None:
            return tuple(image_shape)
        shape = model_image_shape(self.unet)
        return shape if shape is not None else (1, 28, 28)

    def _finish(self, x, meter, log):
        images = self.unet.reveal(x)
        return SecureSampleOutput(images.clamp(-1, 1) if images is not None else None,
                                  meter, log.steps)


class _SchedulerPipeline(_SecurePipeline):
    """Shared loop of the DDPM and DDIM pipelines."""

    default_steps = 50

    def __init__(self, unet, scheduler, label_input: str = "class_labels",
                 sample_input: str = "sample", timestep_input: str = "timestep"):
        super().__init__(unet, label_input)
        self.scheduler = scheduler
        self.sample_input, self.timestep_input = sample_input, timestep_input

    def __call__(self, batch_size: int = 1, num_inference_steps: Optional[int] = None,
                 image_shape: Optional[Sequence[int]] = None, seed: Optional[int] = None,
                 class_labels=None, eta: float = 0.0, progress: bool = True) -> SecureSampleOutput:
        """``image_shape``: (channels, height, width); by default from the model's config
        (``in_channels``, ``sample_size``), else (1, 28, 28)."""
        self.scheduler.set_timesteps(num_inference_steps or self.default_steps)
        shape = (batch_size, *self._image_shape(image_shape))
        with cost.CostMeter() as meter:
            noise = SharedNoise(seed, self.party.roles.user, self.party.rank)
            labels = self._share_labels(class_labels, False, None)
            extra = {} if labels is None else {self.label_input: labels}

            def denoise(x, t):
                return model_output(self.unet(**{self.sample_input: x, self.timestep_input: t},
                                              **extra))

            log = StepLog(meter)
            x = noise.draw(shape, float(self.scheduler.init_noise_sigma))
            x = scheduler_loop(denoise, self.scheduler, x, noise, eta=self._eta(eta), log=log,
                               progress=progress and self.party.is_user)
        return self._finish(x, meter, log)

    def _eta(self, eta: float) -> float:
        return eta


class SecureDDPMPipeline(_SchedulerPipeline):
    """Ancestral DDPM sampling (diffusers ``DDPMScheduler``), fresh noise from the user."""

    default_steps = 1000

    def _eta(self, eta: float) -> float:
        return 0.0


class SecureDDIMPipeline(_SchedulerPipeline):
    """DDIM sampling (diffusers ``DDIMScheduler``): deterministic for ``eta=0``."""


class SecureEDMPipeline(_SecurePipeline):
    """EDM / Euler sampling of a preconditioned denoiser ``D = c_skip x + c_out F(c_in x, c_noise, y)``.

    ``backbone`` is the encrypted network ``F`` (inputs: sample, public ``c_noise``, secret
    class labels); ``precond`` gives the public coefficients (``precond.coefficients(sigma)``).
    """

    def __init__(self, backbone: Any, precond: Any, num_classes: int = 0, label_input: str = "class_labels",
                 sample_input: str = "x", noise_input: str = "noise_labels"):
        super().__init__(backbone, label_input)
        self.precond, self.num_classes = precond, num_classes
        self.sample_input, self.noise_input = sample_input, noise_input

    def __call__(self, batch_size: int = 1, num_inference_steps: int = 18,
                 image_shape: Optional[Sequence[int]] = None, seed: Optional[int] = None,
                 class_labels=None, guidance_scale: float = 1.0, heun: bool = True,
                 s_churn: float = 0.0, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, progress: bool = True) -> SecureSampleOutput:
        guided = self.num_classes > 0 and guidance_scale != 1.0
        sigmas = edm_sigmas(num_inference_steps, sigma_min, sigma_max, rho).tolist()
        shape = (batch_size, *self._image_shape(image_shape))
        with cost.CostMeter() as meter:
            noise = SharedNoise(seed, self.party.roles.user, self.party.rank)
            labels = self._share_labels(class_labels, guided, self.num_classes)
            extra = {} if labels is None else {self.label_input: labels}
            cu, cc = cfg_coefficients(guidance_scale)

            def denoise(x, sigma):
                c_skip, c_out, c_in, c_noise = (float(c) for c in self.precond.coefficients(sigma))
                inp = crypten.cat([x, x]) if guided else x
                f = model_output(self.unet(**{self.sample_input: inp * c_in,
                                              self.noise_input: torch.full((inp.size(0),), c_noise)},
                                           **extra))
                if guided:
                    fu, fc = f[:batch_size], f[batch_size:]
                    f = fu * cu + fc * cc  # guidance is linear: combine before the skip term
                return x * c_skip + f * c_out

            log = StepLog(meter)
            x = noise.draw(shape, sigmas[0])
            x = edm_loop(denoise, sigmas, x, noise, heun=heun, s_churn=s_churn, log=log,
                         progress=progress and self.party.is_user)
        return self._finish(x, meter, log)


# ---------------------------------------------------------------- plaintext twins (fidelity checks)
@torch.no_grad()
def plaintext_scheduler_sample(unet: torch.nn.Module, scheduler: Any, batch_size: int = 1,
                               num_inference_steps: int = 50,
                               image_shape: Optional[Sequence[int]] = None, seed: int = 0,
                               class_labels: Optional[Sequence[int]] = None, eta: float = 0.0,
                               ddpm: bool = False) -> torch.Tensor:
    """What the secure DDPM / DDIM pipeline computes, in plaintext with the same noise draws."""
    if image_shape is None:
        image_shape = model_sample_shape(unet) or (1, 28, 28)
    scheduler.set_timesteps(num_inference_steps)
    noise = Noise(seed)
    extra = {} if class_labels is None else {"class_labels": torch.as_tensor(class_labels).long()}
    x = noise.draw((batch_size, *image_shape), float(scheduler.init_noise_sigma))
    x = scheduler_loop(lambda x, t: model_output(unet(x, t, **extra)), scheduler, x, noise,
                       eta=0.0 if ddpm else eta)
    return x.clamp(-1, 1)


@torch.no_grad()
def plaintext_edm_sample(denoiser: torch.nn.Module, batch_size: int = 1,
                         num_inference_steps: int = 18,
                         image_shape: Sequence[int] = (1, 28, 28), seed: int = 0,
                         class_labels: Optional[Sequence[int]] = None,
                         guidance_scale: float = 1.0, heun: bool = True, s_churn: float = 0.0,
                         sigma_min: float = 0.002, sigma_max: float = 80.0,
                         rho: float = 7.0) -> torch.Tensor:
    """What ``SecureEDMPipeline`` computes, in plaintext, for a :class:`~cipherdm_torch.diffusion.Denoiser`."""
    sigmas = edm_sigmas(num_inference_steps, sigma_min, sigma_max, rho).tolist()
    noise = Noise(seed)
    labels = None if class_labels is None else torch.as_tensor(class_labels).long()
    fn = guided(denoiser.eval(), guidance_scale)
    x = noise.draw((batch_size, *image_shape), sigmas[0])
    x = edm_loop(lambda x, s: fn(x, s, labels), sigmas, x, noise, heun=heun, s_churn=s_churn)
    return x.clamp(-1, 1)
