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

Why it is shallow (rounds): :func:`relu_plus_window` does not wait for the sign to form
|x|. It evaluates the positive side's polynomial at u+ = 2x/T - 1 and the negative side's at
u- = -2x/T - 1 (:func:`both_sides`; one of them is u) beside the comparison
(:func:`.side_by_side.run_together`, which merges their rounds), then selects with the
bits: relu(x) + c * (P+ + b * (P- - P+)). SiLU: 17 -> 12 rounds per call, for twice the
polynomial's products; since stop 19 the two sides share their powers (u- = -u+ - 2, so u-^2 and
u-^3 are local from u+'s, :func:`_sextic_shared`): 5 truncated elements per input instead of 8
(SiLU 255 -> 195 B per element at P0). With the bits [x < 0], [x < T], [x < -T] of the rss backend the
selection is x [x >= 0] + P+ [0 <= x < T] + P- [-T <= x < 0], selectors linear in the bits:
one round of bit-by-value products instead of two (SiLU 10 -> 9 rounds per call); since the
comparison hands its bits out replicated (stop 18) that round is local: a fresh input costs 8
rounds (the comparison's), the polynomial's rounds beside them.

Why it is robust: x^2 is never truncated (:func:`square_untruncated`), so the
window bit is exact for |x| < 46341 and everything computed for |x| >= T, even
if garbage, is multiplied by c = 0. On the rss backend the bits are [x < 0], [x < T] and
[x < -T] read mod 2^32 (``protocols.config`` ``bounded_compare_bits``): one round less per
call, exact for |x| < 32768 - T.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch

import crypten
from crypten.encoder import FixedPointEncoder
from crypten.mpc import MPCTensor

from cipherdm_torch.protocols import config, sharewise
from cipherdm_torch.protocols.side_by_side import run_together

__all__ = ["powers", "fixed_point_combination", "square_untruncated", "product_untruncated",
           "sign_window", "both_sides", "relu_plus_window"]


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


def sign_window(x: MPCTensor, bound: float, square: Optional[MPCTensor] = None
                ) -> Tuple[MPCTensor, ...]:
    """(b, c, s) with b = [x < 0], c = [|x| < bound] from one batched comparison, s = x^2 2^f.

    The window compares the untruncated square (:func:`square_untruncated`), so both
    bits are exact for every |x| < 46341, however far outside the window. On the rss backend
    the comparisons are bounded (:func:`_narrow_comparisons`): [x < 0], [x < T] and [x < -T]
    mod 2^32, exact for |x| < 32768 - T, and the result is (b, c, s, [x < T], [x < -T]).
    ``square``: s when the caller has it already.
    """
    s = square_untruncated(x) if square is None else square
    if _narrow_comparisons():  # three comparisons mod 2^32: one round less, fewer bytes
        with config.bounded_comparisons():
            bits = crypten.stack([x, x - float(bound), x + float(bound)])._ltz()
        return bits[0], bits[1] - bits[2], s, bits[1], bits[2]
    scale = float(FixedPointEncoder().scale)
    bits = crypten.stack([x, s - float(bound) ** 2 * scale])._ltz()
    return bits[0], bits[1], s


def _narrow_comparisons() -> bool:
    """Whether the active backend reads bounded comparisons mod 2^32 (the rss backend, unless
    ``bounded_compare_bits`` is 64): then the window is [x < T] - [x < -T], exact for
    |x| < 2^(31-f) - T (32760 for SiLU at f = 16), instead of the square's comparison."""
    return crypten.cfg.mpc.protocol == "rss" and config.current().bounded_compare_bits < 64


def both_sides(x: MPCTensor, s: MPCTensor, bound: float, pos: Sequence[float],
               neg: Sequence[float]) -> Tuple[MPCTensor, MPCTensor]:
    """(pos(u+), neg(u-)) with u+ = 2x/T - 1 and u- = -2x/T - 1: the window polynomial of
    either sign, computed without knowing the sign of x (so beside the comparison that finds
    it). For x >= 0, u+ = 2|x|/T - 1; for x < 0, u- is. The other side's value is finite
    garbage (|u| <= 3 in the window) that the exact sign bit multiplies by 0.

    ``s`` is x^2 2^f (:func:`square_untruncated`). With an integer T, u+ and u+^2 come from ONE
    truncation of integer combinations of x and s; u- = -u+ - 2 and u-^2 = u+^2 + 4 u+ + 4 are
    local."""
    scale = int(FixedPointEncoder().scale)
    if float(bound).is_integer():
        tb = int(bound)
        raw = crypten.stack([x * (2 * tb * scale), s * 4 - x * (4 * tb * scale)])
        raw = raw.div(tb * tb * scale)
        up, up2 = raw[0] - 1.0, raw[1] + 1.0
        # u- = -u+ - 2, so u-^2 = u+^2 + 4 u+ + 4: local
        u, u2 = crypten.stack([up, -up - 2.0]), crypten.stack([up2, up2 + up * 4 + 4.0])
    else:
        up = x * (2.0 / bound) - 1.0
        u, u2 = crypten.stack([up, -up - 2.0]), None
    degree = max(len(pos), len(neg)) - 1
    pos = list(pos) + [0.0] * (degree + 1 - len(pos))
    neg = list(neg) + [0.0] * (degree + 1 - len(neg))
    if degree == 0:
        return x * 0 + pos[0], x * 0 + neg[0]
    if u2 is not None and degree <= 6 and config.truncation_is_exact():
        return _sextic_shared(up, up2, [pos + [0.0] * (6 - degree), neg + [0.0] * (6 - degree)])
    if u2 is not None and degree <= 5:
        p = _sextic(u, u2, [pos + [0.0] * (6 - degree), neg + [0.0] * (6 - degree)])
        return p[0], p[1]
    pw = powers(u, degree, square=u2)
    # sum_k w[k, side] u_side^k, side 0 with pos's weights and side 1 with neg's: one truncation
    stacked = crypten.stack([pw[k] for k in range(1, degree + 1)])  # (degree, 2, *x.shape)
    w = torch.tensor([[int(round(pos[k] * scale)), int(round(neg[k] * scale))]
                      for k in range(1, degree + 1)], dtype=torch.long)
    out = stacked[0].clone()
    out.share = (stacked.share * w.reshape(degree, 2, *([1] * x.dim()))).sum(0)
    out = out.div(scale)
    return out[0] + pos[0], out[1] + neg[0]


def product_untruncated(a: MPCTensor, b: MPCTensor) -> MPCTensor:
    """a * b * 2^f as a fixed-point secret (the ring product, not truncated): to be summed with
    other values at the doubled scale and truncated once."""
    ai = a.clone()
    ai.encoder = FixedPointEncoder(precision_bits=0)  # integer scale: CrypTen skips truncation
    out = ai * b
    out.encoder = FixedPointEncoder()
    return out


def _sextic(u: MPCTensor, u2: MPCTensor, coeffs: Sequence[Sequence[float]]) -> MPCTensor:
    """sum_k a[side][k] u^k (k <= 6) for u stacked by side (dim 0), given u and u^2, in two
    truncations: [u^3, L2 = a3 + a4 u + a5 u^2 + a6 u^3] in one, then L1 + u^3 L2 with
    L1 = a0 + a1 u + a2 u^2 in the other (the linear terms ride at the product's scale).
    Powers of u would take three (u^3 and u^4, then u^5 and u^6, then the combination).

    With a6 != 0 every term of the first truncation is at scale 2^(3f) and divided by 2^(2f):
    u^3 is the untruncated product u u^2 (2^(2f)) times 2^f, a6 u^3 that product times a6's
    integer weight, a4 u and a5 u^2 their weights times 2^f (|u| <= 3: at most ~2^53, below the
    exact truncation's 2^62; the caller uses this only on the replicated backend's exact
    truncation). With a6 = 0 the terms stay at 2^(2f)."""
    scale = int(FixedPointEncoder().scale)
    lead = (len(coeffs),) + (1,) * (u.dim() - 1)

    def weight(k):  # integer weights at the encoder's scale, one per side
        return torch.tensor([int(round(c[k] * scale)) for c in coeffs], dtype=torch.long
                            ).reshape(lead)

    def const(k):
        return torch.tensor([float(c[k]) for c in coeffs], dtype=torch.float64).reshape(lead)

    # a6 = 0 (degree <= 5: SiLU, GELU): everything stays at 2^(2f), values ~2^37 like any
    # product; only a sixth-degree term lifts the first truncation to 2^(3f) (see the caller)
    lift = scale if any(c[6] for c in coeffs) else 1
    u3 = product_untruncated(u, u2)  # u^3 at 2^(2f)
    l2 = u3.clone()
    l2.share = (u.share * weight(4) + u2.share * weight(5)) * lift
    if lift > 1:
        l2.share = l2.share + u3.share * weight(6)
    u3.share = u3.share * lift
    both = crypten.stack([u3, l2]).div(scale * lift)
    u3, l2 = both[0], both[1] + const(3)
    out = product_untruncated(u3, l2)
    out.share = out.share + u.share * weight(1) + u2.share * weight(2)
    return out.div(scale) + const(0)


def _sextic_shared(up: MPCTensor, up2: MPCTensor, coeffs: Sequence[Sequence[float]]
                   ) -> Tuple[MPCTensor, MPCTensor]:
    """(sum_k a[0][k] u+^k, sum_k a[1][k] u-^k) for k <= 6, u- = -u+ - 2, given u+ and u+^2,
    in two truncations of 1 + 2 elements (:func:`_sextic` on both sides takes 4 + 2).

    Why: the sides share their powers. u+^3 is one truncated product, and u-^2 = u+^2 + 4 u+
    + 4, u-^3 = -(u+^3 + 6 u+^2 + 12 u+ + 8) are local (integer coefficients). Each side is
    L1(u) + u^3 L2(u) with L1 = a0 + a1 u + a2 u^2 and L2 = a3 + a4 u + a5 u^2 + a6 u^3; L2 is
    kept UNtruncated at 2^(2f) (integer weights times shares at 2^f: no truncation, so it is
    not a truncated element at all), u^3 L2 is one ring product at 2^(3f), L1 is lifted to it,
    and one truncation by 2^(2f) per side finishes. In the window |u| <= 3 (the wrong side's
    u- reaches -3), so the raw values stay below about 2^58 (2^55 for SiLU's coefficients),
    inside the exact truncation's 2^62: only where truncation is exact
    (:func:`.config.truncation_is_exact`). Outside the window they may be garbage, which the
    exact window bit multiplies by 0."""
    scale = int(FixedPointEncoder().scale)
    lead = (len(coeffs),) + (1,) * up.dim()

    def weight(k):  # integer weights at the encoder's scale, one per side
        return torch.tensor([int(round(c[k] * scale)) for c in coeffs], dtype=torch.long
                            ).reshape(lead)

    def const(k):
        return torch.tensor([float(c[k]) for c in coeffs], dtype=torch.float64).reshape(lead)

    up3 = product_untruncated(up, up2).div(scale)  # the one truncated element per input
    u = crypten.stack([up, -up - 2.0])
    u2 = crypten.stack([up2, up2 + up * 4 + 4.0])
    u3 = crypten.stack([up3, -(up3 + up2 * 6 + up * 12 + 8.0)])
    fine = FixedPointEncoder(precision_bits=2 * round(math.log2(scale)))
    l2 = u3.clone()  # a3 + a4 u + a5 u^2 + a6 u^3 at 2^(2f): integer weights, no truncation

    def combine(t):  # share-wise: reported, so a backend's per-share state follows it
        return t[0] * weight(4) + t[1] * weight(5) + t[2] * weight(6)

    sources = [u.share, u2.share, u3.share]
    l2.share = combine(sources)
    sharewise.notify_local_op(sources, l2.share, combine)
    l2.encoder = fine
    l2 = l2 + const(3)
    whole = u3.clone()
    whole.encoder = FixedPointEncoder(precision_bits=0)  # integer scale: no truncation
    out = whole * l2  # u^3 L2 at 2^(3f), labelled 2^(2f)
    out.share = out.share + (u.share * weight(1) + u2.share * weight(2)) * scale
    out = out.div(scale * scale)  # one truncation of both sides' elements
    out.encoder = FixedPointEncoder()
    out = out + const(0)
    return out[0], out[1]


def relu_plus_window(x: MPCTensor, bound: float, pos: Sequence[float],
                     neg: Sequence[float]) -> MPCTensor:
    """relu(x) + [|x| < bound] * (x >= 0 ? pos : neg)(2|x|/bound - 1); coefficients u^0 first.

    The sign / window comparison and both sides' polynomials (:func:`both_sides`) do not
    depend on each other: they run side by side (:func:`.side_by_side.run_together`),
    so the polynomial's rounds hide behind the comparison's; then one round selects the side
    (b * [x, neg - pos]) and one applies the window bit. On the rss backend's three bounded
    comparisons the selectors are linear in the bits, and ONE round of bit-by-value products
    does both.

    Outside the window every intermediate may be garbage (huge u); it is multiplied
    by the exact bit c = 0, so the result there is exactly relu(x).
    """
    s = square_untruncated(x)
    bits, (p, q) = run_together(lambda: sign_window(x, bound, square=s),
                                lambda: both_sides(x, s, bound, pos, neg))
    if _narrow_comparisons():  # sign_window gave [x < 0], c, s, [x < T], [x < -T]
        # with [x < 0], [x < T] and [x < -T] every selector is LINEAR in the bits (x < -T
        # implies x < 0 implies x < T): f = x [x >= 0] + p [0 <= x < T] + q [-T <= x < 0], the
        # three bit-by-value products in ONE round instead of two in sequence
        b, _, _, below_t, below_minus_t = bits
        sel = crypten.stack([1 - b, below_t - b, b - below_minus_t])
        return (sel * crypten.stack([x, p, q])).sum(0)
    b, c, _ = bits
    bx, bd = b * crypten.stack([x, q - p])  # b broadcast: re-shared once
    return (x - bx) + c * (p + bd)
