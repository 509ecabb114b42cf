"""Layer 4, the diffusion core shared by DP training and secure sampling.

* :mod:`.backbones` — the DDPM++ UNet (:class:`~.backbones.DDPMppUNet`) and diffusers wrappers.
* :mod:`.denoiser` — EDM / v-prediction preconditioning and the :class:`~.denoiser.Denoiser`
  (``save_pretrained`` / ``from_pretrained``).
* :mod:`.checkpoints` — the denoiser's folder format (write, read, recognise).
* :mod:`.edm` — EDM sigma grids, Euler / Heun / churn / guidance coefficients.
* :mod:`.schedules` — diffusers DDPM / DDIM steps as public affine maps.
* :mod:`.sampling` — the sampling loops, run on plaintext tensors and on shares alike, and the
  plaintext samplers of a denoiser.
"""

from cipherdm_torch.diffusion.backbones import (DDPMppUNet, DiffusersBackbone, count_parameters,
                                                image_shape, make_diffusers_unet)
from cipherdm_torch.diffusion.checkpoints import is_checkpoint_dir
from cipherdm_torch.diffusion.denoiser import (Denoiser, EDMPrecond, VPrecond, edm_coefficients,
                                               load_denoiser, make_precond, save_denoiser)
from cipherdm_torch.diffusion.edm import (cfg_coefficients, ddpm_sigmas, edm_sigmas,
                                          euler_coefficients, guided, heun_coefficients)
from cipherdm_torch.diffusion.sampling import (Noise, edm_loop, fidelity, sample, sample_edm,
                                               sample_euler, scheduler_loop)
from cipherdm_torch.diffusion.schedules import affine_step, apply_step

__all__ = [
    "Denoiser", "EDMPrecond", "VPrecond", "make_precond", "edm_coefficients",
    "save_denoiser", "load_denoiser", "is_checkpoint_dir",
    "DDPMppUNet", "DiffusersBackbone", "make_diffusers_unet", "image_shape", "count_parameters",
    "sample", "sample_edm", "sample_euler", "edm_loop", "scheduler_loop", "Noise", "fidelity",
    "edm_sigmas", "ddpm_sigmas", "euler_coefficients", "heun_coefficients", "cfg_coefficients",
    "guided", "affine_step", "apply_step",
]
