"""Bit extraction and bit planes of the binary sharing (protocols/replicated/binary.py), locally."""

import pytest
import torch

from cipherdm_torch.protocols.replicated import binary as rb


def _reference_bits(w):
    return ((w.unsqueeze(-1) >> torch.arange(64)) & 1).to(torch.uint8)


@pytest.mark.parametrize("shape", [(), (1,), (5, 3), (64,), (130,), (2, 0), (3, 65, 2)])
def test_bits_of_and_planes_agree_with_shifts(shape):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    w = torch.randint(-2**63, 2**63 - 1, shape, dtype=torch.long, generator=g)
    ref = _reference_bits(w)
    assert torch.equal(rb.bits_of(w), ref)
    assert torch.equal(rb.bits_of(w, 7, 40), ref[..., 7:40])
    planes = rb.to_planes(w)
    n = w.numel()
    assert planes.shape == (64, -(-n // 64))
    for j in range(64):
        assert torch.equal(rb.from_plane(planes[j], shape), ref[..., j]), j
    # padding elements are zero in every plane
    if n % 64:
        assert torch.equal(rb.bits_of(planes)[:, -1, n % 64:], torch.zeros_like(
            rb.bits_of(planes)[:, -1, n % 64:]))


def test_bits_of_a_one_element_view_of_a_wide_tensor():
    planes = rb.to_planes(torch.tensor([5, -1, 2**62], dtype=torch.long))  # one word per plane
    assert torch.equal(rb.bits_of(planes[0]), _reference_bits(planes[0]))
    assert rb.from_plane(planes[0], (3,)).tolist() == [1, 1, 0]
    assert rb.from_plane(planes[62], (3,)).tolist() == [0, 1, 1]


@pytest.mark.parametrize("shape", [(), (1,), (5, 3), (64,), (128,), (130,), (3, 65, 2)])
def test_planes32_match_the_planes_of_the_low_32_bits(shape):
    g = torch.Generator().manual_seed(7 + sum(shape))
    w = torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, generator=g)
    ref = _reference_bits(w.to(torch.long))
    planes = rb.to_planes32(w)
    assert planes.shape[0] == 32 and planes.shape[1] * 64 >= w.numel()
    for j in range(32):
        assert torch.equal(rb.from_plane(planes[j], shape), ref[..., j]), j
