"""Privacy accounting cannot be fooled: example-mixing layers, resume, noise replay, PRV refresh,
sigma search tolerance, NaN in JSON records."""

import json
import math

import pytest
import torch
from synthetic import synthetic_images
import torch.nn as nn

from cipherdm_torch.errors import UserError
from cipherdm_torch.training import DPDMTrainer, LedgerError, TrainConfig
from cipherdm_torch.training.accounting import epsilon_spent, noise_multiplier_for
from cipherdm_torch.training.dpsgd import check_no_example_mixing
from cipherdm_torch.files import atomic_write_json
from cipherdm_torch.training.trainer import derive_dp_seed

torch.set_num_threads(1)


def _data(n=64, seed=0):
    return synthetic_images(n, seed)


def _cfg(out, **kw):
    base = dict(output_dir=str(out), model_channels=8, channel_mult=(1,), num_res_blocks=1,
                attn_resolutions=(), dropout=0.0, batch_size=8, noise_multiplicity=1,
                steps=4, epsilon=8.0, checkpoint_every=0, sample_grid=False, dp_seed=7, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("layer", [nn.BatchNorm2d(4, track_running_stats=False),
                                   nn.BatchNorm2d(4), nn.SyncBatchNorm(4)])
def test_example_mixing_layers_are_refused(layer):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), layer)
    with pytest.raises(UserError, match="mix examples"):
        check_no_example_mixing(model)


def test_trainer_refuses_batchnorm_before_writing(tmp_path):
    from cipherdm_torch.training.trainer import build_denoiser

    cfg = _cfg(tmp_path / "run")
    den = build_denoiser(cfg, (1, 8, 8), 3)
    den.backbone.extra_bn = nn.BatchNorm2d(8, track_running_stats=False)  # any submodule counts
    with pytest.raises(UserError, match="extra_bn"):
        DPDMTrainer(cfg, dataset=_data(), denoiser=den)
    assert not (tmp_path / "run").exists()


def test_resumed_run_never_replays_dp_noise(tmp_path):
    ds = _data()
    out = tmp_path / "run"
    tr = DPDMTrainer(_cfg(out), dataset=ds)
    first = [torch.rand(4, generator=tr.dp_gen) for _ in range(1)][0]  # what step 1 would draw
    tr = DPDMTrainer.resume(str(out), dataset=ds)  # same dp_seed, no steps yet: same stream is fine
    tr.train(progress=False, max_steps=2)
    resumed = DPDMTrainer.resume(str(out), dataset=ds)
    assert resumed.ledger.steps == 2
    again = torch.rand(4, generator=resumed.dp_gen)
    assert not torch.equal(first, again)  # a fresh stream after the 2 released steps
    assert derive_dp_seed(7, 2) != derive_dp_seed(7, 3) != 7 and derive_dp_seed(7, 0) == 7


def test_resume_refuses_ledger_fixed_options_and_keeps_config(tmp_path):
    ds = _data()
    out = tmp_path / "run"
    DPDMTrainer(_cfg(out), dataset=ds)
    before = json.loads((out / "train_config.json").read_text())
    for key, value in (("epsilon", 1000.0), ("noise_multiplier", 3.0), ("max_grad_norm", 2.0),
                       ("noise_multiplicity", 4), ("delta", 1e-6), ("accountant", "prv"),
                       ("data", "fashion-mnist"), ("batch_size", 16)):
        with pytest.raises(LedgerError, match=key):
            DPDMTrainer.resume(str(out), dataset=ds, **{key: value})
    assert json.loads((out / "train_config.json").read_text())["epsilon"] == before["epsilon"]
    DPDMTrainer.resume(str(out), dataset=ds, epsilon=before["epsilon"], steps=6)  # same: fine


@pytest.mark.parametrize("bad", [dict(epsilon=float("nan")), dict(epsilon=0.0),
                                 dict(epsilon=-1.0), dict(delta=1.0), dict(noise_multiplier=-1.0),
                                 dict(max_grad_norm=float("inf"))])
def test_invalid_config_refused_before_anything_is_written(tmp_path, bad):
    with pytest.raises(UserError):
        DPDMTrainer(_cfg(tmp_path / "run", **bad), dataset=_data())
    assert not (tmp_path / "run").exists()


def test_nan_never_reaches_a_json_record(tmp_path):
    path = tmp_path / "ledger.json"
    atomic_write_json(str(path), {"epsilon_spent": 1.0})
    with pytest.raises(ValueError):
        atomic_write_json(str(path), {"epsilon_spent": float("nan")})
    assert json.loads(path.read_text()) == {"epsilon_spent": 1.0}  # the old file stays
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]


def test_prv_epsilon_refreshed_every_step(tmp_path):
    tr = DPDMTrainer(_cfg(tmp_path / "run", accountant="prv", steps=3), dataset=_data())
    seen = []
    for _ in range(3):
        tr.train_step()
        seen.append(json.loads((tmp_path / "run" / "ledger.json").read_text())["epsilon_spent"])
    assert seen[0] > 0 and seen[0] < seen[1] < seen[2]


@pytest.mark.parametrize("target", [0.2, 1.0, 10.0])
def test_sigma_search_relative_tolerance(target):
    q, steps, delta = 0.004, 1000, 1e-5
    sigma = noise_multiplier_for(target, delta, q, steps)
    eps = epsilon_spent([(sigma, q, steps)], delta)
    assert eps <= target and eps >= target * (1 - 1e-3)


def test_unreachable_epsilon_is_a_user_error():
    with pytest.raises(UserError, match="out of reach"):
        noise_multiplier_for(1e-6, 1e-5, 0.01, 10)
    with pytest.raises(UserError):
        noise_multiplier_for(float("nan"), 1e-5, 0.01, 10)
    assert math.isfinite(noise_multiplier_for(1.0, 1e-5, 0.01, 10))


def test_fourier_time_embedding_backbone_is_finite():
    from diffusers import UNet2DModel

    from cipherdm_torch.diffusion.denoiser import Denoiser, make_precond
    from cipherdm_torch.diffusion.backbones import DiffusersBackbone

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       time_embedding_type="fourier")
    den = Denoiser(DiffusersBackbone(unet, 0), make_precond("edm"), 0).eval()
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 2.0, 80.0])
    with torch.no_grad():
        out = den(torch.randn(6, 1, 8, 8), sigma)
    assert torch.isfinite(out).all()
