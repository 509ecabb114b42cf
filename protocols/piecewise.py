"""Piecewise polynomials on secret shares with comparisons shared between segments.

An activation f with f(x) -> relu(x) for |x| -> inf is evaluated as

    f(x) = relu(x) + c * p_side(u),  u = 2|x|/T - 1,  b = [x < 0],  c = [x^2 < T^2]

Both bits come from ONE batched comparison (``_ltz`` of ``stack([x, x^2 - T^2])``),
so a 4-segment function (0-ish / negative polynomial / positive polynomial /
identity) costs one comparison round-trip and 2 comparisons per element,
not one per breakpoint. Powers are computed in log-depth batches
(:func:`powers`); public coefficients are then free (local). The variable u in
[-1, 1] keeps coefficients below 1, so fixed-point rounding is not amplified;
u^2 = 4x^2/T^2 - 4|x|/T + 1 is linear in the already computed x^2 (no extra product).
"""

from __future__ import annotations

from typing import Dict, Sequence

import crypten

__all__ = ["powers", "poly", "sign_window", "relu_plus_window"]


def powers(s, degree: int, square=None) -> Dict[int, object]:
    """{k: s^k} for k = 1..degree; round r computes every power in (2^r, 2^(r+1)] at once."""
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


def poly(pw: Dict[int, object], coeffs: Sequence[float]):
    """sum_k coeffs[k] s^k from precomputed powers (public coefficients: no communication)."""
    out = pw[1] * float(coeffs[1])
    for k in range(2, len(coeffs)):
        if coeffs[k] != 0:
            out = out + pw[k] * float(coeffs[k])
    if coeffs[0] != 0:
        out = out + float(coeffs[0])
    return out


def sign_window(x, bound: float):
    """(b, c, x^2) with b = [x < 0], c = [|x| < bound], both from one batched comparison."""
    x2 = x.square()
    bits = crypten.stack([x, x2 - float(bound) ** 2])._ltz()
    return bits[0], bits[1], x2


def relu_plus_window(x, bound: float, pos: Sequence[float], neg: Sequence[float]):
    """relu(x) + [|x| < bound] * (x >= 0 ? pos : neg)(2|x|/bound - 1); coefficients u^0 first."""
    b, c, x2 = sign_window(x, bound)
    bx = b * x
    relu = x - bx
    t = relu - bx  # |x|
    u = t * (2.0 / bound) - 1.0
    degree = max(len(pos), len(neg)) - 1
    pw = powers(u, degree, square=x2 * (4.0 / bound ** 2) - t * (4.0 / bound) + 1.0)
    p = poly(pw, pos)
    if list(pos) == list(neg):
        return relu + c * p
    q = poly(pw, neg)
    # c*p and (c*b)*(q-p) in one batched multiplication round
    cb = c * b
    prods = crypten.stack([c, cb]) * crypten.stack([p, q - p])
    return relu + prods[0] + prods[1]
