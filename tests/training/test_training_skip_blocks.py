"""diffusers Skip / AttnSkip blocks under DP-SGD: per-example gradients against an autograd loop.

diffusers' ``UNet2DModel`` with Skip up blocks ends with ``sample = conv_out(...); sample +=
skip_sample``: an in-place add into the output of a module Opacus hooks with a full backward hook,
which autograd refuses ("Output 0 of BackwardHookFunction is a view and is being modified
inplace"). ``training/opacus_compat.py`` hands diffusers a clone of that output while the engine is
attached.
"""

import pytest
import torch

from cipherdm_torch.data import ImageDataset
from cipherdm_torch.diffusion.backbones import make_diffusers_unet
from cipherdm_torch.diffusion.denoiser import Denoiser, EDMPrecond, load_denoiser
from cipherdm_torch.training import DPDMTrainer, TrainConfig
from cipherdm_torch.training.dpsgd import DPSGDEngine
from cipherdm_torch.training.loss import rows_for
from cipherdm_torch.training.opacus_compat import (_CloneOutput, clone_in_place_outputs,
                                                   in_place_output_targets)

from per_example_grads import reference_grads

torch.set_num_threads(1)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore:In CPU autocast"),
]

# diffusers' Skip blocks hard-code 3 image channels; AttnSkip blocks hard-code 32 norm groups
LAYOUTS = {
    "skip": dict(block_out_channels=(8, 16), down_block_types=("SkipDownBlock2D",) * 2,
                 up_block_types=("SkipUpBlock2D",) * 2),
    # AttnSkip on the outer level: its skip_conv / skip image path runs (the last level's does not)
    "attnskip": dict(block_out_channels=(32, 32),
                     down_block_types=("AttnSkipDownBlock2D", "SkipDownBlock2D"),
                     up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D")),
}


def _backbone(layout, num_classes=10):
    return make_diffusers_unet(img_resolution=8, in_channels=3, out_channels=3,
                               num_classes=num_classes, layers_per_block=1,
                               attention_levels=(False, False), attention_head_dim=8,
                               **LAYOUTS[layout])


def _batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 8, 8, generator=g) * 2 - 1, torch.tensor([1, 10, 4][:b])


def _max_rel_err(got, ref):
    """Worst relative error over examples: the whole gradient and each parameter's (parameters
    whose gradient is legitimately ~0, e.g. attention key biases, skipped)."""
    worst = 0.0
    for i, r in enumerate(ref):
        total = torch.sqrt(sum(g.pow(2).sum() for g in r.values()))
        flat_got = torch.cat([got[n][i].flatten() for n in r])
        flat_ref = torch.cat([r[n].flatten() for n in r])
        worst = max(worst, float((flat_got - flat_ref).norm() / flat_ref.norm()))
        for n, g in r.items():
            if g.norm() <= 1e-5 * total:
                continue
            worst = max(worst, float((got[n][i] - g).norm() / g.norm()))
    return worst


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_skip_blocks_per_example_grads_match_autograd_loop(layout, mode):
    k = 2
    torch.manual_seed(0)
    den = Denoiser(_backbone(layout), EDMPrecond(), num_classes=10)
    den.train()
    x0, labels = _batch()
    rows = rows_for(den, x0, labels, k, generator=torch.Generator().manual_seed(1))
    ref = reference_grads(den, x0, labels, rows, k)
    eng = DPSGDEngine(den, torch.optim.SGD(den.parameters(), lr=0.1), noise_multiplier=1.0,
                      max_grad_norm=1.0, expected_batch_size=3, k=k, grad_sample_mode=mode)
    got = eng.per_example_grads(x0, labels, rows=rows)
    eng.detach()
    assert set(got) == set(ref[0])  # parameter names unchanged by the fix
    assert any("skip_conv" in n for n in got)  # the skip path has parameters and they are checked
    for n, g in got.items():
        assert g.shape == (3, *ref[0][n].shape)
    err = _max_rel_err(got, ref)
    print(f"{layout}/{mode}: max relative error {err:.2e}")
    assert err < 1e-4


