"""Comparisons on replicated shares: sign bit, x < c, ReLU, selection, max along a dimension.

All functions take and return CrypTen ``MPCTensor`` objects (arithmetic ptype) and
run on the dealer-free replicated protocols of :mod:`.arith` / :mod:`.binary`
whatever ``crypten.cfg.mpc.protocol`` says, so they can also be called directly.

Range: the sign bit is exact for every encoded value, i.e. for reals in
``[-2^47, 2^47)`` with CrypTen's 16 fractional bits (``x < c`` and ``max`` compute a
difference, which must stay in that range). Cost per element of ``ltz``
(bytes sent by P0; P1 and P2 send less): re-share of x if not cached 8 + generate /
propagate start 16 (P1, P2: 8) + bit-packed carry tree about 16 + replicated bit injection 16
(P1, P2: 8); 8 rounds, and the bit comes out with its replica, so a product by it starts at
once. Inside ``protocols.config.bounded_comparisons()`` (``compare_bits=32``) the sign is read
mod 2^32: exact for reals in ``[-2^15, 2^15)``, the start's words and the tree half as wide,
7 rounds.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from crypten.encoder import FixedPointEncoder
from crypten.mpc import MPCTensor

from cipherdm_torch.protocols import config
from cipherdm_torch.protocols.max_tree import tree_max
from cipherdm_torch.protocols.replicated import arith as ra
from cipherdm_torch.protocols.replicated import binary as rb

__all__ = ["ltz_share", "ltz", "lt", "ge", "relu", "select", "max", "mul_bit_share"]


def ltz_share(x: torch.Tensor, bits: Optional[int] = None) -> torch.Tensor:
    """Share (integer scale) of [x < 0] for this party's share ``x``, read in the ring of
    ``bits`` bits (default: ``protocols.config`` field ``compare_bits``), with its replica
    attached: the bit's usual next step, a product, needs no re-share round."""
    bits = config.current().compare_bits if bits is None else bits
    return rb.msb_arith(x, ra.replicate(x), bits)


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
    rank = ra._rank_ws()[0]
    out = (1 - bit) if rank == 0 else -bit
    nxt = ra.cached_next(bit)
    if nxt is not None:
        ra.remember(out, (1 - nxt) if rank == 2 else -nxt)
    return out


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


def max(x: MPCTensor, dim: int = -1, keepdim: bool = False) -> MPCTensor:
    """Maximum along ``dim`` by a tournament tree
    (:func:`cipherdm_torch.protocols.max_tree.tree_max`): ceil(log2 n) rounds of this
    module's compare + select, whatever the configured protocol."""
    return tree_max(x, dim, keepdim, combine=lambda a, b: select(ltz(a - b), b, a))  # a < b: b
