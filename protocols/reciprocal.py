"""Reciprocal and inverse square root with an initial guess from the input's magnitude.

CrypTen starts Newton's iteration from a fixed guess, which diverges or stalls
for inputs far from 1 (its reciprocal is wrong above ~100). Here the bucket of x,
2^(k + r/s) <= x < 2^(k + (r+1)/s) with k integer and s = ``rsqrt_steps`` /
``reciprocal_steps``, is found first,
by comparing x with every 2^(j/s) in [2^lo, 2^hi] in ONE batched comparison
(c_j = [x >= 2^(j/s)]); the one-hot d_j = c_j - c_(j+1) (integer scale) then gives the
public-weight sums 2^-k, 2^(-k/2), the guess's intercept a_r and its slope terms b_r 2^-k
locally: no multiplication, no truncation, no round. The mantissa m = x 2^-k lies in
[2^(r/s), 2^((r+1)/s)), where the bucket's minimax linear guess (:func:`bucket_guess`) has
relative error 0.035% (1/sqrt x) for s = 8, 0.14% (1/sqrt x) or 0.38% (1/x) for s = 4 (2.2% /
5.9% for s = 1), and one Newton step reaches the fixed-point resolution (two for s = 1;
defaults: rsqrt s = 8 and no step, the guess is the result; reciprocal s = 4 and one step, see
:mod:`.config`). The weights that multiply x
are encoded with :data:`GUESS_BITS` fractional bits (the product's truncation divides by
2^GUESS_BITS instead of 2^16, same cost), so b_r 2^-k keeps its precision up to x ~ 2^24.
Products in sequence: one comparison (8 rounds on the replicated backend, 7 when bounded)
+ 1 + 2 per iteration (1/x) or 2 per iteration + 1 (1/sqrt x).
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

import contextlib
import functools
import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import crypten
import torch
from crypten.encoder import FixedPointEncoder
from crypten.mpc import MPCTensor

from cipherdm_torch.protocols import config, sharewise
from cipherdm_torch.protocols.side_by_side import run_together

__all__ = ["reciprocal", "rsqrt", "batched_mul", "exponent_onehot", "weigh", "reciprocal_scaled",
           "reciprocal_fine", "times_precise"]

GUESS_BITS = 32  # fractional bits of the weights that multiply x (x itself has 16)
GUESS_BITS_MAX = 42  # at most (the guess's product is then about 2^58, below the 2^62 limit)


@functools.lru_cache(maxsize=None)
def linear_guess(power: float, width: float) -> Tuple[float, float, float]:
    """(a, b, err): the minimax *relative* linear fit m^-power ~ a - b m on [1, width], and its
    largest relative error (equal ripple; for power 1 and width 2 it is 24/17 - 8/17 m, 1/17).

    Found numerically: for a slope ratio t = b / a the best a centres (1 - t m) m^power on 1,
    and a ternary search over t minimises the spread (it is unimodal in t)."""
    m = torch.linspace(1.0, width, 4001, dtype=torch.float64)

    def spread(t: float) -> Tuple[float, float]:
        h = (1 - t * m) * m ** power
        top, bottom = h.max().item(), h.min().item()
        return (top - bottom) / (top + bottom), 2 / (top + bottom)

    lo, hi = 0.0, 1.0 / width
    for _ in range(100):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if spread(a)[0] < spread(b)[0]:
            hi = b
        else:
            lo = a
    t = (lo + hi) / 2
    err, scale = spread(t)
    return scale, scale * t, err


def bucket_guess(power: float, steps: int, r: int) -> Tuple[float, float]:
    """(a, b): m^-power ~ a - b m for the mantissa m in bucket r, [2^(r/steps), 2^((r+1)/steps)),
    from the minimax fit on [1, 2^(1/steps)] by scaling (m = c u, c = 2^(r/steps))."""
    a, b, _ = linear_guess(power, 2.0 ** (1.0 / steps))
    c = 2.0 ** (r / steps)
    return a * c ** -power, b * c ** (-power - 1)


def exponent_onehot(x: MPCTensor, lo: int, hi: int, steps: int = 1
                    ) -> Tuple[Optional[MPCTensor], List[Tuple[int, int]]]:
    """(d, ks): integer-scale one-hot d over the buckets ks = [(k, r)] of x: 2^(k + r/steps) <=
    x < 2^(k + (r+1)/steps), k integer, 0 <= r < steps (clamped to [2^lo, 2^hi]).

    One batched comparison of x with every 2^(j/steps) in (2^lo, 2^hi]; the one-hot is a local
    function of the monotone bits c_j = [x >= 2^(j/steps)]. Shape of d: (len(ks),) + x's shape.
    """
    js = list(range(lo * steps + 1, hi * steps + 1))
    buckets = [(j // steps, j % steps) for j in [lo * steps] + js]
    if not js:
        return None, buckets
    # x - 2^(j/steps) for every j as ONE public subtraction from len(js) stacked copies of x
    # (a CrypTen subtraction per threshold cost ~80 ms per call in Python for 160 thresholds);
    # x is prepared for products first (the replicated backend re-shares it once, and the
    # copies inherit that, instead of re-sharing every copy: len(js) times the words)
    sharewise.prepare_for_products([x.share])
    thresholds = torch.tensor([2.0 ** (j / steps) for j in js], dtype=torch.float64)
    shifted = crypten.stack([x] * len(js)) - thresholds.reshape((-1,) + (1,) * x.dim())
    # with a range below 2^(30-f) (e.g. the calibrated GroupNorm variances) the comparisons are
    # bounded: read mod 2^32 on the rss backend, exact for x < 2^(31-f) (beyond the range the
    # guess saturates as before, up to 2^(31-f) = 32768 at f = 16; above that it is garbage)
    bounded = 2.0 ** (hi + 1) <= 2.0 ** 31 / x.encoder.scale
    with config.bounded_comparisons() if bounded else contextlib.nullcontext():
        c = 1 - shifted._ltz()  # c_j, scale 1
    # one-hot of the bucket: d_lo = 1 - c_(first), d_j = c_j - c_(j+1), d_hi = c_last
    return crypten.cat([1 - c[:1], c[:-1] - c[1:], c[-1:]]), buckets


def weigh(d: Optional[MPCTensor], ks: Sequence, weight: Callable[[Any], float],
          like: MPCTensor, bits: Optional[int] = None) -> MPCTensor:
    """sum_k d_k * weight(k) over the buckets ks as a fixed-point secret with ``bits``
    fractional bits (default: the encoder's): local (no truncation, no round).

    Each weight is encoded as an integer on its own and only one d_k is 1, so the
    result carries a single weight's rounding error (exact for powers of two >= 2^-bits).
    """
    enc = FixedPointEncoder(precision_bits=bits)
    if d is None:  # a single possible bucket: a public constant (as a secret of x's shape)
        out = like * 0
        out.encoder = enc
        return out + float(weight(ks[0]))
    w = torch.tensor([int(round(weight(k) * enc.scale)) for k in ks], dtype=torch.long)
    out = (d * w.reshape((len(ks),) + (1,) * (d.dim() - 1))).sum(0)
    out.encoder = enc
    return out


def times_precise(weights: MPCTensor, x: MPCTensor) -> MPCTensor:
    """weights * x for weights with more fractional bits than x: ONE product, whose truncation
    divides by the weights' scale, so the result has x's scale (CrypTen labels a product with
    its left factor's encoder, hence the relabelling)."""
    out = weights * x
    out.encoder = x.encoder
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
    r, m, p = _reciprocal_guess(x, lo, hi, p_bits=None)
    for _ in range(iters):
        r = r * (2 - m * r)
    return r, p


def _reciprocal_guess(x: MPCTensor, lo: int, hi: int, p_bits: Optional[int] = GUESS_BITS):
    """(r, m, p): the bucket's linear guess r of 1 / m for the mantissa m = x p in [1, 2),
    m, and p = 2^-k with ``p_bits`` fractional bits (None: x's). The mantissa and the slope
    term x (B p) are one batched product (one round)."""
    steps = config.current().reciprocal_steps
    d, ks = exponent_onehot(x, lo, hi, steps)
    p = weigh(d, ks, lambda kr: 2.0 ** -kr[0], x, bits=p_bits)
    p_fine = p if p_bits == GUESS_BITS else weigh(d, ks, lambda kr: 2.0 ** -kr[0], x,
                                                 bits=GUESS_BITS)
    pb = weigh(d, ks, lambda kr: bucket_guess(1.0, steps, kr[1])[1] * 2.0 ** -kr[0], x,
               bits=GUESS_BITS)
    if steps == 1:  # one bucket per octave: the intercept is a public constant
        m, mb = times_precise(crypten.stack([p_fine, pb]), x)
        a = bucket_guess(1.0, 1, 0)[0]
    else:  # the bucket's intercept rides along (times 1), so it leaves the product replicated
        a = weigh(d, ks, lambda kr: bucket_guess(1.0, steps, kr[1])[0], x, bits=GUESS_BITS)
        m, mb, a = times_precise(crypten.stack([p_fine, pb, a]),
                                  crypten.stack([x, x, x * 0 + 1]))
    return a - mb, m, p


def _times_fine(x: MPCTensor, fine: MPCTensor) -> MPCTensor:
    """x * fine, kept at ``fine``'s precision: CrypTen's product truncates by its LEFT factor's
    scale and labels it with that factor's encoder, so x goes left and the label is fixed."""
    out = x * fine
    out.encoder = fine.encoder
    return out


def reciprocal_fine(x: MPCTensor, lo: Optional[int] = None, hi: Optional[int] = None,
                    iters: Optional[int] = None) -> MPCTensor:
    """1 / x for x > 0 in [2^lo, 2^hi], with :data:`GUESS_BITS` fractional bits (so 1/x keeps
    its significant bits for large x, like :func:`reciprocal_scaled`'s two factors r p).

    Why: applying r and p = 2^-k one after the other (``(e * r) * p``) puts two products in
    sequence after the reciprocal. Here the last Newton step's product absorbs p: ``m r`` and
    ``r p`` are taken side by side, then ``q = (r p)(2 - m r)``; the caller's ``e * q`` is
    then ONE product. Same products in all, one product (two rounds) shallower. With no
    Newton step, ``q = r p``."""
    lo, hi = _range(lo, hi)
    iters = config.current().reciprocal_iters if iters is None else iters
    r, m, p_fine = _reciprocal_guess(x, lo, hi)
    for _ in range(iters - 1):
        r = r * (2 - m * r)
    if iters == 0:
        return _times_fine(r, p_fine)
    mr, rp = run_together(lambda: m * r, lambda: _times_fine(r, p_fine))
    return _times_fine(2 - mr, rp)


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
          times: Optional[MPCTensor] = None, count: int = 1) -> MPCTensor:
    """1 / sqrt(x / count) for x / count > 0 in [2^lo, 2^hi]; ``times * (1 / sqrt(x / count))``
    when ``times`` (a secret of a shape ``x`` broadcasts to, e.g. the centred activations of a
    norm) is given.

    ``count``: a public positive integer n that x is a multiple of (a norm passes the SUM of
    squares, n var, instead of their mean: the division by n is a truncation, two rounds).
    1 / sqrt(x / n) = sqrt(n) / sqrt(x): the buckets cover [2^lo n, 2^hi n], sqrt(n) rides in
    the one-hot weights of 2^(-k/2) (local), and the guess's weights get log2(n) more
    fractional bits (up to :data:`GUESS_BITS_MAX`), so its precision is that of x / n's.

    With ``times``, its product with the power-of-two part q = 2^(-k/2) rides in the first
    Newton step's batched product, and only the final product by the Newton iterate y remains:
    one product (two rounds) fewer than ``times * rsqrt(x)``.

    Newton's step y (3 - m y^2) / 2 is run as 1.5 y - (h y) y^2 with h = m / 2 taken
    from the one-hot weights (no extra truncation for the halving): h y and y^2 are one
    batched product, so two products (truncations) deep per iteration; h and the slope
    term of the guess are one batched product.
    """
    lo, hi = _range(lo, hi)
    steps, iters = config.current().rsqrt_steps, config.current().rsqrt_iters
    if count < 1 or int(count) != count:
        raise ValueError(f"rsqrt: count must be a positive integer, got {count!r}")
    shift = math.log2(count)
    lo, hi = lo + math.floor(shift), hi + math.ceil(shift)
    gain = math.sqrt(count)
    # the guess's weights (pd x and c 1 are one product, whose raw value is about 2^(bits + f))
    # with log2(count) more fractional bits where only the no-Newton guess uses them
    bits = min(GUESS_BITS + math.ceil(shift), GUESS_BITS_MAX) if iters == 0 and times is not None \
        else GUESS_BITS
    d, ks = exponent_onehot(x, lo, hi, steps)
    pd = weigh(d, ks, lambda kr: bucket_guess(0.5, steps, kr[1])[1] * 2.0 ** -kr[0], x,
               bits=bits)
    c = weigh(d, ks, lambda kr: bucket_guess(0.5, steps, kr[1])[0], x, bits=bits)
    q = weigh(d, ks, lambda kr: gain * 2.0 ** (-kr[0] / 2), x, bits=GUESS_BITS)
    one = x * 0 + 1
    if iters == 0 and times is not None:
        return _times_guess(pd, c, q, one, x, times)
    ph = weigh(d, ks, lambda kr: 2.0 ** -(kr[0] + 1), x, bits=GUESS_BITS)
    # the bucket's intercept c and q ride along (times 1): the product's outputs carry the
    # replicated backend's replica (for q, kept by its expansion to the shape of ``times``), so
    # no later product re-shares them
    h, md, c, q = times_precise(crypten.stack([ph, pd, c, q]), crypten.stack([x, x, one, one]))
    y = c - md
    scaled = None
    for i in range(iters):
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


def _times_guess(pd, c, q, one, x, times):
    """times * q * (c - pd x) with no Newton step (``rsqrt_iters = 0``): the bucket's linear
    guess is the result. q = 2^(-k/2) and the intercept c are one-hot weights like pd. The
    product times * q (q broadcast: re-shared at its own small size) runs beside the batched
    pd * x and c * 1 (:func:`.side_by_side.run_together`: one shared set of rounds; all
    truncations divide by the weights' 2^GUESS_BITS), then one product by the guess: two
    products after the comparison instead of four with a Newton step. Relative error: the
    guess's (0.035% with 8 buckets per octave, 0.14% with 4)."""
    tq, (md, c) = run_together(lambda: times_precise(q, times),
                               lambda: times_precise(crypten.stack([pd, c]),
                                                      crypten.stack([x, one])))
    return tq * (c - md)


rsqrt.accepts_times = True  # normalization passes the centred activations as ``times``
rsqrt.accepts_count = True  # ... and the sum of squares with its count (no division by n)
