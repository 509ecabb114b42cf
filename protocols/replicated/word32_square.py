"""Squarings of small non-negative fixed-point values on 32-bit words (exp's squaring chain).

Why: exp's chain squares values in [0, ~1] again and again (protocols/exp_softmax.py), each
square an exact truncation whose openings and re-share carry 64-bit ring elements (52 B per
element over the three parties). A value y <= 1.35 at 15 fractional bits squares to less
than 2^31, so the whole product and its truncation fit the ring Z_2^32 (shares of a 64-bit
sharing read mod 2^32 are a sharing mod 2^32: going down is free): the same two rounds with
4-byte words, 28 B per element, and the last square of the chain lands back in the 64-bit
ring (its openings still 4-byte words).

The truncation is :func:`.arith._truncate_exact_pow2` with l = 32 and no offset (x = y^2 is
known to lie in [0, 2^31)): the helper h draws ``r = r_a + r_b + r_h`` (``r_a``, ``r_b`` from
its streams with A = h + 1 and B = h + 2, their low d bits cleared; ``r_h < 2^d`` its own),
A and B open ``c = x + r mod 2^32``; since x < 2^31 the sum wrapped iff ``msb(r) = 1`` and
``msb(c) = 0``, so ``floor(x / 2^d) = (c >> d) - (r_a >> d) - (r_b >> d) + 2^(32-d) (W +
(1 - msb c) M)`` (W the wrap of r_a + r_b, M = msb(r)), or one more (when the low
bits of x and r_h carry: unbiased, as the 64-bit truncation). Within Z_2^32
only W and M mod 2^d matter (2 bytes each); into Z_2^64 they go as 64-bit words.
"""

from __future__ import annotations

from typing import Tuple

import torch

from cipherdm_torch.mpc import prg
from cipherdm_torch.protocols.replicated import arith as ra

__all__ = ["to_words32", "square_truncate32"]

Words = Tuple[torch.Tensor, torch.Tensor]  # (share, replica) of a replicated 32-bit sharing
_W32 = torch.int32
_LOW32 = (1 << 32) - 1


def to_words32(share: torch.Tensor) -> Words:
    """Replicated 64-bit (share, replica) -> the same sharing mod 2^32 (local)."""
    return share.to(_W32), ra.replicate(share).to(_W32)


def _unsigned(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.long) & _LOW32


def square_truncate32(y: Words, d: int, out64: bool = False) -> Words:
    """Replicated sharing of ``floor(y^2 / 2^d)`` (or one more) for a replicated 32-bit
    sharing of ``y`` with ``y^2 < 2^31``: as 32-bit words, or with ``out64`` as 64-bit ring
    elements. Two rounds (helper rotating per call, like the exact truncation)."""
    if not 1 <= d <= 16:
        raise ValueError(f"square_truncate32 divides by 2^d for 1 <= d <= 16, not {d}")
    rank, _ = ra._rank_ws()
    ys, yn = y
    z = ra.word_product(ys, yn, ys, yn)  # 3-out-of-3 share of y^2 mod 2^32
    helper = ra.helper_rotation.next()
    a, b = (helper + 1) % 3, (helper + 2) % 3
    size, dev = z.shape, z.device
    high = _LOW32 & ~((1 << d) - 1)  # clears the low d bits of r_a, r_b
    up = 32 - d
    out_dtype = torch.long if out64 else _W32
    corr_dtype = torch.long if out64 else torch.int16

    def finish(o, partner, draw_side):  # round 2: the A-B pair re-shares its additive result
        t = ra.rand_ring(size, draw_side, dev).to(out_dtype)
        mine, other = (o.to(out_dtype) - t).contiguous(), torch.empty(size, dtype=out_dtype,
                                                                       device=dev)
        ra.exchange([(mine, partner)], [(other, partner)])
        return t, mine + other

    if rank == a:
        r_a = ra.rand_ring(size, "prev", dev) & high
        w0 = ra.rand_ring(size, "prev", dev)
        m0 = ra.rand_ring(size, "prev", dev)
        z_b, from_h = torch.empty_like(z), torch.empty_like(z)
        ra.exchange([((z + r_a.to(_W32)).contiguous(), b)], [(z_b, b), (from_h, helper)])
        c = _unsigned(z + r_a.to(_W32) + z_b + from_h)  # x + r mod 2^32
        keep = 1 - (c >> 31)
        o = (c >> d) - (r_a >> d) + ((w0 + keep * m0) << up)
        t0, s = finish(o, b, "prev")
        return t0, s
    if rank == b:
        r_b = ra.rand_ring(size, "next", dev) & high
        masked_a, from_h = torch.empty_like(z), torch.empty_like(z)
        corr = torch.empty((2,) + tuple(size), dtype=corr_dtype, device=dev)
        ra.exchange([(z, a)], [(masked_a, a), (from_h, helper), (corr, helper)])
        c = _unsigned(masked_a + z + from_h + r_b.to(_W32))
        keep = 1 - (c >> 31)
        dw, dm = corr.to(torch.long).unbind(0)
        o = ((dw + keep * dm) << up) - (r_b >> d)
        t2, s = finish(o, a, "next")
        return s, t2
    r_a = ra.rand_ring(size, "next", dev) & high
    w0 = ra.rand_ring(size, "next", dev)
    m0 = ra.rand_ring(size, "next", dev)
    r_b = ra.rand_ring(size, "prev", dev) & high
    r_h = prg.local_ring(size, dev, bits=d)  # the helper's own: hides x's low bits
    total = r_a + r_b
    wrap, msb = total >> 32, (total >> 31) & 1  # r_h < 2^d leaves bit 31 as it is
    corr = torch.stack([wrap - w0, msb - m0])
    if not out64:
        corr = corr & ((1 << d) - 1)  # only mod 2^d matters (multiplied by 2^(32 - d))
    zh = z + r_h.to(_W32)
    ra.exchange([((zh + r_b.to(_W32)).contiguous(), a), (zh.contiguous(), b),
                 (corr.to(corr_dtype).contiguous(), b)], [])
    ra.exchange([], [])  # round 2 is A's and B's (every party's rounds stay aligned)
    t0 = ra.rand_ring(size, "next", dev).to(out_dtype)
    t2 = ra.rand_ring(size, "prev", dev).to(out_dtype)
    return t2, t0
