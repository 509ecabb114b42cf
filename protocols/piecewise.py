"""Piecewise polynomials on secret shares with comparisons shared between segments.

An activation f with f(x) -> relu(x) for |x| -> inf is evaluated as

    f(x) = relu(x) + c * (P(u) + b * D(u)),   u = 2|x|/T - 1,  b = [x < 0],  c = [x^2 < T^2]

where P is the residual polynomial for x >= 0 and D = (negative side) - P (zero
for the even residuals of SiLU and GELU). Both bits come from ONE batched
comparison (``_ltz`` of ``stack([x, x^2 - T^2])``), so a 4-segment function
(0-ish / negative polynomial / positive polynomial / identity) costs one
comparison round-trip and 2 comparisons per element, not one per breakpoint.

Why it is cheap (bytes per element, replicated backend): the bits have integer
scale, so ``b * x``, ``b * D`` and ``c * (...)`` need no truncation; powers of u
are computed in log-depth batches (:func:`powers`); the public coefficients are
applied as integers and the whole polynomial pays ONE truncation
(:func:`fixed_point_combination`) instead of one per coefficient; u^2 is linear in
x^2 and |x| (u and u^2 share one truncation, no product). The variable u in
[-1, 1] keeps coefficients below 1, so fixed-point rounding is not amplified.

Why it is robust: x^2 is never truncated (:func:`square_untruncated`), so the
window bit is exact for |x| < 46341 and everything computed for |x| >= T, even
if garbage, is multiplied by c = 0.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

import crypten
from crypten.encoder import FixedPointEncoder
from crypten.mpc import MPCTensor

__all__ = ["powers", "fixed_point_combination", "square_untruncated", "sign_window",
           "relu_plus_window"]


def powers(s: MPCTensor, degree: int, square: Optional[MPCTensor] = None) -> Dict[int, MPCTensor]:
    """{k: s^k} for k = 1..degree; round r computes every power in (2^r, 2^(r+1)] at once.

    ``square``: s^2 when the caller has it already (saves a product)."""
    pw = {1: s}
    if degree >= 2:
        pw[2] = s.square() if square is None else square
    top = 2
    while top < degree:
        new = list(range(top + 1, min(2 * top, degree) + 1))
        left = crypten.stack([pw[top]] * len(new))
        right = crypten.stack([pw[k - top] for k in new])
        prod = left * right
        for i, k in enumerate(new):
            pw[k] = prod[i]
        top = new[-1]
    return pw


def fixed_point_combination(terms: Sequence[MPCTensor],
                            weights: Sequence[Sequence[float]]) -> MPCTensor:
    """Stacked rows ``sum_k weights[r][k] * terms[k]`` with ONE truncation for all rows.

    CrypTen multiplies a secret by a public real as encode, multiply, truncate: one
    truncation (a communication round) per coefficient. Here every weight is
    encoded as an integer at the encoder's precision, the products are summed
    locally in the ring, and the sum is truncated once; the rounding error per
    weight is the same (2^-(precision+1) times |term|).
    """
    scale = FixedPointEncoder()._scale
    stacked = crypten.stack(list(terms))
    w = torch.tensor([[int(round(c * scale)) for c in row] for row in weights], dtype=torch.long)
    out = stacked[:1].clone()  # right encoder / type; share replaced below
    share = stacked.share
    out.share = torch.tensordot(w, share, dims=([1], [0]))
    return out.div(scale)


def square_untruncated(x: MPCTensor) -> MPCTensor:
    """x^2 * 2^f as a fixed-point secret: the ring product of x with itself, NOT truncated.

    Exact (no probabilistic truncation error) while |x| < 2^((63 - 2f) / 2), i.e.
    |x| < 46341 at f = 16 fractional bits (with the old probabilistic truncation a truncated
    square wrapped with probability about x^2 / 2^32 per element, 2% at |x| = 10^4; the exact
    truncation has no such failure, the untruncated square still saves a truncation).
    No communication of its own.
    """
    xi = x.clone()
    xi.encoder = FixedPointEncoder(precision_bits=0)  # integer scale: CrypTen skips truncation
    out = xi * x
    out.encoder = FixedPointEncoder()
    return out


def sign_window(x: MPCTensor, bound: float) -> Tuple[MPCTensor, MPCTensor, MPCTensor]:
    """(b, c, s) with b = [x < 0], c = [|x| < bound] from one batched comparison, s = x^2 2^f.

    The window compares the untruncated square (:func:`square_untruncated`), so both
    bits are exact for every |x| < 46341, however far outside the window.
    """
    s = square_untruncated(x)
    scale = float(FixedPointEncoder().scale)
    bits = crypten.stack([x, s - float(bound) ** 2 * scale])._ltz()
    return bits[0], bits[1], s


def relu_plus_window(x: MPCTensor, bound: float, pos: Sequence[float],
                     neg: Sequence[float]) -> MPCTensor:
    """relu(x) + [|x| < bound] * (x >= 0 ? pos : neg)(2|x|/bound - 1); coefficients u^0 first.

    Outside the window every intermediate may be garbage (huge u); it is multiplied
    by the exact bit c = 0, so the result there is exactly relu(x).
    """
    b, c, s = sign_window(x, bound)
    bx = b * x  # integer-scale bit: no truncation
    relu = x - bx
    t = relu - bx  # |x|
    scale = int(FixedPointEncoder().scale)
    if float(bound).is_integer():
        # u = 2T|x|/T^2 - 1 and u^2 = (4x^2 - 4T|x|)/T^2 + 1 from s = x^2 2^f: integer
        # weights, both divided by T^2 2^f in ONE truncation (one round), no product
        tb = int(bound)
        raw = crypten.stack([t * (2 * tb * scale), s * 4 - t * (4 * tb * scale)])
        raw = raw.div(tb * tb * scale)
        u, u2 = raw[0] - 1.0, raw[1] + 1.0
    else:
        u, u2 = t * (2.0 / bound) - 1.0, None
    degree = max(len(pos), len(neg)) - 1
    pw = powers(u, degree, square=u2)
    terms = [pw[k] for k in range(1, degree + 1)]
    pos = list(pos) + [0.0] * (degree + 1 - len(pos))
    neg = list(neg) + [0.0] * (degree + 1 - len(neg))
    if pos == neg:
        p = fixed_point_combination(terms, [pos[1:]])[0] + pos[0]
        return relu + c * p
    diff = [q - p for p, q in zip(pos, neg)]
    p, d = fixed_point_combination(terms, [pos[1:], diff[1:]])
    return relu + c * (p + pos[0] + b * (d + diff[0]))
