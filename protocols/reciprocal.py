"""Reciprocal and inverse square root with an initial guess from the input's magnitude.

CrypTen starts Newton's iteration from a fixed guess, which diverges or stalls
for inputs far from 1 (its reciprocal is wrong above ~100). Here the exponent
k with 2^k <= x < 2^(k+1) is found first, by comparing x with every power of
two in [2^lo, 2^hi] in ONE batched comparison (c_j = [x >= 2^j]); the one-hot
d_j = c_j - c_(j+1) then gives the public-weight sums 2^-k and 2^(-k/2)
without any multiplication. The mantissa m = x 2^-k lies in [1, 2), where a
linear guess has relative error <= 1/17 (1/x) or 3.3% (1/sqrt x), and two
Newton steps reach the fixed-point resolution. Cost per element:
(hi - lo) comparisons (batched: rounds of one) + ~6 (1/x) or ~9 (1/sqrt x)
multiplications. Inputs below 2^lo are treated as 2^lo-scale and stay bounded;
inputs above 2^hi lose accuracy gracefully (the guess saturates).
"""

from __future__ import annotations

from typing import Optional

import crypten
import torch
from crypten.encoder import FixedPointEncoder

from . import config

__all__ = ["reciprocal", "rsqrt", "magnitude", "reciprocal_scaled", "to_fixed"]

# minimax linear guesses on m in [1, 2): 1/m ~ A - B m, 1/sqrt(m) ~ C - D m
_RECIP_A, _RECIP_B = 24 / 17, 8 / 17


# minimax relative fit of m^-1/2 on [1, 2] (max relative error 2.2%, by equal ripple)
_RSQRT_C, _RSQRT_D = 1.26416, 0.2864


def to_fixed(bits):
    """0/1 comparison bits (integer encoding, scale 1) as fixed-point shares (local)."""
    enc = FixedPointEncoder()
    out = bits * int(enc.scale)
    out.encoder = enc
    return out


def magnitude(x, lo: int, hi: int, half: bool = False):
    """(2^-k, 2^(-k/2) if half) for 2^k <= x < 2^(k+1), k clamped to [lo, hi]; one batched comparison.

    The one-hot d_k of k is a local function of the stacked bits c_j = [x >= 2^j]; the sum
    sum_k d_k w(k) is then ONE product with a public weight tensor (one truncation, i.e. one
    round on the replicated backend, per output instead of one per power of two). Each weight
    is rounded to fixed point on its own, and only one d_k is 1, so the result carries a single
    weight's rounding error.
    """
    js = list(range(lo + 1, hi + 1))
    if not js:
        p = 2.0 ** -lo
        return x * 0 + p, (x * 0 + 2.0 ** (-lo / 2) if half else None)
    below = to_fixed(crypten.stack([x - 2.0 ** j for j in js])._ltz())  # [x < 2^j]
    c = 1 - below  # c_j = [x >= 2^j], monotone in j
    # one-hot of k: d_lo = 1 - c_(lo+1), d_j = c_j - c_(j+1), d_hi = c_hi
    onehot = crypten.cat([1 - c[:1], c[:-1] - c[1:], c[-1:]])
    ks = [lo] + js
    shape = (len(ks),) + (1,) * (onehot.dim() - 1)

    def weighted(w):
        return (onehot * torch.tensor([w(k) for k in ks]).reshape(shape)).sum(0)

    p = weighted(lambda k: 2.0 ** -k)
    q = weighted(lambda k: 2.0 ** (-k / 2)) if half else None
    return p, q


def reciprocal_scaled(x, lo: Optional[int] = None, hi: Optional[int] = None,
                      iters: Optional[int] = None):
    """(r, p) with p = 2^-k (secret power of two) and r = 1 / (x p) in (1/2, 1]: 1/x = r p.

    Keeping the two factors apart lets a caller multiply by r first and by p
    last, so that 1/x is never materialised with few significant bits (softmax
    rows with large sums).
    """
    cfg = config.current()
    lo = cfg.magnitude_lo if lo is None else lo
    hi = cfg.magnitude_hi if hi is None else hi
    iters = cfg.reciprocal_iters if iters is None else iters
    p, _ = magnitude(x, lo, hi)
    m = x * p
    r = _RECIP_A - m * _RECIP_B
    for _ in range(iters):
        r = r * (2 - m * r)
    return r, p


def reciprocal(x, lo: Optional[int] = None, hi: Optional[int] = None):
    """1 / x for x > 0 in [2^lo, 2^hi] (config knobs ``magnitude_lo`` / ``magnitude_hi``)."""
    r, p = reciprocal_scaled(x, lo, hi)
    return r * p


def rsqrt(x, lo: Optional[int] = None, hi: Optional[int] = None):
    """1 / sqrt(x) for x > 0 in [2^lo, 2^hi]."""
    cfg = config.current()
    lo = cfg.magnitude_lo if lo is None else lo
    hi = cfg.magnitude_hi if hi is None else hi
    p, q = magnitude(x, lo, hi, half=True)
    m = x * p
    y = _RSQRT_C - m * _RSQRT_D
    for _ in range(cfg.rsqrt_iters):
        y = y * (3 - m * y.square()) * 0.5
    return y * q
