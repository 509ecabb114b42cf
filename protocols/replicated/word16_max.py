"""Softmax row max on 16-bit words: the tree of thirds in the ring Z_2^16.

Why: the row max only has to land within a few hundredths of the largest logit (softmax is
shift-invariant; see ``protocols.config`` ``coarse_compare_shift``), and its comparisons
already read 16-bit words after a local shift. Before, every level still re-shared its
selection products as 64-bit ring elements (8 re-shared words per triple, 8 B each); here the
row is narrowed ONCE (each share shifted right by ``s = coarse_compare_shift + 1`` bits
locally and read mod 2^16: ``w = floor(x / 2^s) - k``, ``k`` in {0, 1, 2}, the dropped
carries) and every level's differences, products, re-shares and the comparisons' injected
random bits are 16-bit words (2 B on the wire). Sums and differences mod 2^16 are exact, so
the tree is exact on the words whenever a row's words differ by less than 2^14 (logits within
2^(14 + s - f) = 512 of each other at s = 11, f = 16: the range the coarse comparisons had).

The last level goes back to the 64-bit ring while it compares (:func:`_last_level`): its
three candidates, relative to the row's first entry and offset by 2^14 (so in [0, 2^15)),
are lifted exactly (:func:`lift16_start`, a helper-assisted opening in two rounds that ride
in the comparison's first two rounds) and the selection's products with the lifted
differences are 64-bit ones prepared in the carry tree, so no round follows the tree. The
result ``top = x_0 + (max_w - w_0) 2^s`` differs from the row's true max by less than
3 2^s (3/32 at s = 11): exp's input x - top reaches at most that above zero, where the
optimised exp is as accurate (its 32-bit squarings hold inputs up to about 0.3).
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from crypten.mpc import MPCTensor

from cipherdm_torch.protocols.replicated import arith as ra
from cipherdm_torch.protocols.replicated import binary as rb
from cipherdm_torch.protocols.replicated import compare as rc

__all__ = ["narrow16", "product16", "largest_of_three16", "ternary_tree16", "lift16",
           "row_max"]

Words = Tuple[torch.Tensor, torch.Tensor]  # (share, replica) of a replicated 16-bit sharing
_W16 = torch.int16


def narrow16(x: torch.Tensor, x_next: torch.Tensor, shift: int) -> Words:
    """Replicated 64-bit shares -> replicated 16-bit words of floor(x / 2^shift) - k, k in
    {0, 1, 2} (local; :func:`.binary._narrow`)."""
    return rb._narrow(x, x_next, 16, shift)


def product16(x: Words, y: Words) -> torch.Tensor:
    """This party's re-randomised 3-out-of-3 share of ``x * y`` mod 2^16 (no communication)."""
    return ra.word_product(x[0], x[1], y[0], y[1])


def _words(t: torch.Tensor) -> Words:
    return t, ra.cached_next(t)


def largest_of_three16(a: Words, b: Words, c: Words) -> Words:
    """max(a, b, c) of replicated 16-bit words, replicated, in the rounds of one comparison.

    :func:`cipherdm_torch.protocols.replicated.compare.largest_of_three` on 16-bit words:
    the three signs come masked (``lt_j = c_j + (1 - 2 c_j) rho_j``, ``c_j`` public) and the
    selection ``c + s_a (a - c) + s_b (b - c)`` is a public combination of ``d``, ``rho_j d``
    and ``rho_0 rho_j d``, whose products are re-shared (as 16-bit words) while the carry
    tree runs. The differences are local (the inputs are replicated)."""
    d = torch.stack([a[0] - b[0], a[0] - c[0], b[0] - c[0]])
    dn = torch.stack([a[1] - b[1], a[1] - c[1], b[1] - c[1]])
    d1, d2 = (d[1], dn[1]), (d[2], dn[2])

    def stage1(rho):
        rn = ra.cached_next(rho)
        r = [(rho[k], rn[k]) for k in range(3)]  # injected mod 2^16
        return [product16(r[0], r[1]), product16(r[0], r[2]), product16(r[1], d1),
                product16(r[0], d1), product16(r[2], d2), product16(r[0], d2)]

    def stage2(first):
        return [product16(_words(first[0]), d1), product16(_words(first[1]), d2)]

    cpub, _, (first, second) = rb.msb_masked(d, dn, 16, 0, during=(stage1, stage2),
                                             rho_dtype=_W16)
    _, _, r1d1, r0d1, r2d2, r0d2 = (_words(t) for t in first)
    r01d1, r02d2 = (_words(t) for t in second)
    terms = (d1, r1d1, r0d1, r01d1, d2, r2d2, r0d2, r02d2)
    return rc.ternary_select(c, cpub.to(_W16), [t[0] for t in terms], [t[1] for t in terms])


def _narrow_words(w: Words, dim: int, start: int, length: int) -> Words:
    return tuple(t.narrow(dim, start, length) for t in w)


def _cat_words(parts: List[Words], dim: int) -> Words:
    return tuple(torch.cat([p[k] for p in parts], dim) for k in range(2))


