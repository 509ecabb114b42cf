"""DP-SGD with noise multiplicity K: per-example gradients, clipping, micro-batches, noise."""

import pytest
import torch

from cipherdm_torch.training.dpsgd import DPSGDEngine, poisson_sample
from cipherdm_torch.training.loss import per_example_loss, rows_for
from cipherdm_torch.diffusion.denoiser import Denoiser, EDMPrecond
from cipherdm_torch.diffusion.backbones import DDPMppUNet, make_diffusers_unet
from per_example_grads import reference_grads

torch.set_num_threads(1)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore:In CPU autocast"),
]


def _own():
    return DDPMppUNet(img_resolution=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(4,), dropout=0.0)


def _diffusers():
    # attention on the second level: convs after a diffusers attention block get channels-last
    # strided inputs, the case where Opacus' hooks-mode conv sampler silently goes wrong
    return make_diffusers_unet(img_resolution=8, block_out_channels=(8, 16), layers_per_block=1,
                               attention_levels=(False, True), attention_head_dim=8)


def _batch(b=3, res=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 1, res, res, generator=g) * 2 - 1
    labels = torch.tensor([1, 5, 10, 3, 7, 2][:b])  # 10 = null label
    return x0, labels


def _max_rel_err(got, ref):
    worst = 0.0
    for i, r in enumerate(ref):
        total = torch.sqrt(sum(g.pow(2).sum() for g in r.values()))
        flat_got = torch.cat([got[n][i].flatten() for n in r])
        flat_ref = torch.cat([r[n].flatten() for n in r])
        worst = max(worst, float((flat_got - flat_ref).norm() / flat_ref.norm()))
        for n, g in r.items():
            # some diffusers parameters (attention key bias, ...) legitimately have zero gradient
            if g.norm() <= 1e-5 * total:
                continue
            worst = max(worst, float((got[n][i] - g).norm() / g.norm()))
    return worst


@pytest.mark.parametrize("backbone,mode", [
    ("own", "hooks"), ("own", "functorch"), ("diffusers", "hooks"), ("diffusers", "functorch"),
])
def test_per_example_grads_match_autograd_loop(backbone, mode):
    k = 3
    torch.manual_seed(0)
    den = Denoiser(_own() if backbone == "own" else _diffusers(), EDMPrecond(), num_classes=10)
    den.train()
    x0, labels = _batch()
    rows = rows_for(den, x0, labels, k, generator=torch.Generator().manual_seed(1))
    ref = reference_grads(den, x0, labels, rows, k)
    eng = DPSGDEngine(den, torch.optim.SGD(den.parameters(), lr=0.1), noise_multiplier=1.0,
                      max_grad_norm=1.0, expected_batch_size=3, k=k, grad_sample_mode=mode)
    got = eng.per_example_grads(x0, labels, rows=rows)
    eng.detach()
    assert set(got) == set(ref[0])
    for n, g in got.items():
        assert g.shape == (3, *ref[0][n].shape)
    err = _max_rel_err(got, ref)
    print(f"{backbone}/{mode}: max relative error {err:.2e}")
    assert err < 1e-4


def _engine(den, k, clip=1.0, sigma=0.0, batch=4, physical=64, gen=None):
    return DPSGDEngine(den, torch.optim.SGD(den.parameters(), lr=0.0), noise_multiplier=sigma,
                       max_grad_norm=clip, expected_batch_size=batch, k=k,
                       max_physical_batch=physical, label_dropout=0.0, noise_generator=gen)


def test_each_example_contribution_clipped_to_C_with_K_rows():
    """One example with K = 8 noise draws contributes at most C in total (not K * C)."""
    torch.manual_seed(0)
    den = Denoiser(_own(), EDMPrecond(), num_classes=10)
    k, clip = 8, 0.5
    eng = _engine(den, k, clip=clip, batch=1)
    x0, labels = _batch(1)
    rows = rows_for(den, x0, labels, k, generator=torch.Generator().manual_seed(3))
    raw = eng.per_example_grads(x0, labels, rows=rows)
    raw_norm = float(torch.sqrt(sum(g.pow(2).sum() for g in raw.values())))
    assert raw_norm > 10 * clip  # the unclipped per-example gradient is far above C
    eng.step(x0, labels, generator=torch.Generator().manual_seed(3))
    contrib = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in den.parameters())))  # * batch 1
    assert contrib == pytest.approx(clip, rel=1e-4)
    # rows clipped separately (stock Opacus on B*K rows) would add up to more than C here
    row_norms = []
    for j in range(k):
        r = tuple(t[j:j + 1] for t in rows)
        den.zero_grad()
        per_example_loss(den, den, x0, labels, 1, rows=r).sum().backward()
        row_norms.append(float(torch.sqrt(sum(p.grad.pow(2).sum() for p in den.parameters()))))
    assert sum(min(clip, n / k) for n in row_norms) > 1.5 * clip


def test_clipped_sum_equals_sum_of_clipped_per_example_grads_with_microbatches():
    torch.manual_seed(0)
    den = Denoiser(_own(), EDMPrecond(), num_classes=10)
    k, clip, b = 2, 20.0, 5
    x0, labels = _batch(5)
    x0[0] *= 0.01  # a small-gradient example (may fall below the clip norm)
    g = torch.Generator().manual_seed(7)  # the draws step() makes, micro-batch by micro-batch
    chunks = [rows_for(den, x0[s:s + 2], labels[s:s + 2], k, generator=g) for s in (0, 2, 4)]
    rows = tuple(torch.cat(parts) for parts in zip(*chunks))
    eng = _engine(den, k, clip=clip, batch=b, physical=2)  # 3 physical micro-batches
    raw = eng.per_example_grads(x0, labels, rows=rows)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in raw.values()))
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert factors.max() <= 1.0 and factors.min() < 1.0
    eng.step(x0, labels, generator=torch.Generator().manual_seed(7))
    for n, p in den.named_parameters():
        expect = torch.einsum("i,i...->...", factors, raw[n]) / b
        assert torch.allclose(p.grad, expect, rtol=1e-4, atol=1e-6), n
    assert torch.allclose(eng.last_per_example_norms, norms, rtol=1e-4)


def test_noise_scale_and_empty_batch():
    """An empty Poisson batch is a valid step: pure N(0, (sigma C / qN)^2) noise."""
    torch.manual_seed(0)
    den = Denoiser(_own(), EDMPrecond(), num_classes=10)
    sigma, clip, batch = 2.0, 1.5, 4.0
    eng = _engine(den, 2, clip=clip, sigma=sigma, batch=batch,
                  gen=torch.Generator().manual_seed(11))
    loss = eng.step(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    assert loss != loss  # nan: no examples
    g = torch.cat([p.grad.flatten() for p in den.parameters()])
    assert g.numel() > 5000
    assert float(g.std()) == pytest.approx(sigma * clip / batch, rel=0.03)
    assert abs(float(g.mean())) < 0.05 * sigma * clip / batch


def test_poisson_sample_rate():
    idx = poisson_sample(100000, 0.03, generator=torch.Generator().manual_seed(0))
    assert 2700 < len(idx) < 3300
    assert len(torch.unique(idx)) == len(idx)
