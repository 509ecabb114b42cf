"""Layer 4, the diffusion core shared by DP training and secure sampling.

* :mod:`.backbones` — the DDPM++ UNet (:class:`~.backbones.DDPMppUNet`) and diffusers wrappers.
* :mod:`.denoiser` — EDM / v-prediction preconditioning and the :class:`~.denoiser.Denoiser`.
* :mod:`.samplers` — EDM sigma grids, Euler / Heun / churn / guidance maths.
* :mod:`.schedules` — diffusers DDPM / DDIM steps as public affine maps.
* :mod:`.sampling` — the one sampling loop, run on plaintext tensors and on shares alike.
* :mod:`.checkpoints` — the denoiser's folder format (save / load / find).
* :mod:`.images` — [-1, 1] <-> uint8 and image grids.
"""
