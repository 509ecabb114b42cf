"""Public affine scheduler steps must equal diffusers' own ``scheduler.step`` for every timestep."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from cipherdm_torch.diffusion.schedules import affine_step, apply_step


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1, 4, 4, generator=g) * 1.5, torch.randn(2, 1, 4, 4, generator=g)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_step_matches_diffusers(prediction_type, clip, variance_type):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type,
                          clip_sample=clip, variance_type=variance_type)
    sched.set_timesteps(100)
    for i, t in enumerate(sched.timesteps):
        x, m = _inputs(i)
        ref = sched.step(m, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        ours = apply_step(affine_step(sched, t), x, m, z)
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_diffusers(prediction_type, clip, eta):
    sched = DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type,
                          clip_sample=clip)
    sched.set_timesteps(50)
    for i, t in enumerate(sched.timesteps):
        x, m = _inputs(i)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i))
        ref = sched.step(m, t, x, eta=eta, variance_noise=z if eta > 0 else None).prev_sample
        ours = apply_step(affine_step(sched, t, eta=eta), x, m, z)
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_missing_noise_and_unsupported_configs_are_clear_errors():
    sched = DDPMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(10)
    x, m = _inputs(0)
    with pytest.raises(ValueError, match="needs noise"):
        apply_step(affine_step(sched, sched.timesteps[0]), x, m)
    with pytest.raises(NotImplementedError, match="thresholding"):
        affine_step(DDPMScheduler(thresholding=True), 10)
