"""Reciprocal and inverse square root with an initial guess from the input's magnitude.

CrypTen starts Newton's iteration from a fixed guess, which diverges or stalls
for inputs far from 1 (its reciprocal is wrong above ~100). Here the exponent
k with 2^k <= x < 2^(k+1) is found first, by comparing x with every power of
two in [2^lo, 2^hi] in ONE batched comparison (c_j = [x >= 2^j]); the one-hot
d_j = c_j - c_(j+1) (integer scale) then gives the public-weight sums 2^-k,
2^(-k/2) and the guess's slope terms B 2^-k locally: no multiplication, no
truncation, no round. The mantissa m = x 2^-k lies in [1, 2), where a linear
guess has relative error <= 1/17 (1/x) or 2.2% (1/sqrt x), and two Newton steps
reach the fixed-point resolution. Products in sequence: one comparison (about 10 rounds on
the replicated backend) + 1 + 2 per iteration (1/x) or 2 per iteration + 1 (1/sqrt x).
With a calibrated input range (``magnitude_lo`` / ``magnitude_hi`` from
:func:`cipherdm_torch.protocols.recorded_ranges.calibrated_settings`) the comparison covers
only the powers of two inside that range with a margin: fewer bytes, same rounds.
Bytes: (hi - lo) comparisons per element, so these run on per-group / per-row
statistics, never on whole activations. Inputs below 2^lo are treated as
2^lo-scale and stay bounded; above 2^hi accuracy degrades gracefully (the
guess saturates); above ~2^14 the slope weight B 2^-k has few bits and Newton's
steps absorb the coarser guess.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import crypten
import torch
from crypten.encoder import FixedPointEncoder
from crypten.mpc import MPCTensor

from cipherdm_torch.protocols import config

__all__ = ["reciprocal", "rsqrt", "batched_mul", "exponent_onehot", "weigh", "reciprocal_scaled"]

# minimax linear guesses on m in [1, 2): 1/m ~ A - B m, 1/sqrt(m) ~ C - D m
_RECIP_A, _RECIP_B = 24 / 17, 8 / 17


# minimax relative fit of m^-1/2 on [1, 2] (max relative error 2.2%, by equal ripple)
_RSQRT_C, _RSQRT_D = 1.26416, 0.2864


def exponent_onehot(x: MPCTensor, lo: int, hi: int) -> Tuple[Optional[MPCTensor], List[int]]:
    """(d, ks): integer-scale one-hot d over ks = lo..hi of k with 2^k <= x < 2^(k+1) (clamped).

    One batched comparison of x with every 2^j, j in (lo, hi]; the one-hot is a local
    function of the monotone bits c_j = [x >= 2^j]. Shape of d: (len(ks),) + x's shape.
    """
    js = list(range(lo + 1, hi + 1))
    if not js:
        return None, [lo]
    c = 1 - crypten.stack([x - 2.0 ** j for j in js])._ltz()  # c_j = [x >= 2^j], scale 1
    # one-hot of k: d_lo = 1 - c_(lo+1), d_j = c_j - c_(j+1), d_hi = c_hi
    return crypten.cat([1 - c[:1], c[:-1] - c[1:], c[-1:]]), [lo] + js


def weigh(d: Optional[MPCTensor], ks: Sequence[int], weight: Callable[[int], float],
          like: MPCTensor) -> MPCTensor:
    """sum_k d_k * weight(k) as a fixed-point secret: local (no truncation, no round).

    Each weight is encoded as an integer on its own and only one d_k is 1, so the
    result carries a single weight's rounding error (exact for powers of two >= 2^-16).
    """
    enc = FixedPointEncoder()
    if d is None:  # a single possible exponent: a public constant
        return like * 0 + float(weight(ks[0]))
    w = torch.tensor([int(round(weight(k) * enc.scale)) for k in ks], dtype=torch.long)
    out = (d * w.reshape((len(ks),) + (1,) * (d.dim() - 1))).sum(0)
    out.encoder = enc
    return out


def _range(lo, hi):
    cfg = config.current()
    return (cfg.magnitude_lo if lo is None else lo), (cfg.magnitude_hi if hi is None else hi)


def reciprocal_scaled(x: MPCTensor, lo: Optional[int] = None, hi: Optional[int] = None,
                      iters: Optional[int] = None) -> Tuple[MPCTensor, MPCTensor]:
    """(r, p) with p = 2^-k (secret power of two) and r = 1 / (x p) in (1/2, 1]: 1/x = r p.

    Keeping the two factors apart lets a caller multiply by r first and by p
    last, so that 1/x is never materialised with few significant bits (softmax
    rows with large sums). The mantissa m = x p and the slope term of the linear
    guess, x (B p), are one batched product (one round).
    """
    lo, hi = _range(lo, hi)
    iters = config.current().reciprocal_iters if iters is None else iters
    d, ks = exponent_onehot(x, lo, hi)
    p = weigh(d, ks, lambda k: 2.0 ** -k, x)
    pb = weigh(d, ks, lambda k: _RECIP_B * 2.0 ** -k, x)
    m, mb = crypten.stack([p, pb]) * x
    r = _RECIP_A - mb
    for _ in range(iters):
        r = r * (2 - m * r)
    return r, p


def reciprocal(x: MPCTensor, lo: Optional[int] = None, hi: Optional[int] = None) -> MPCTensor:
    """1 / x for x > 0 in [2^lo, 2^hi] (config knobs ``magnitude_lo`` / ``magnitude_hi``)."""
    r, p = reciprocal_scaled(x, lo, hi)
    return r * p


def batched_mul(pairs: Sequence[Tuple[MPCTensor, MPCTensor]]) -> List[MPCTensor]:
    """[a * b for a, b in pairs] as ONE secret product (one truncation, one round trip) even
    when the pairs have different shapes: each b is broadcast to its a, everything flattened
    and concatenated, multiplied once and split back."""
    shapes = [tuple(a.size()) for a, _ in pairs]
    left = crypten.cat([a.flatten() for a, _ in pairs])
    right = crypten.cat([b.expand(*shape).flatten() for (_, b), shape in zip(pairs, shapes)])
    prod = left * right
    out, start = [], 0
    for shape in shapes:
        size = 1
        for d in shape:
            size *= d
        out.append(prod.narrow(0, start, size).reshape(shape))
        start += size
    return out


def rsqrt(x: MPCTensor, lo: Optional[int] = None, hi: Optional[int] = None,
          times: Optional[MPCTensor] = None) -> MPCTensor:
    """1 / sqrt(x) for x > 0 in [2^lo, 2^hi]; ``times * (1 / sqrt(x))`` when ``times`` (a
    secret of a shape ``x`` broadcasts to, e.g. the centred activations of a norm) is given.

    With ``times``, its product with the power-of-two part q = 2^(-k/2) rides in the first
    Newton step's batched product, and only the final product by the Newton iterate y remains:
    one product (two rounds) fewer than ``times * rsqrt(x)``.

    Newton's step y (3 - m y^2) / 2 is run as 1.5 y - (h y) y^2 with h = m / 2 taken
    from the one-hot weights (no extra truncation for the halving): h y and y^2 are one
    batched product, so two products (truncations) deep per iteration; h and the slope
    term of the guess are one batched product.
    """
    lo, hi = _range(lo, hi)
    d, ks = exponent_onehot(x, lo, hi)
    ph = weigh(d, ks, lambda k: 2.0 ** -(k + 1), x)
    pd = weigh(d, ks, lambda k: _RSQRT_D * 2.0 ** -k, x)
    q = weigh(d, ks, lambda k: 2.0 ** (-k / 2), x)
    if times is None:
        h, md = crypten.stack([ph, pd]) * x
    else:
        # q rides along (times 1): the product's output carries the replicated backend's
        # replica, which the expansion of q to the shape of ``times`` keeps, so the batched
        # product below re-shares no activation-sized copy of q
        h, md, q = crypten.stack([ph, pd, q]) * crypten.stack([x, x, x * 0 + 1])
    y = _RSQRT_C - md
    scaled = None
    for i in range(config.current().rsqrt_iters):
        # y (1.5 - h y^2) = 1.5 y - (h y) y^2: h y and y^2 in one batched product, then one
        # more product: two rounds of truncation per step instead of three
        if i == 0 and times is not None:
            hy, y2, scaled = batched_mul([(h, y), (y, y), (times, q)])
        else:
            hy, y2 = crypten.stack([h, y]) * crypten.stack([y, y])
        y = 1.5 * y - hy * y2
    if times is None:
        return y * q
    if scaled is None:  # no Newton step
        scaled = times * q
    return scaled * y


rsqrt.accepts_times = True  # normalization passes the centred activations as ``times``
