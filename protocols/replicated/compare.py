"""Comparisons on replicated shares: sign bit, x < c, ReLU, selection, max along a dimension.

All functions take and return CrypTen ``MPCTensor`` objects (arithmetic ptype) and
run on the dealer-free replicated protocols of :mod:`.arith` / :mod:`.binary`
whatever ``crypten.cfg.mpc.protocol`` says, so they can also be called directly.

Range: the sign bit is exact for every encoded value, i.e. for reals in
``[-2^47, 2^47)`` with CrypTen's 16 fractional bits (``x < c`` and ``max`` compute a
difference, which must stay in that range). Cost per element of ``ltz``
(bytes sent by P0; P1 and P2 send less): re-share of x if not cached 8 + generate /
propagate start 16 (P1, P2: 8) with a random bit's injection 16 (P1, P2: 8) in the same
round + bit-packed carry tree about 16 + the opening of msb ^ rho (2 bits); 7 rounds
(:func:`.binary.msb_masked`), and the bit comes out with its replica, so a product by it
starts at once. Inside ``protocols.config.bounded_comparisons()`` (``compare_bits=32``) the
sign is read mod 2^32: exact for reals in ``[-2^15, 2^15)``, the start's words and the tree
half as wide, 6 rounds; inside ``config.coarse_comparisons()`` (16 bits after a local shift
s, for the softmax row max) 5 rounds, with a one-sided error zone [0, 2^(s+1-f)).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

import crypten
from crypten.encoder import FixedPointEncoder
from crypten.mpc import MPCTensor

from cipherdm_torch.protocols import config
from cipherdm_torch.protocols.max_tree import tree_max
from cipherdm_torch.protocols.replicated import arith as ra
from cipherdm_torch.protocols.replicated import binary as rb

__all__ = ["ltz_share", "ltz", "lt", "ge", "relu", "select", "largest_of_three", "max",
           "mul_bit_share", "ternary_select"]


def ltz_share(x: torch.Tensor, bits: Optional[int] = None) -> torch.Tensor:
    """Share (integer scale) of [x < 0] for this party's share ``x``, read in the ring of
    ``bits`` bits (default: ``protocols.config`` field ``compare_bits``), with its replica
    attached: the bit's usual next step, a product, needs no re-share round."""
    cfg = config.current()
    bits, shift = (cfg.compare_bits, cfg.compare_shift) if bits is None else (bits, 0)
    return rb.msb_arith(x, ra.replicate(x), bits, shift)


def _bit_tensor(share: torch.Tensor) -> MPCTensor:
    out = MPCTensor.from_shares(share, precision=0)
    return out


def ltz(x: MPCTensor) -> MPCTensor:
    """[x < 0] as an arithmetic sharing with encoder scale 1 (like CrypTen's ``_ltz``)."""
    return _bit_tensor(ltz_share(x.share))


def lt(x: MPCTensor, c: Union[MPCTensor, torch.Tensor, float]) -> MPCTensor:
    """[x < c] for a public or secret ``c``."""
    return ltz(x - c)


def ge(x: MPCTensor, c: Union[MPCTensor, torch.Tensor, float]) -> MPCTensor:
    """[x >= c]."""
    return 1 - lt(x, c)


def _one_minus(bit: torch.Tensor) -> torch.Tensor:
    """Share of 1 - b, with its replica when b has one (the public 1 is added to share x_0:
    party 0's own share and party 2's replica)."""
    nxt = ra.cached_next(bit)
    share, rep = ra.add_public(-bit, -(bit if nxt is None else nxt), 1)
    return share if nxt is None else ra.remember(share, rep)


def _expanded(share: torch.Tensor, shape) -> torch.Tensor:
    """``share`` broadcast to ``shape`` (contiguous), with its replica broadcast the same way."""
    out = share.expand(shape).contiguous()
    ra.carry_local_op([share], out, lambda reps: reps[0].expand(shape).contiguous())
    return out


def mul_bit_share(x: torch.Tensor, bit: torch.Tensor) -> torch.Tensor:
    """Additive share of x * b for a 0/1 sharing b of integer scale (one re-share, no
    truncation)."""
    xn, bn = ra.replicate_many([x, bit])
    return ra.local_product(torch.mul, x, xn, bit, bn)


def relu(x: MPCTensor) -> MPCTensor:
    """max(x, 0) = x * (1 - [x < 0])."""
    neg = ltz_share(x.share)
    out = x.shallow_copy()
    out._tensor = x._tensor.shallow_copy()
    out.share = mul_bit_share(x.share, _one_minus(neg))
    return out


def select(bit: MPCTensor, x: Union[MPCTensor, torch.Tensor, float],
           y: Union[MPCTensor, torch.Tensor, float]) -> MPCTensor:
    """bit ? x : y for a secret 0/1 ``bit`` (scale 1) and secret or public x, y: y + b (x - y)."""
    diff = x - y
    if not isinstance(diff, MPCTensor):  # public difference: local scaling of the bit
        enc = FixedPointEncoder().encode(torch.as_tensor(diff, dtype=torch.float))
        return MPCTensor.from_shares(bit.share * enc) + y
    out = diff.shallow_copy()
    out._tensor = diff._tensor.shallow_copy()
    b = bit.share
    if b.shape != diff.share.shape:
        shape = torch.broadcast_shapes(b.shape, diff.share.shape)
        b, d = _expanded(b, shape), _expanded(diff.share, shape)
    else:
        d = diff.share
    out.share = mul_bit_share(d, b)
    return out + y