def ternary_tree16(w: Words, dim: int, stop: int = 1) -> Words:
    """Max along ``dim`` (keepdim) of replicated 16-bit words by thirds: ceil(log3 n) levels,
    one comparison's rounds each; a leftover of one entry is carried, of two padded with a
    copy of the last (the max is unchanged; a row of two is padded to three). ``stop``:
    reduce only until at most that many entries are left."""
    cur = w
    while cur[0].size(dim) > stop:
        n = cur[0].size(dim)
        if n % 3 == 2:
            cur = _cat_words([cur, _narrow_words(cur, dim, n - 1, 1)], dim)
            n += 1
        t = n // 3
        best = largest_of_three16(*(_narrow_words(cur, dim, k * t, t) for k in range(3)))
        if n % 3 == 1:
            best = _cat_words([best, _narrow_words(cur, dim, n - 1, 1)], dim)
        cur = best
    return cur


def _last_level(a: Words, b: Words, c: Words, ref: Words) -> Tuple[torch.Tensor, torch.Tensor]:
    """max(a, b, c) - ref + 2^14 as a replicated 64-bit (share, replica), in the rounds of one
    comparison: the three candidates, relative to ``ref`` (each within 2^14 of it), are
    lifted (:func:`lift16_start`) in the comparison's first two rounds, so the selection's
    products with the lifted differences are 64-bit ones prepared in the carry tree's second
    AND round (the rho's injected as 64-bit sharings), and no round follows the opening."""
    d = torch.stack([a[0] - b[0], a[0] - c[0], b[0] - c[0]])
    dn = torch.stack([a[1] - b[1], a[1] - c[1], b[1] - c[1]])
    offset = 1 << 14
    rel = ra.add_public(torch.stack([a[0], b[0], c[0]]) - ref[0],
                        torch.stack([a[1], b[1], c[1]]) - ref[1], offset)  # into share 0
    held = {}
    first = lift16_start(rel)

    def riders(k):  # the lift's two rounds ride in the comparison's rounds 0 and 1
        if k == 0:
            return [(first[0], first[1], lambda: held.__setitem__("second", first[2]()))]
        if k == 1:
            second = held["second"]
            return [(second[0], second[1], lambda: held.__setitem__("lifted", second[2]()))]
        return []

    def product(x, y):  # 3-out-of-3 share of x y (replicated 64-bit x, y)
        return ra.local_product(torch.mul, x, ra.cached_next(x), y, ra.cached_next(y))

    def stage1(rho):
        r = [ra.remember(rho[k].contiguous(), ra.cached_next(rho)[k].contiguous())
             for k in range(3)]
        held["rho"] = r
        return [product(r[0], r[1]), product(r[0], r[2])]

    def stage2(first_products):
        ls, ln = held["lifted"]
        lifted = [ra.remember(ls[k].contiguous(), ln[k].contiguous()) for k in range(3)]
        held["c"] = lifted[2]
        d1 = ra.remember((ls[0] - ls[2]).contiguous(), (ln[0] - ln[2]).contiguous())
        d2 = ra.remember((ls[1] - ls[2]).contiguous(), (ln[1] - ln[2]).contiguous())
        held["d"] = d1, d2
        r = held["rho"]
        r01, r02 = first_products
        return [product(r[1], d1), product(r[0], d1), product(r[2], d2), product(r[0], d2),
                product(r01, d1), product(r02, d2)]

    cpub, _, (_, second) = rb.msb_masked(d, dn, 16, 0, during=(stage1, stage2),
                                         riders=riders)
    r1d1, r0d1, r2d2, r0d2, r01d1, r02d2 = second
    d1, d2 = held["d"]
    terms = (d1, r1d1, r0d1, r01d1, d2, r2d2, r0d2, r02d2)
    c64 = held["c"]
    return rc.ternary_select((c64, ra.cached_next(c64)), cpub.to(torch.long), terms,
                             [ra.cached_next(t) for t in terms])


def lift16(delta: Words) -> Tuple[torch.Tensor, torch.Tensor]:
    """Replicated 64-bit (share, replica) of the integer ``delta`` in [0, 2^15) held as
    replicated 16-bit words: 2 rounds, helper-assisted (the helper h rotates per call like
    the exact truncation's; A = h + 1, B = h + 2).

    h draws ``r = r_a + r_b mod 2^16`` (``r_a`` from the A-h stream, ``r_b`` from B-h) and
    sends A ``delta_h + r`` (masked by ``r_b``) and B ``delta_{h+1} + r`` (masked by ``r_a``)
    with ``(W - w0, M - m0)``, ``W`` the wrap of ``r_a + r_b`` past 2^16 and ``M = msb(r)``
    (masked by ``w0, m0`` from the A-h stream). A and B both learn ``c = delta + r mod
    2^16``, uniform. Since ``delta < 2^15`` the sum wrapped iff ``M = 1`` and ``msb(c) = 0``,
    so ``delta = c - r_a - r_b + 2^16 (W + (1 - msb c) M)`` in the 64-bit ring, linear in
    the shares of W and M: A keeps ``c - r_a + 2^16 (w0 + (1 - msb c) m0)``, B ``-r_b +
    2^16 (W - w0 + (1 - msb c)(M - m0))``, h nothing; round 2 re-shares that pair as the
    truncation does. Messages: h 2 B to A and 18 B to B, then A and B 8 B each."""
    second = rb._one_round(lift16_start(delta))
    return rb._one_round(second)