def test_fix_is_transparent_and_removed_on_detach():
    torch.manual_seed(0)
    den = Denoiser(_backbone("skip"), EDMPrecond(), num_classes=10)  # no dropout: deterministic
    unet = den.backbone.unet
    conv_out = unet.conv_out
    keys = list(den.state_dict())
    x, labels = _batch()
    sigma = torch.tensor([0.5, 2.0, 10.0])
    with torch.no_grad():
        before = den(x, sigma, labels)
    # functorch mode: the hooks mode's contiguous conv inputs may change the last bits
    eng = DPSGDEngine(den, torch.optim.SGD(den.parameters(), lr=0.1), noise_multiplier=1.0,
                      max_grad_norm=1.0, expected_batch_size=3, grad_sample_mode="functorch")
    assert isinstance(vars(unet).get("conv_out"), _CloneOutput)  # installed while attached
    assert unet.conv_out.weight is conv_out.weight
    assert list(den.state_dict()) == keys and unet._modules["conv_out"] is conv_out
    with torch.no_grad():
        torch.testing.assert_close(den(x, sigma, labels), before, rtol=0, atol=0)
    eng.detach()
    assert unet.conv_out is conv_out and "conv_out" not in vars(unet)
    with torch.no_grad():
        torch.testing.assert_close(den(x, sigma, labels), before, rtol=0, atol=0)
    # two users of the same model: the proxy stays until the last one is removed
    first, second = clone_in_place_outputs(den), clone_in_place_outputs(den)
    first.remove()
    assert isinstance(vars(unet).get("conv_out"), _CloneOutput)
    second.remove()
    assert unet.conv_out is conv_out
    # models without Skip up blocks are left alone
    plain = make_diffusers_unet(img_resolution=8, block_out_channels=(8, 16), layers_per_block=1,
                                attention_levels=(False, True))
    assert list(in_place_output_targets(plain)) == []


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_trainer_runs_two_steps_with_skip_backbone_and_checkpoints(tmp_path, layout):
    g = torch.Generator().manual_seed(0)
    ds = ImageDataset((torch.rand(32, 3, 8, 8, generator=g) * 255).to(torch.uint8),
                      torch.randint(0, 3, (32,), generator=g), 3, "synthetic-rgb")
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), backbone="diffusers", batch_size=8,
                      noise_multiplicity=2, steps=2, epsilon=8.0, checkpoint_every=2,
                      sample_grid=False, dp_seed=7, lr=1e-3, dropout=0.0)
    torch.manual_seed(0)
    den = Denoiser(_backbone(layout, num_classes=3), EDMPrecond(), num_classes=3)
    start = {n: p.detach().clone() for n, p in den.named_parameters()}
    tr = DPDMTrainer(cfg, dataset=ds, denoiser=den)
    tr.train(progress=False)
    assert tr.ledger.steps == 2
    moved = [n for n, p in den.named_parameters() if not torch.equal(p, start[n])]
    assert any(n.endswith("conv_out.weight") for n in moved)
    assert any("skip_conv" in n for n in moved)
    assert all(torch.isfinite(p).all() for p in den.parameters())
    # the checkpoint holds the usual diffusers keys and loads back into a UNet2DModel
    loaded = load_denoiser(str(tmp_path / "run" / tr.ledger.checkpoint), ema=False)
    assert tuple(loaded.backbone.unet.config.up_block_types) == LAYOUTS[layout]["up_block_types"]
    sd = loaded.state_dict()
    assert set(sd) == set(den.state_dict())
    for n, p in den.state_dict().items():
        torch.testing.assert_close(sd[n], p)


def test_make_diffusers_unet_refuses_skip_layouts_diffusers_cannot_run():
    with pytest.raises(ValueError, match="3 input channels"):
        make_diffusers_unet(img_resolution=8, in_channels=1, out_channels=1,
                            block_out_channels=(8, 16), layers_per_block=1,
                            attention_levels=(False, False),
                            down_block_types=("SkipDownBlock2D",) * 2)
    with pytest.raises(ValueError, match="3 output channels"):
        make_diffusers_unet(img_resolution=8, in_channels=1, out_channels=1,
                            block_out_channels=(8, 16), layers_per_block=1,
                            attention_levels=(False, False),
                            up_block_types=("SkipUpBlock2D",) * 2)
    with pytest.raises(ValueError, match="after the first Skip up block"):
        make_diffusers_unet(img_resolution=8, in_channels=3, out_channels=3,
                            block_out_channels=(8, 16), layers_per_block=1,
                            attention_levels=(False, False),
                            up_block_types=("SkipUpBlock2D", "UpBlock2D"))
    with pytest.raises(ValueError, match="one entry per level"):
        make_diffusers_unet(img_resolution=8, block_out_channels=(8, 16),
                            attention_levels=(False, False), down_block_types=("DownBlock2D",))
