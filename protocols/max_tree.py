"""Maximum along a dimension by a pairwise tree, written on ``MPCTensor`` ops only.

Backend-independent: the tree uses ``narrow``, ``cat`` and the comparison of the ``combine``
step (``_ltz`` or ``relu``), all through CrypTen's normal dispatch, so it runs on whichever
protocol ``crypten.cfg.mpc.protocol`` selects; the replicated backend speeds the comparisons up
by replacing ``MPCTensor._ltz`` / ``relu`` when it is active, nothing here knows about it.
``ceil(log2 n)`` levels, ``n - 1`` comparisons per reduced row, one batched comparison per
level.
"""

from __future__ import annotations

from typing import Callable

import crypten
from crypten.mpc import MPCTensor

from cipherdm_torch.protocols import config

__all__ = ["pairwise_tree", "ternary_tree", "larger_by_sign", "larger_by_relu", "tree_max",
           "ternary_max"]

Combine = Callable[[MPCTensor, MPCTensor], MPCTensor]


def pairwise_tree(x: MPCTensor, dim: int, combine: Combine) -> MPCTensor:
    """Reduce along ``dim`` (keepdim) by halves: ``combine(first half, second half)``.

    ceil(log2 n) levels; an odd leftover entry is carried to the next level.
    """
    dim = dim % x.dim()
    cur = x
    while cur.size(dim) > 1:
        n = cur.size(dim)
        half = n // 2
        best = combine(cur.narrow(dim, 0, half), cur.narrow(dim, half, half))
        if n % 2:
            best = crypten.cat([best, cur.narrow(dim, n - 1, 1)], dim=dim)
        cur = best
    return cur


def larger_by_sign(a: MPCTensor, b: MPCTensor) -> MPCTensor:
    """max(a, b) = b + [a >= b] (a - b): one sign bit and one product by a bit."""
    diff = a - b
    return b + (1 - diff._ltz()) * diff


def larger_by_relu(a: MPCTensor, b: MPCTensor) -> MPCTensor:
    """max(a, b) = a + relu(b - a)."""
    return a + (b - a).relu()


def tree_max(x: MPCTensor, dim: int, keepdim: bool = True,
             combine: Combine = larger_by_sign) -> MPCTensor:
    """Maximum of ``x`` along ``dim`` by :func:`pairwise_tree` with ``combine``."""
    out = pairwise_tree(x, dim, combine)
    return out if keepdim else out.squeeze(dim % x.dim())


def _largest_of_three(a: MPCTensor, b: MPCTensor, c: MPCTensor) -> MPCTensor:
    """max(a, b, c) with ONE batched comparison (3 bits), one product of bits and one product
    of bits by values: a if a >= b and a >= c, else b if b >= c, else c. Exactly one of the
    selectors s_a = [a>=b][a>=c], s_b = [a<b][b>=c] and 1 - s_a - s_b is 1 (ties pick the
    first), so max = c + s_a (a - c) + s_b (b - c). Bits have integer scale: no truncation.
    The differences a - c and b - c are taken from the compared stack (on the rss backend
    it was re-shared for the comparison, so the last product re-shares only the selectors).
    On the rss backend the selection rides on masked comparison bits and costs no round
    (:func:`cipherdm_torch.protocols.replicated.compare.largest_of_three`)."""
    if crypten.cfg.mpc.protocol == "rss":
        from cipherdm_torch.protocols.replicated import compare  # the backend is a plug-in

        return compare.largest_of_three(a, b, c)
    diffs = crypten.stack([a - b, a - c, b - c])
    ge = 1 - diffs._ltz()  # [a>=b], [a>=c], [b>=c]
    sel = crypten.stack([ge[0], 1 - ge[0]]) * crypten.stack([ge[1], ge[2]])  # s_a, s_b
    picked = sel * diffs[1:]
    return c + picked[0] + picked[1]


def ternary_tree(x: MPCTensor, dim: int) -> MPCTensor:
    """Max along ``dim`` (keepdim) by thirds: ceil(log3 n) levels (5 for n = 196, against 8
    by halves), each one comparison round trip plus two products of bits (on the rss backend
    the comparison alone: :func:`_largest_of_three`), so about 40% fewer rounds; 3
    comparisons per 3 entries per level (about 1.5 n per row instead of n).
    A leftover of one entry is carried to the next level, of two is padded with a copy of
    the last (the max is unchanged)."""
    dim = dim % x.dim()
    cur = x
    while cur.size(dim) > 1:
        n = cur.size(dim)
        if n == 2:
            return larger_by_sign(cur.narrow(dim, 0, 1), cur.narrow(dim, 1, 1))
        if n % 3 == 2:
            cur = crypten.cat([cur, cur.narrow(dim, n - 1, 1)], dim=dim)
            n += 1
        t = n // 3
        best = _largest_of_three(cur.narrow(dim, 0, t), cur.narrow(dim, t, t),
                                 cur.narrow(dim, 2 * t, t))
        if n % 3 == 1:
            best = crypten.cat([best, cur.narrow(dim, n - 1, 1)], dim=dim)
        cur = best
    return cur


def ternary_max(x: MPCTensor, dim: int, keepdim: bool = True) -> MPCTensor:
    """Maximum of ``x`` along ``dim`` by :func:`ternary_tree`.

    Inside ``protocols.config.coarse_comparisons()`` on the rss backend (16-bit comparisons
    after a local shift s: the softmax row max) the whole tree runs on 16-bit words and the
    result is within 3 2^(s + 1) encoded units of the max
    (:func:`cipherdm_torch.protocols.replicated.word16_max.row_max`)."""
    settings = config.current()
    if crypten.cfg.mpc.protocol == "rss" and settings.compare_bits == 16:
        from cipherdm_torch.protocols.replicated import word16_max  # the backend is a plug-in

        return word16_max.row_max(x, dim, settings.compare_shift, keepdim)
    out = ternary_tree(x, dim)
    return out if keepdim else out.squeeze(dim % x.dim())