def lift16_start(delta: Words) -> rb.Step:
    """:func:`lift16` as a one-round step whose finish returns the second round's step (whose
    finish returns the replicated 64-bit pair): to ride in another protocol's rounds."""
    rank, _ = ra._rank_ws()
    helper = ra.helper_rotation.next()
    a, b = (helper + 1) % 3, (helper + 2) % 3
    d, dn = delta
    size, dev = d.shape, d.device
    low = (1 << 16) - 1

    def unsigned(t):
        return t.to(torch.long) & low

    # every draw happens here, at the same program point on each pair of parties, so the
    # steps may ride in another protocol's rounds (whose own draws come between them)
    def reshare(o, partner, t):  # round 2: the A-B pair re-shares its additive result
        mine, other = (o - t).contiguous(), torch.empty(size, dtype=torch.long, device=dev)
        first = rank == a
        return [(mine, partner)], [(other, partner)], \
            lambda: (t, mine + other) if first else (mine + other, t)

    if rank == helper:
        r_a = ra.rand_ring(size, "next", dev) & low
        w0 = ra.rand_ring(size, "next", dev)
        m0 = ra.rand_ring(size, "next", dev)
        r_b = ra.rand_ring(size, "prev", dev) & low
        total = r_a + r_b
        wrap, r = total >> 16, total & low
        msb = r >> 15
        t0, t2 = ra.rand_ring(size, "next", dev), ra.rand_ring(size, "prev", dev)
        to_a = (d.to(torch.long) + r).to(_W16)
        to_b = (dn.to(torch.long) + r).to(_W16)
        corr = torch.stack([wrap - w0, msb - m0])

        def helper_done():  # round 2 is A's and B's; the helper's shares are stream draws
            return [], [], lambda: (t2, t0)

        return [(to_a, a), (to_b, b), (corr, b)], [], helper_done
    got = torch.empty(size, dtype=_W16, device=dev)
    if rank == a:  # holds (delta_{h+1}, delta_{h+2})
        r_a = ra.rand_ring(size, "prev", dev) & low
        w0 = ra.rand_ring(size, "prev", dev)
        m0 = ra.rand_ring(size, "prev", dev)
        t0 = ra.rand_ring(size, "prev", dev)

        def a_done():
            c = unsigned(d + dn + got)
            keep = 1 - (c >> 15)
            return reshare(c - r_a + ((w0 + keep * m0) << 16), b, t0)

        return [], [(got, helper)], a_done
    # B holds (delta_{h+2}, delta_h)
    r_b = ra.rand_ring(size, "next", dev) & low
    t2 = ra.rand_ring(size, "next", dev)
    corr = torch.empty((2,) + tuple(size), dtype=torch.long, device=dev)

    def b_done():
        c = unsigned(d + dn + got)
        keep = 1 - (c >> 15)
        return reshare(-r_b + ((corr[0] + keep * corr[1]) << 16), a, t2)

    return [], [(got, helper), (corr, helper)], b_done


def row_max(x: MPCTensor, dim: int, shift: int, keepdim: bool = True) -> MPCTensor:
    """A value within 3 2^(shift + 1) (encoded units) of the max of ``x`` along ``dim``,
    replicated (replica attached), for rows whose entries differ by less than 2^(15 + shift)
    (512 at shift 10, f = 16): the row narrowed at ``shift + 1`` bits (so the last level's
    candidates lie within 2^14 words of the row's first entry), the tree of thirds on 16-bit
    words (:func:`ternary_tree16`) down to three candidates, and the last level
    (:func:`_last_level`) lifting them back to 64 bits while it compares: the rounds of the
    tree's comparisons only."""
    dim = dim % x.dim()
    xs = x.share
    xn = ra.replicate(xs)
    first = xs.narrow(dim, 0, 1).contiguous(), xn.narrow(dim, 0, 1).contiguous()
    if x.size(dim) == 1:
        top_s, top_n = first
    else:
        s = shift + 1
        w = narrow16(xs, xn, s)
        cur = ternary_tree16(w, dim, stop=3)
        if cur[0].size(dim) == 2:
            cur = _cat_words([cur, _narrow_words(cur, dim, 1, 1)], dim)
        ds, dn = _last_level(*(_narrow_words(cur, dim, k, 1) for k in range(3)),
                             _narrow_words(w, dim, 0, 1))
        # top = x_0 + (max - w_0) 2^s, the lifted value carrying the offset 2^14
        top_s, top_n = ra.add_public(first[0] + (ds << s), first[1] + (dn << s),
                                     -(1 << (14 + s)))
    out = x.shallow_copy()
    out._tensor = x._tensor.shallow_copy()
    out.share = ra.remember(top_s.contiguous(), top_n.contiguous())
    return out if keepdim else out.squeeze(dim)
