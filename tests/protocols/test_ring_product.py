"""Exact ring products through float64 limbs, against torch's int64 kernels, bit for bit."""

import pytest
import torch
import torch.nn.functional as F

from cipherdm_torch.protocols.replicated.ring import MAX_TERMS, ring_product


def _ring(shape, g):
    return torch.randint(-2 ** 63, 2 ** 63 - 1, shape, generator=g, dtype=torch.long)


CASES = [
    (torch.matmul, (5, 7), (7, 3), {}),
    (torch.matmul, (2, 4, 6, 33), (33, 9), {}),  # broadcast batch dimensions
    (torch.matmul, (3, 1, 8, 16), (2, 16, 8), {}),
    (torch.matmul, (12,), (12, 4), {}),
    (F.conv2d, (2, 3, 9, 9), (5, 3, 3, 3), {"padding": 1}),
    (F.conv2d, (1, 4, 10, 8), (6, 4, 3, 1), {"stride": 2, "dilation": 2, "padding": (2, 0)}),
    (F.conv1d, (2, 3, 20), (4, 3, 5), {"stride": 3}),
    (F.conv_transpose2d, (2, 4, 5, 5), (4, 3, 3, 3), {"stride": 2, "padding": 1,
                                                       "output_padding": 1}),
    (F.conv_transpose1d, (1, 3, 7), (3, 2, 4), {"stride": 2}),
    (F.conv2d, (1, 4, 6, 6), (4, 2, 3, 3), {"groups": 2}),  # grouped: one call per limb pair
    (F.conv_transpose2d, (1, 6, 4, 4), (6, 2, 3, 3), {"groups": 3, "stride": 2}),
    (torch.mul, (4, 5), (4, 5), {}),  # elementwise: int64
]


@pytest.fixture
def limbs_always(monkeypatch):
    """Every product through the limbs (small ones otherwise take the int64 kernel)."""
    from cipherdm_torch.protocols.replicated import ring

    monkeypatch.setattr(ring, "CPU_LIMB_MIN_MACS", 0)


@pytest.mark.parametrize("op,xs,ys,kw", CASES)
def test_ring_product_is_bit_exact(op, xs, ys, kw, limbs_always):
    g = torch.Generator().manual_seed(len(xs) * 31 + len(ys))
    x, y = _ring(xs, g), _ring(ys, g)
    assert torch.equal(ring_product(op, x, y, **kw), op(x, y, **kw))


def test_small_products_keep_the_int64_kernel_and_large_ones_take_the_limbs(monkeypatch):
    from cipherdm_torch.protocols.replicated import ring

    calls = []
    original = ring._limbs
    monkeypatch.setattr(ring, "_limbs", lambda t: calls.append(t.shape) or original(t))
    g = torch.Generator().manual_seed(5)
    small = (_ring((1, 4, 8, 8), g), _ring((4, 4, 3, 3), g))  # 9k multiply-adds
    assert torch.equal(ring_product(F.conv2d, *small, padding=1), F.conv2d(*small, padding=1))
    from cipherdm_torch.protocols import config

    with config.use(product_device="cpu"):  # the operands' own device: the same rule
        assert torch.equal(ring_product(F.conv2d, *small, padding=1), F.conv2d(*small, padding=1))
    assert not calls
    big = (_ring((2, 16, 32, 32), g), _ring((32, 16, 3, 3), g))  # 9.4M multiply-adds
    assert torch.equal(ring_product(F.conv2d, *big, padding=1), F.conv2d(*big, padding=1))
    assert calls


def test_extreme_values_and_the_exactness_bound(limbs_always):
    # all-ones limbs maximise every float64 partial sum: 2^32 K must stay below 2^53
    k = 4096
    x = torch.full((2, k), -1, dtype=torch.long)  # 0xFFFF...F
    y = torch.full((k, 3), -1, dtype=torch.long)
    assert torch.equal(ring_product(torch.matmul, x, y), x @ y)
    assert MAX_TERMS == 2 ** 21
    big = torch.ones(1, MAX_TERMS + 1, dtype=torch.long)  # past the bound: int64 kernel
    assert int(ring_product(torch.matmul, big, big.t())) == MAX_TERMS + 1


@pytest.mark.parametrize("op,xs,ys,kw", CASES)
def test_ring_product_elsewhere_is_bit_exact_and_comes_home(op, xs, ys, kw):
    # "cpu:0" is a different torch.device than "cpu": the operands travel and the result
    # comes back through the same code as with "cuda" (bit-exactness on a GPU: bench/check_cuda.py)
    from cipherdm_torch.protocols import config

    g = torch.Generator().manual_seed(len(xs) * 17 + len(ys))
    x, y = _ring(xs, g), _ring(ys, g)
    with config.use(product_device="cpu:0"):
        got = ring_product(op, x, y, **kw)
    assert got.device == x.device and torch.equal(got, op(x, y, **kw))
    assert torch.equal(ring_product(op, x, y, device=torch.device("cpu:0"), **kw), got)


def test_product_device_setting_refuses_what_cannot_run():
    from cipherdm_torch.protocols import config

    for bad in ("tpu", "bogus", 3.5):
        with pytest.raises(ValueError, match="product_device"):
            with config.use(product_device=bad):
                pass
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            with config.use(product_device="cuda"):
                pass
    with config.use(product_device="cpu") as s:
        assert s.product_device == "cpu"