def largest_of_three(a: MPCTensor, b: MPCTensor, c: MPCTensor) -> MPCTensor:
    """max(a, b, c) whose selection costs NO round after the comparison, with its replica.

    The three comparisons [a - b < 0], [a - c < 0], [b - c < 0] come in masked form
    (:func:`.binary.msb_masked`): ``lt_j = c_j + (1 - 2 c_j) rho_j`` with ``c_j`` public and
    ``rho_j`` random bits injected in the comparison's first round. The selection
    ``max = c + s_a (a - c) + s_b (b - c)`` with ``s_a = ge_0 ge_1``, ``s_b = lt_0 ge_2`` (ties
    pick the first, as :func:`cipherdm_torch.protocols.max_tree.ternary_tree`) is then a
    public combination of ``d``, ``rho_j d`` and ``rho_0 rho_j d`` (``d`` the compared
    differences a - c and b - c, already re-shared for the comparison). Those products are
    re-shared while the carry tree runs (stage 1: ``rho_0 rho_1``, ``rho_0 rho_2`` and the
    four ``rho_j d``; stage 2: ``(rho_0 rho_j) d``), so the result comes out replicated
    with no round after the comparison's opening, and the next level of a max tree needs no
    re-share either. Before stop 19: two rounds after the comparison (a product of bits,
    then the bits times the differences) and a re-share at the next level; now 8 re-shared
    elements per triple instead of 3."""
    diffs = crypten.stack([a - b, a - c, b - c])
    d = diffs.share
    # c's replica too (in the same round when the inputs come without one), so the result
    # gets its replica
    dn, c_next = ra.replicate_many([d, c.share])

    def product(x, y):  # this party's re-randomised 3-out-of-3 share of x y (replicated x, y)
        return ra.local_product(torch.mul, x, ra.cached_next(x), y, ra.cached_next(y))

    d1, d2 = ra.remember(d[1].contiguous(), dn[1].contiguous()), \
        ra.remember(d[2].contiguous(), dn[2].contiguous())

    def stage1(rho):
        r = [ra.remember(rho[k].contiguous(), ra.cached_next(rho)[k].contiguous())
             for k in range(3)]
        return [product(r[0], r[1]), product(r[0], r[2]), product(r[1], d1),
                product(r[0], d1), product(r[2], d2), product(r[0], d2)]

    def stage2(first):
        return [product(first[0], d1), product(first[1], d2)]

    cfg = config.current()
    cpub, _, (first, second) = rb.msb_masked(d, dn, cfg.compare_bits, cfg.compare_shift,
                                             during=(stage1, stage2))
    _, _, r1d1, r0d1, r2d2, r0d2 = first
    r01d1, r02d2 = second
    terms = (d1, r1d1, r0d1, r01d1, d2, r2d2, r0d2, r02d2)
    share, nxt = ternary_select((c.share, c_next), cpub.to(torch.long), terms,
                                [ra.cached_next(t) for t in terms])
    out = c.shallow_copy()
    out._tensor = c._tensor.shallow_copy()
    out.share = ra.remember(share, nxt)
    return out


def ternary_select(c: Tuple[torch.Tensor, torch.Tensor], lt: torch.Tensor,
                   terms: Sequence[torch.Tensor], nexts: Sequence[torch.Tensor]
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(share, replica) of max(a, b, c) = c + s_a (a - c) + s_b (b - c) from the three masked
    comparison bits (``lt``: the opened ``c_j`` of [a-b < 0], [a-c < 0], [b-c < 0], leading
    dimension 3, in the ring's dtype) and the replicated ``terms`` (d1, rho1 d1, rho0 d1,
    rho0 rho1 d1, d2, rho2 d2, rho0 d2, rho0 rho2 d2) with their replicas ``nexts``
    (d1 = a - c, d2 = b - c): a public combination, local. Shared by the 64-bit
    :func:`largest_of_three` and the 16-bit tree of :mod:`.word16_max`."""
    def ge(j):  # [diff_j >= 0] = alpha + beta rho_j, public alpha, beta
        return 1 - lt[j], 2 * lt[j] - 1

    (a0, b0), (a1, b1), (a2, b2) = ge(0), ge(1), ge(2)
    na0, nb0 = 1 - a0, -b0  # lt_0 = 1 - ge_0
    # s_a (a - c) = (a0 + b0 r0)(a1 + b1 r1) d1; s_b (b - c) = (na0 + nb0 r0)(a2 + b2 r2) d2
    weights = (a0 * a1, a0 * b1, b0 * a1, b0 * b1, na0 * a2, na0 * b2, nb0 * a2, nb0 * b2)
    share = c[0] + sum(k * t for k, t in zip(weights, terms))
    nxt = c[1] + sum(k * t for k, t in zip(weights, nexts))
    return share.contiguous(), nxt.contiguous()


def max(x: MPCTensor, dim: int = -1, keepdim: bool = False) -> MPCTensor:
    """Maximum along ``dim`` by a tournament tree
    (:func:`cipherdm_torch.protocols.max_tree.tree_max`): ceil(log2 n) rounds of this
    module's compare + select, whatever the configured protocol."""
    return tree_max(x, dim, keepdim, combine=lambda a, b: select(ltz(a - b), b, a))  # a < b: b
