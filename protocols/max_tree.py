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

__all__ = ["pairwise_tree", "larger_by_sign", "larger_by_relu", "tree_max"]

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
