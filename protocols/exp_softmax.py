"""exp for x <= 0 and SoftMax along a dimension.

exp: exp(x) = b(x / 2^n)^(2^n) with the degree-2 Taylor base
b(z) = 1 + z + z^2/2 (one square) and n squarings. For z in [-2, 0]
b(z) = ((1 + z)^2 + 1) / 2 lies in [1/2, 1], so the result stays in [0, 1] and
decays for every x in [-2^(n+1), 0]; its absolute error is below
0.23 / 4^n (n = 6: 6e-5, against CrypTen's 1e-3 with 8 squarings). Inputs
below -exp_clip are set to exactly 0 by one comparison (knob
``exp_clip_compare``, on by default: without it, inputs below -2^(n+1) grow), which runs
beside the squarings (:func:`.side_by_side.run_together`: their rounds are shared). When a
calibrated lower bound of the inputs is known (knob ``exp_input_min``, e.g. the recorded
softmax range -9.95 with margin) and lies above -1.75 * 2^n (:func:`exp_safe_bound`), the
comparison is skipped: there the unclipped result is already within 6e-5 of exp(x).
On the rss backend the squarings after the first two run on 32-bit words at 15 fractional
bits (:func:`_squarings_on_words`, :mod:`.replicated.word32_square`): 28 instead of 52 B per
element each, the same rounds and error.
The first square is taken untruncated (one truncation for the division by 2^n and the
square) only where truncation is exact (:func:`.config.truncation_is_exact`): its raw value is about
2^(2n + 2f) = 2^44, and CrypTen's own protocols (``replicated``: ABY3's two-share method;
``beaver``: local division with a wrap count) are wrong by ~2^64 / d with probability
~|x| / 2^64 per element (1e-6 at 2^44, measured on ``replicated``: one garbage entry per ~120
softmaxes of 2 x 4096). There the plain order (x / 2^n first, values <= 1) keeps that
probability near 2^-32.

softmax: row max by a tree of thirds (default ``softmax_max_method="tree3"``: ceil(log3 n)
levels of one batched comparison each, about 1.5 n comparisons per row; ``"tree"``: by halves,
n - 1 comparisons, ceil(log2 n) levels; no argmax one-hot as in CrypTen), exp of x - max, then the row sum s in
[1, n] is inverted by the magnitude-guided reciprocal on [2^0, 2^ceil(log2 n)]
(log2 n comparisons per ROW) with 32 fractional bits (:func:`.reciprocal.reciprocal_fine`),
so that rows of thousands of entries keep their precision, and applied in one product. On the
rss backend the row max's whole tree runs on 16-bit words
(:mod:`.replicated.word16_max`, within 3/32 of the max).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import crypten
from crypten.encoder import FixedPointEncoder
from crypten.mpc import MPCTensor

from cipherdm_torch.protocols import config, sharewise
from cipherdm_torch.protocols.max_tree import larger_by_sign, ternary_max, tree_max
from cipherdm_torch.protocols.reciprocal import times_precise, reciprocal_fine
from cipherdm_torch.protocols.side_by_side import run_together

__all__ = ["exp", "exp_safe_bound", "softmax", "softmax_matmul", "row_max", "reference_exp",
           "reference_softmax"]

def _clip_bound(cfg) -> float:
    # never clip above the range where the base stays in [1/2, 1]
    return min(float(cfg.exp_clip), 2.0 ** (cfg.exp_squarings + 1))


def exp_safe_bound(n: int) -> float:
    """|x| up to which the unclipped exp approximation (n squarings) stays within 6e-5 of exp:
    the base b(x / 2^n) is at most b(-1.75) = 0.78 below -2^n, and 0.78^(2^n) <= 1.4e-7."""
    return 1.75 * 2.0 ** n


def _needs_clip(cfg) -> bool:
    """The clip comparison runs unless a calibrated input range makes it useless."""
    if not cfg.exp_clip_compare:
        return False
    return cfg.exp_input_min is None or cfg.exp_input_min < -exp_safe_bound(cfg.exp_squarings)


def exp(x: MPCTensor) -> MPCTensor:
    """exp(x) for x <= 0 (positive inputs are not supported: the result would grow; on the
    rss backend, whose squarings run on 32-bit words, inputs above about 0.3 come out as
    garbage, while the softmax's inputs stay below 3/32)."""
    cfg = config.current()
    n = cfg.exp_squarings

    def clip():
        return 1 - (x + _clip_bound(cfg))._ltz()  # [x >= -bound], integer scale

    if n < 1 or x.encoder.scale <= 1 or not config.truncation_is_exact():
        return _exp_plain_order(x, n, clip() if _needs_clip(cfg) else None)

    def chain():
        # b(z) = ((1 + z)^2 + 1) / 2 with 1 + z = (x + 2^n) / 2^n: the division by 2^n and the
        # square are ONE truncation of the untruncated square of u = x + 2^n, and the halving
        # rides in the first squaring's truncation: two truncated products for b(z)^2 instead
        # of four (z, z^2, z^2 / 2, the first squaring)
        u = x + 2.0 ** n
        v = _square_div(u, 2 ** (2 * n)) + 1  # (1 + z)^2 + 1 = 2 b(z)
        if n >= 3 and crypten.cfg.mpc.protocol == "rss":
            return _squarings_on_words(v, n - 1)
        y = _square_div(v, 4)  # b(z)^2
        for _ in range(n - 1):
            y = y.square()
        return y

    if not _needs_clip(cfg):
        return chain()
    # the clip comparison does not depend on the squarings: side by side, rounds merged
    keep, y = run_together(clip, chain)
    return y * keep


def _square_div(t: MPCTensor, d: int) -> MPCTensor:
    """t^2 / d with one truncation: the secret square taken untruncated (one factor read at
    integer scale), then divided by the public integer 2^f d."""
    raw = t.shallow_copy()
    raw._tensor = t._tensor.shallow_copy()  # same shares (and cached replicas), scale 1
    raw._tensor.encoder = FixedPointEncoder(precision_bits=0)
    out = t * raw  # values t^2 2^(2f) under t's encoder
    out._tensor.div_(int(t.encoder.scale) * int(d))
    return out


def _squarings_on_words(v: MPCTensor, k: int) -> MPCTensor:
    """(v / 2)^(2^(k + 1)) for v = 2 b(z) in [1, 5] on the rss backend: b(z)^2 comes out at 15
    fractional bits (raw < 2^31 squared for b(z)^2 < 1.35, i.e. x < 0.3), the next k - 1
    squares run on 32-bit words (:mod:`.replicated.word32_square`: 28 instead of 52 B per
    element each) and the last lands in the 64-bit ring at f bits. Each square truncates
    once, as before, so the rounds are the same; the 15-bit steps add at most 2^-15 each (the
    64-bit chain 2^-16), amplified by the squarings after them."""
    from cipherdm_torch.protocols.replicated import arith as ra, word32_square as w32  # plug-in

    f = int(round(math.log2(v.encoder.scale)))
    y = _square_div(v, 8)  # b(z)^2 at f - 1 fractional bits (raw read at f: half of it)
    words = w32.to_words32(y.share)
    for _ in range(k - 1):
        words = w32.square_truncate32(words, f - 1)
    share, nxt = w32.square_truncate32(words, f - 2, out64=True)  # 2(f - 1) - (f - 2) = f
    out = y.shallow_copy()
    out._tensor = y._tensor.shallow_copy()
    out.share = ra.remember(share, nxt)
    return out


def _exp_plain_order(x, n, keep):
    z = x * (1.0 / 2 ** n)
    y = 1 + z + z.square() * 0.5
    for _ in range(n):
        y = y.square()
    return y if keep is None else y * keep


def row_max(x: MPCTensor, dim: int) -> MPCTensor:
    """Max along ``dim`` (keepdim) by a pairwise tree: max(a, b) = b + [a >= b](a - b)."""
    return tree_max(x, dim, keepdim=True, combine=larger_by_sign)


def _exp_rows(x: MPCTensor, dim: int):
    """(e, s, hi): e = exp(x - rowmax) (clipped), its row sums s in [1, n] and the log2 bound
    of s for the reciprocal."""
    cfg = config.current()
    n = x.size(dim)
    # the row max compares differences of logits: on the rss backend coarsely
    # (config.coarse_comparisons: 16-bit signs after a local shift s, exact while logits
    # differ by less than 2^(15+s-f) = 512; each level may keep an entry up to 2^(s+1-f) =
    # 1/32 below the larger one, and softmax is shift-invariant: exp's input then reaches
    # at most ~0.2 above zero, where it is as accurate). exp's clip [x - max + bound >= 0]
    # is coarse too: its zone only clips inputs within 1/32 above -bound (exp(-32) ~ 1e-14
    # is 0 at 16 fractional bits), and its range holds whenever the max's does (logits that
    # differ by less than 512 - bound)
    with config.coarse_comparisons():
        if cfg.softmax_max_method == "crypten":
            top = x.max(dim, keepdim=True)[0]
        elif cfg.softmax_max_method == "tree3":
            top = ternary_max(x, dim, keepdim=True)
        else:
            top = row_max(x, dim)
        # the row max prepared at its own size (one entry per row; on the replicated backend
        # the ternary max comes out replicated already): x - top and both of exp's branches
        # inherit that, instead of each branch re-sharing its own copy of the whole x - top
        sharewise.prepare_for_products([top.share])
        e = exp(x - top)
    s = e.sum(dim, keepdim=True)
    return e, s, max(1, math.ceil(math.log2(n)) + 1)


def softmax(x: MPCTensor, dim: int) -> MPCTensor:
    dim = dim % x.dim()
    e, s, hi = _exp_rows(x, dim)
    # e (a product by the clip bit) is prepared for e * q while the reciprocal runs: its one
    # round rides in the reciprocal's first round instead of following it. q = 1/s carries
    # 32 fractional bits (reciprocal_fine: the power of two rides in the Newton step's last
    # product), so e * q is ONE product (two before stop 19: (e * r) * 2^-k)
    q, _ = run_together(lambda: reciprocal_fine(s, lo=0, hi=hi),  # s in [1, n]
                        lambda: sharewise.prepare_for_products([e.share]))
    return times_precise(q, e)


def softmax_matmul(x: MPCTensor, v: MPCTensor) -> MPCTensor:
    """softmax(x, -1) @ v (attention) with the normalisation AFTER the product:
    (e @ v) * (1 / s). Why: the product e @ v does not need 1 / s, so it runs beside the
    reciprocal (its rounds hidden), and the per-element truncation of e * (1 / s) over the
    whole n x n map becomes one over the n x d output (d the head size): a truncated element
    per logit fewer, two rounds fewer per call. Range: (e @ v) / s is a weighted mean of v's
    rows, so the final product's raw value stays below max |v| 2^48: exact for |v| < 2^13
    (the exact truncation's 2^62), like e @ v itself (n max|v| 2^(2f) for n up to 2^17); so
    only where truncation is exact (:func:`.config.truncation_is_exact`): CrypTen's own
    truncations fail with probability ~|raw| / 2^64, and there the product keeps its order."""
    if not isinstance(v, MPCTensor) or not config.truncation_is_exact():
        return softmax(x, -1).matmul(v)
    dim = x.dim() - 1
    e, s, hi = _exp_rows(x, dim)
    q, ev = run_together(lambda: reciprocal_fine(s, lo=0, hi=hi), lambda: e.matmul(v))
    return times_precise(q, ev)


# ---------------------------------------------------------------- plaintext twins

def reference_exp(x: torch.Tensor, settings: Optional[config.Settings] = None) -> torch.Tensor:
    """Plaintext value of the optimised exp under ``settings`` (default: current)."""
    cfg = settings or config.current()
    n = cfg.exp_squarings
    z = x.double() / 2 ** n
    y = (1 + z + z * z / 2) ** (2 ** n)
    if _needs_clip(cfg):
        y = y * (x >= -_clip_bound(cfg))
    return y.to(x.dtype)


def reference_softmax(x: torch.Tensor, dim: int,
                      settings: Optional[config.Settings] = None) -> torch.Tensor:
    e = reference_exp(x - x.max(dim, keepdim=True)[0], settings)
    return e / e.sum(dim, keepdim=True)
