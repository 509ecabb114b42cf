"""Replicated three-party arithmetic sharing over Z_2^64, dealer-free and re-randomised.

Representation (why it looks like this): a secret ``x`` is split into three additive
shares ``x = x_0 + x_1 + x_2 (mod 2^64)``; party ``i`` keeps ``x_i`` as the
``share`` of CrypTen's :class:`ArithmeticSharedTensor` (so every local CrypTen op,
``get_plain_text`` and the other developers' code keep working unchanged) and,
*when it has it*, the replica ``x_{i+1}`` cached on the share tensor itself
(:func:`cached_next` / :func:`remember`). When a multiplication finds no replica it
re-shares on demand (:func:`replicate`: every party sends its ``x_i`` to the previous
party, 8 bytes per element, one round).

Replica rule (why every party takes the same communication decision): a party
sends or skips a re-share only according to :func:`cached_next`, which answers from
exactly two facts: a replica was attached to this tensor object by :func:`remember`,
and the object has not been modified in place since (``_version``). It never looks
at memory layout, strides, contiguity, storage or a view's ``_base`` (those differ
between parties: before issue 13 a view inherited its base's replica only when the
base was contiguous, and a truncation output was contiguous on party 2 only, so
party 2 skipped a re-share the others made and gloo aborted). Replicas are attached
only by code that runs identically on all parties: the protocols here (truncation,
re-share), the share-wise wrappers of :mod:`.backend` (view, index, permute, stack, cat,
add, sub, negation, integer multiple, ...) and :func:`carry_local_op` (the compiler's
share-wise ops, reported through :mod:`cipherdm_torch.protocols.sharewise`), which attach one
exactly when every input had one, on every party, and check only shapes.
The only share edits CrypTen makes on one party alone (party 0 adding a public value
in place: ``add_`` / ``sub_`` / ``index_add_`` / ``scatter_add_``) are wrapped to
re-attach (add / sub) or drop (the others) the replica on every party; so is CrypTen's
``.data`` alias, whose in-place edits do not move ``_version`` (it drops the replica). So by
induction over the program (the same on every party) the answer of
:func:`cached_next`, hence whether a party sends, is the same on all three parties.
Every share this module returns is contiguous, on every party.

Multiplication of replicated ``x, y``: party ``i`` computes locally
``z_i = x_i y_i + x_i y_{i+1} + x_{i+1} y_i + alpha_i`` where ``alpha`` is a
pseudo-random sharing of zero from the pairwise streams (``"next"`` is shared with
party ``i+1``, ``"prev"`` with ``i-1``). ``z`` is a fresh, uniformly re-randomised
3-out-of-3 sharing that costs *no* communication; it becomes replicated either by
:func:`truncate` (fixed-point products) or lazily by the next operation that needs
the replica. No dealer and no Beaver triple is involved.

Truncation (:func:`truncate_shares`), ``method="exact"`` (the default,
``protocols.config`` field ``truncation``): divides the 3-out-of-3 sharing ``z`` of
``x`` by a public ``y`` (int or long tensor, 1 <= y < 2^62) with P2 as a helper that
only sends. Requires ``-2^62 <= x < 2^62 - y``; P0 adds the public offset
``B = y * ceil(2^62 / y)`` (a multiple of ``y``, ``2^62`` for a power of two), so
``x' = x + B`` lies in ``[0, 2^63)``.

* Randomness: ``r = r_a + r_b`` with ``r_a`` from the P0-P2 stream and ``r_b`` from
  the P1-P2 stream. P2 knows ``r`` and computes ``Q = floor(r / y)`` and
  ``M = msb(r)`` (``r`` read unsigned); P0's shares ``q0, m0`` of them come from the
  P0-P2 stream.
* Round 1 (independent messages): P0 -> P1 ``z_0 + B + r_a``; P1 -> P0 ``z_1``;
  P2 -> P0 ``z_2 + r_b``; P2 -> P1 ``(z_2, Q - q0, M - m0)``. P0 and P1 both learn
  ``c = x' + r mod 2^64``, uniform to each of them; P2 receives nothing.
* Since ``x' < 2^63``, ``x' + r`` wrapped past 2^64 iff ``msb(r) = 1`` and
  ``msb(c) = 0``: the wrap bit ``w = M (1 - msb(c))`` is linear in the sharing of
  ``M``. With unsigned floor divisions (:func:`udiv`, exact on int64 bit patterns)
  ``floor(x' / y) = udiv(c, y) - Q + w udiv(2^64, y) + e``, ``e`` in {-1, 0, +1}
  (in {-1, 0} for a power-of-two ``y``). P0 holds
  ``o0 = udiv(c, y) - q0 + (1 - msb c) m0 udiv(2^64, y) - B / y`` and P1
  ``o1 = -(Q - q0) + (1 - msb c) (M - m0) udiv(2^64, y)``; ``o0 + o1 = floor(x / y) - e``.
* Round 2 (re-randomised replicated output): ``t0`` from the P0-P2 stream, ``t2`` from
  the P1-P2 stream, ``t1 = o0 + o1 - t0 - t2``: P0 sends ``o0 - t0`` to P1, P1 sends
  ``o1 - t2`` to P0, P2 sends nothing; party ``i`` ends with ``(t_i, t_{i+1})``.

Error: at most one unit in the last place, always (no wrap failure); for a
power-of-two ``y`` the result is ``floor(x / y)`` or ``floor(x / y) + 1``, the latter
with probability ``frac(x / y)`` (unbiased stochastic rounding). Security
(semi-honest, one corruption): every element P0 or P1 receives is masked by a stream
value it does not hold (``r_b`` / ``r_a``, ``q0``, ``m0``, ``t0`` / ``t2``); P2 receives
nothing. Cost per element: P0 and P1 send 2 elements (16 B), P2 sends 4 (32 B), 2
rounds (before issue 13 it was 8 B per party, one round, and failed as below). For a
power-of-two ``y = 2^d`` (every fixed-point product) :func:`_truncate_exact_pow2` replaces
P2's shares of ``Q`` and ``M`` by two d-bit words: P2 sends 8 + 2 * 2 = 12 B to P1 (d <= 16),
20 B in all. The
description above names the helper P2; the helper role rotates 2, 0, 1, 2, ... from one
truncation call to the next (:data:`helper_rotation`, a call counter that is the same on
every party), with the party indices rotated along, so over a network each party sends
on average 64/3 = 21.3 B per truncated element (52/3 = 17.3 B for a power of two) and no
party carries the helper's share every time.

``method="probabilistic"`` (ABY3's two-share truncation, kept for benchmarks): P2
hands ``z_2`` to P1, P0 holds ``a = z_0`` and P1 ``b = z_1 + z_2``, each divides
locally, P1 masks with the P1-P2 stream. 8 B per party, one round, error one unit,
except with probability about ``|x| / 2^64`` per element (``x`` the encoded value
before the division, e.g. ``2^(k+32)`` for a product of magnitude ``2^k`` at 16
fractional bits: ``2^(k-32)``) where it is off by ``2^64 / y`` (``2^32`` in real
units after a product truncation). That failure is what ruined one forward in
fourteen in issue 13 (measured by ``bench/bench_truncation.py``).

This module is also the CrypTen ``protocol`` named ``"rss"`` (see
:mod:`cipherdm_torch.protocols.replicated.backend`): it exposes ``mul``, ``matmul``,
``conv1d``, ``conv2d``, ``conv_transpose1d``, ``conv_transpose2d``, ``square``
and ``truncate`` with the signatures CrypTen's ``ArithmeticSharedTensor`` calls.
"""

from __future__ import annotations

import contextlib

from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional, Sequence, Tuple, \
    Union

import torch

import crypten
import crypten.communicator as comm

from cipherdm_torch.mpc import prg
from cipherdm_torch.protocols import config
from cipherdm_torch.protocols.replicated import lockstep
from cipherdm_torch.protocols.replicated.ring import ring_product

if TYPE_CHECKING:
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor

Device = Optional[Union[str, torch.device]]
Divisor = Union[int, torch.Tensor]  # a public positive int or long tensor

__all__ = [
    "RING_BITS", "rand_ring", "zero_share", "cached_next", "remember", "forget", "add_public",
    "carry_local_op",
    "replicate", "replicate_many", "local_product", "truncate_shares", "reshare_output",
    "transcript", "exchange", "exchange_now",
    "mul", "matmul", "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d", "square",
    "truncate", "udiv",
]

RING_BITS = 64
_CACHE_ATTR = "_cipherdm_rss_next"


# ---------------------------------------------------------------- parties and randomness

def _rank_ws() -> Tuple[int, int]:
    c = comm.get()
    rank, ws = c.get_rank(), c.get_world_size()
    if ws != 3:
        raise RuntimeError(f"replicated sharing needs exactly 3 parties, world size is {ws}")
    return rank, ws


def rand_ring(size: Sequence[int], which: str, device: Device = None) -> torch.Tensor:
    """Uniform int64 ring elements from this party's keyed pairwise stream ``which``
    ("prev" / "next": AES-128-CTR under the key agreed with that neighbour, see
    :mod:`cipherdm_torch.mpc.prg`)."""
    if prg.has_streams() or not prg.insecure_generators_allowed():
        return prg.stream(which).ring(tuple(size), device=device)
    device = torch.device("cpu") if device is None else torch.device(device)
    return torch.randint(-(2 ** 63), 2 ** 63 - 1, tuple(size),  # insecure benchmark mode only
                         generator=crypten.generators[which][device], dtype=torch.long,
                         device=device)


def rand_bits(size: Sequence[int], which: str, device: Device = None) -> torch.Tensor:
    """Uniform 0/1 values (uint8) from the keyed pairwise stream ``which``."""
    if prg.has_streams() or not prg.insecure_generators_allowed():
        return prg.stream(which).bits(tuple(size), device=device)
    device = torch.device("cpu") if device is None else torch.device(device)
    return torch.randint(0, 2, tuple(size), generator=crypten.generators[which][device],
                         dtype=torch.uint8, device=device)


def zero_share(size: Sequence[int], device: Device = None) -> torch.Tensor:
    """This party's share of a pseudo-random additive sharing of zero (no communication)."""
    return rand_ring(size, "next", device) - rand_ring(size, "prev", device)


# ---------------------------------------------------------------- transcript (security tests)

class _Transcript:
    """Optional record of every tensor this party receives inside these protocols."""

    def __init__(self):
        self.active = False
        self.messages: List[torch.Tensor] = []

    def start(self):
        self.active, self.messages = True, []

    def stop(self) -> List[torch.Tensor]:
        self.active = False
        out, self.messages = self.messages, []
        return out

    def add(self, t: torch.Tensor):
        if self.active:
            self.messages.append(t)


transcript = _Transcript()


def exchange(sends: Sequence[Tuple[torch.Tensor, int]],
             recvs: Sequence[Tuple[torch.Tensor, int]]) -> None:
    """Post all sends and receives, then wait: one communication round (metered). Inside a
    branch of :func:`.lockstep.run_together` the round is merged with the sibling branches'."""
    if lockstep.defer(sends, recvs):
        return
    exchange_now(sends, recvs)


_WAIT_LOGS: List[List[bool]] = []


@contextlib.contextmanager
def exchange_log() -> Iterator[List[bool]]:
    """Record, for each exchange on the network while active, whether this party receives in
    it. Every protocol calls ``exchange`` the same number of times on every party (lockstep),
    so the parties' logs line up: :func:`rounds_any_party` of them counts the rounds in which
    ANY party waits, the latency a computation pays (a party's cost meter counts only its
    own waits, and which party helps a truncation rotates)."""
    log: List[bool] = []
    _WAIT_LOGS.append(log)
    try:
        yield log
    finally:
        _WAIT_LOGS.remove(log)


def rounds_any_party(logs: Sequence[Sequence[bool]]) -> Optional[int]:
    """Exchanges in which at least one party waits (None when the logs do not line up)."""
    if not all(logs) or len({len(w) for w in logs}) != 1:
        return None
    return sum(any(col) for col in zip(*logs))


def exchange_now(sends: Sequence[Tuple[torch.Tensor, int]],
                 recvs: Sequence[Tuple[torch.Tensor, int]]) -> None:
    """:func:`exchange` on the network, now."""
    for log in _WAIT_LOGS:  # empty exchanges too: the parties' logs line up
        log.append(bool(recvs))
    if not sends and not recvs:
        return
    c = comm.get()
    reqs = [c.isend(t.contiguous(), dst) for t, dst in sends]
    # gloo receives only into contiguous memory (empty_like keeps a view's strides)
    landing = [buf if buf.is_contiguous() else torch.empty(buf.shape, dtype=buf.dtype,
                                                           device=buf.device)
               for buf, _ in recvs]
    reqs += [c.irecv(land, src=src) for land, (_, src) in zip(landing, recvs)]
    for r in reqs[::-1]:  # receives first: the sender threads write meanwhile
        r.wait()
    for land, (buf, _) in zip(landing, recvs):
        if land is not buf:
            buf.copy_(land)
        transcript.add(buf)


# ---------------------------------------------------------------- replica cache

def cached_next(share: torch.Tensor) -> Optional[torch.Tensor]:
    """The replica ``x_{i+1}`` of ``share`` if it is still valid, else None.

    Valid means: attached to this very tensor object by :func:`remember` and the
    tensor not modified in place since (``_version``). Nothing else is looked at:
    not the memory layout, not a view's base (a view gets a replica only from the
    op that made it, which applies the same view to the replica). See "Replica
    rule" in the module docstring for why this is the same on every party.
    """
    entry = getattr(share, _CACHE_ATTR, None)
    if entry is not None and entry[0] == share._version:
        return entry[1]
    return None


def remember(share: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """Attach the replica ``nxt`` to ``share`` (valid until ``share`` changes)."""
    if nxt.shape != share.shape:
        raise ValueError(f"replica shape {tuple(nxt.shape)} != share shape {tuple(share.shape)}")
    setattr(share, _CACHE_ATTR, (share._version, nxt))
    return share


def add_public(share: torch.Tensor, nxt: torch.Tensor, value) -> Tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """(share, replica) of x + value for a public ``value``: it goes into share index 0, which
    is party 0's own share and party 2's replica (local, the same rule on every party)."""
    rank, _ = _rank_ws()
    if rank == 0:
        share = share + value
    elif rank == 2:
        nxt = nxt + value
    return share, nxt


def forget(share: torch.Tensor) -> torch.Tensor:
    """Drop the replica of ``share`` (on every party: call it on a party-independent path)."""
    if getattr(share, _CACHE_ATTR, None) is not None:
        setattr(share, _CACHE_ATTR, None)
    return share


def carry_local_op(sources: Sequence[torch.Tensor], result: torch.Tensor,
                   op: Callable[[Sequence[torch.Tensor]], torch.Tensor]) -> None:
    """Observer of the compiler's share-wise ops (:mod:`cipherdm_torch.protocols.sharewise`,
    registered by :func:`.backend.install`): ``result = op(sources)`` ran on this party's
    shares; give ``result`` the replica ``op(replicas)`` when every source has one and the
    shapes agree (the replica rule: the same decision on every party)."""
    reps = [cached_next(s) for s in sources]
    if reps and all(r is not None for r in reps):
        rep = op(reps)
        if rep.shape == result.shape:
            remember(result, rep)


def replicate_many(shares: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Replicas of several shares; the missing ones are re-shared together in one round."""
    rank, ws = _rank_ws()
    out = [cached_next(s) for s in shares]
    missing, waiting = [], False
    for k, r in enumerate(out):
        if r is None:
            pending = lockstep.resharing(shares[k])  # a sibling branch re-shares it this round
            if pending is not None:
                out[k], waiting = pending, True
            else:
                missing.append(k)
    if missing or waiting:
        prev, nxt = (rank - 1) % ws, (rank + 1) % ws
        bufs = [torch.empty_like(shares[k], memory_format=torch.contiguous_format)
                for k in missing]
        for k, b in zip(missing, bufs):
            lockstep.mark_resharing(shares[k], b)
        # (only waiting: an empty exchange, i.e. this branch waits for the sibling's round)
        exchange([(shares[k], prev) for k in missing], [(b, nxt) for b in bufs])
        for k, b in zip(missing, bufs):
            out[k] = b
            remember(shares[k], b)
    return out


def replicate(share: torch.Tensor) -> torch.Tensor:
    """The replica ``x_{i+1}`` of this party's share (re-shared in one round if not cached)."""
    return replicate_many([share])[0]


# ---------------------------------------------------------------- multiplication

def local_product(op: Callable, x: torch.Tensor, x_next: torch.Tensor, y: torch.Tensor,
                  y_next: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Re-randomised 3-out-of-3 share of ``op(x, y)`` for a bilinear ``op`` (no communication).

    Ring products go through :func:`.ring.ring_product` (exact float64 limbs for matmul and
    convolutions: faster than torch's int64 kernels on the CPU, and the only way on CUDA)."""
    z = ring_product(op, x, y + y_next, *args, **kwargs) + ring_product(op, x_next, y, *args,
                                                                         **kwargs)
    return (z + zero_share(z.size(), device=z.device)).contiguous()


def word_product(x: torch.Tensor, x_next: torch.Tensor, y: torch.Tensor,
                 y_next: torch.Tensor) -> torch.Tensor:
    """Re-randomised 3-out-of-3 share of the elementwise ``x * y`` in the ring of the words'
    dtype (int16 / int32 words wrap mod 2^16 / 2^32; the zero sharing's low bits are uniform
    there): the small rings' :func:`local_product`, no communication."""
    z = x * (y + y_next) + x_next * y
    return (z + zero_share(z.shape, z.device).to(z.dtype)).contiguous()


def reshare_output(z: torch.Tensor) -> torch.Tensor:
    """Make the additive share ``z`` replicated (caches and returns the replica)."""
    return replicate(z)


# ---------------------------------------------------------------- unsigned division helpers

_LOW63 = (1 << 63) - 1
_MIN = -(1 << 63)  # XOR with it: unsigned order as signed order


def _signed(v: int) -> int:
    """The int64 bit pattern of the non-negative Python integer ``v`` (taken mod 2^64)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def _is_pow2(y) -> bool:
    return isinstance(y, int) and y > 0 and y & (y - 1) == 0


def udiv(v: torch.Tensor, y: Divisor) -> torch.Tensor:
    """``floor(u / y)`` for the unsigned 64-bit value ``u`` whose bit pattern is the int64 ``v``.

    ``y`` is a positive Python int or a positive long tensor broadcastable with ``v``
    (below 2^63). The result is returned as an int64 bit pattern (mod 2^64; it only
    exceeds 2^63 when y = 1). Exact: u = 2h + b with h = u >> 1 < 2^63, h = q y + rem,
    so floor(u / y) = 2q + [2 rem + b >= y], the comparison written as
    ``rem >= y - rem - b`` so nothing overflows.
    """
    if _is_pow2(y):
        d = y.bit_length() - 1
        return v.clone() if d == 0 else (v >> d) & ((1 << (64 - d)) - 1)
    h = (v >> 1) & _LOW63
    q = torch.div(h, y, rounding_mode="floor")
    rem = h - q * y
    return 2 * q + (rem >= y - rem - (v & 1)).to(torch.long)


def _ring_quotient(y):
    """``floor(2^64 / y)`` as an int64 pattern (int or long tensor, like ``y``)."""
    if isinstance(y, int):
        return _signed((1 << 64) // y)
    ones = torch.full_like(y, -1)  # 2^64 - 1
    q = udiv(ones, y)
    rem = ones - q * y  # (2^64 - 1) mod y, in [0, y)
    return q + (rem == y - 1).to(torch.long)  # y divides 2^64: one more


def _offset_quotient(y):
    """``ceil(2^62 / y)``: the offset ``B = y * ceil(2^62 / y)`` is a multiple of y in
    [2^62, 2^62 + y)."""
    if isinstance(y, int):
        return -(-(1 << 62) // y)
    return torch.div(torch.full_like(y, (1 << 62) - 1), y, rounding_mode="floor") + 1


def _floor_div(v: torch.Tensor, y) -> torch.Tensor:
    """Signed floor division of int64 ``v`` by a positive int / long tensor (exact)."""
    if _is_pow2(y):
        return v >> (y.bit_length() - 1)
    return torch.div(v, y, rounding_mode="floor")


# ---------------------------------------------------------------- truncation

TRUNCATION_BOUND = 1 << 62  # exact truncation needs |x| < 2^62 - y before the division


class _HelperRotation:
    """Which party helps the next exact truncation: 2, 0, 1, 2, ... (one step per call).

    Every party calls the truncation the same number of times in the same order (it
    communicates), so the counter is the same on all parties; rotating the helper spreads
    its larger share of the traffic (4 elements instead of 2) evenly over the parties.
    """

    def __init__(self):
        self.calls = 0

    def next(self) -> int:
        helper = (2 + self.calls) % 3
        self.calls += 1
        return helper


helper_rotation = _HelperRotation()


def _truncate_exact(z: torch.Tensor, y, helper: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact truncation with party ``helper`` (h) as helper (see the module docstring): 2 rounds.

    Roles are relative: A = h + 1 plays "P0" (adds the offset), B = h + 2 plays "P1"; the
    sharing is rotated accordingly (share index A + k is the protocol's t_k). Pairwise
    streams: A-h is A's "prev" and h's "next" (draws r_a, q0, m0, t0 in this order on
    both), B-h is B's "next" and h's "prev" (draws r_b, t2). A power-of-two divisor takes
    :func:`_truncate_exact_pow2` (12 B fewer per element from the helper).
    """
    if _is_pow2(y) and y > 1:
        return _truncate_exact_pow2(z, y.bit_length() - 1, helper)
    rank, _ = _rank_ws()
    a, b = (helper + 1) % 3, (helper + 2) % 3
    size, dev = z.size(), z.device
    kb = _offset_quotient(y)  # A adds B = y * kb, the quotient loses exactly kb
    if rank == a:
        r_a = rand_ring(size, "prev", dev)
        q0 = rand_ring(size, "prev", dev)
        m0 = rand_ring(size, "prev", dev)
        z1, masked2 = torch.empty_like(z), torch.empty_like(z)
        masked0 = z + y * kb + r_a
        exchange([(masked0, b)], [(z1, b), (masked2, helper)])
        c = masked0 + z1 + masked2  # x + B + r (mod 2^64)
        keep = (c >= 0).to(torch.long)  # 1 - msb(c): with msb(r) = 1 the sum wrapped
        o0 = udiv(c, y) - q0 + keep * m0 * _ring_quotient(y) - kb
        t0 = rand_ring(size, "prev", dev)
        mine, other = o0 - t0, torch.empty_like(z)
        exchange([(mine, b)], [(other, b)])
        return t0, mine + other
    if rank == b:
        r_b = rand_ring(size, "next", dev)
        masked0 = torch.empty_like(z)
        from_h = torch.empty((3,) + tuple(size), dtype=z.dtype, device=dev)
        exchange([(z, a)], [(masked0, a), (from_h, helper)])
        z2, dq, dm = from_h.unbind(0)
        c = masked0 + z + z2 + r_b
        keep = (c >= 0).to(torch.long)
        o1 = keep * dm * _ring_quotient(y) - dq
        t2 = rand_ring(size, "next", dev)
        mine, other = o1 - t2, torch.empty_like(z)
        exchange([(mine, a)], [(other, a)])
        return other + mine, t2
    r_a = rand_ring(size, "next", dev)
    q0 = rand_ring(size, "next", dev)
    m0 = rand_ring(size, "next", dev)
    r_b = rand_ring(size, "prev", dev)
    r = r_a + r_b
    big_q, big_m = udiv(r, y), (r < 0).to(torch.long)
    exchange([(z + r_b, a), (torch.stack([z, big_q - q0, big_m - m0]), b)], [])
    exchange([], [])  # the helper's empty round 2 (keeps every party's rounds aligned)
    t0 = rand_ring(size, "next", dev)
    t2 = rand_ring(size, "prev", dev)
    return t2, t0


def _small_dtype(bits: int) -> torch.dtype:
    """The narrowest integer dtype holding ``bits`` low bits (values sent mod 2^bits)."""
    for dtype, width in ((torch.uint8, 8), (torch.int16, 16), (torch.int32, 32)):
        if bits <= width:
            return dtype
    return torch.long


def _truncate_exact_pow2(z: torch.Tensor, d: int, helper: int) -> Tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """:func:`_truncate_exact` for ``y = 2^d`` (1 <= d <= 62) with the helper's shares of
    ``Q = floor(r / y)`` replaced by two d-bit values.

    The mask is ``r = r_a + r_b + r_h`` with the low d bits of ``r_a`` (A-h stream) and ``r_b``
    (B-h stream) cleared and ``r_h < 2^d`` the helper's own (OS CSPRNG): the low bits of ``x``
    are hidden from A and from B by ``r_h``, the high bits by the other party's mask, and
    ``r`` is uniform. No carry crosses bit d, so ``floor(r / y) = (r_a >> d) + (r_b >> d) -
    W 2^(64-d)`` exactly, ``W`` the wrap of ``r_a + r_b`` past 2^64 (unsigned): A and B each
    shift their own mask, and only ``W`` and ``M = msb(r)`` come from h. Both enter
    multiplied by ``K = 2^(64-d)``, so only their values mod 2^d matter: h sends ``W - w0`` and
    ``M - m0`` mod 2^d (``w0, m0`` from the A-h stream), 2 bytes each for d <= 16, instead of
    two ring elements. h sends ``z_h + r_b + r_h`` to A and ``z_h + r_h`` to B. Same result,
    same error (floor or floor + 1, unbiased), same rounds; the helper sends 8 + 12 = 20 B per
    element instead of 32 (d = 16).
    """
    rank, _ = _rank_ws()
    a, b = (helper + 1) % 3, (helper + 2) % 3
    size, dev = z.size(), z.device
    y, shift = 1 << d, 64 - d
    kb = 1 << (62 - d)  # A adds B = 2^62 = y * kb
    small = _small_dtype(d)
    low = (1 << d) - 1
    high = ~low  # clears the low d bits of r_b
    if rank == a:
        r_a = rand_ring(size, "prev", dev) & high
        w0 = rand_ring(size, "prev", dev)
        m0 = rand_ring(size, "prev", dev)
        z1, masked2 = torch.empty_like(z), torch.empty_like(z)
        masked0 = z + (y * kb) + r_a
        exchange([(masked0, b)], [(z1, b), (masked2, helper)])
        c = masked0 + z1 + masked2  # x + B + r (mod 2^64)
        keep = (c >= 0).to(torch.long)  # 1 - msb(c): with msb(r) = 1 the sum wrapped
        o0 = (udiv(c, y) - udiv(r_a, y) + ((w0 + keep * m0) << shift)) - kb
        t0 = rand_ring(size, "prev", dev)
        mine, other = o0 - t0, torch.empty_like(z)
        exchange([(mine, b)], [(other, b)])
        return t0, mine + other
    if rank == b:
        r_b = rand_ring(size, "next", dev) & high
        masked0 = torch.empty_like(z)
        from_h = torch.empty(z.numel() * 8 + 2 * z.numel() * small.itemsize, dtype=torch.uint8,
                             device=dev)
        exchange([(z, a)], [(masked0, a), (from_h, helper)])
        n8 = z.numel() * 8
        z2 = from_h[:n8].view(torch.long).view(size)
        dw, dm = from_h[n8:].view(small).view((2,) + tuple(size)).to(torch.long).unbind(0)
        c = masked0 + z + z2 + r_b  # z2 arrives as z_h + r_h
        keep = (c >= 0).to(torch.long)
        o1 = ((dw + keep * dm) << shift) - udiv(r_b, y)
        t2 = rand_ring(size, "next", dev)
        mine, other = o1 - t2, torch.empty_like(z)
        exchange([(mine, a)], [(other, a)])
        return other + mine, t2
    r_a = rand_ring(size, "next", dev) & high
    w0 = rand_ring(size, "next", dev)
    m0 = rand_ring(size, "next", dev)
    r_b = rand_ring(size, "prev", dev) & high
    r_h = prg.local_ring(size, dev, bits=d)  # the helper's own: OS CSPRNG
    r = r_a + r_b
    wrap = ((r ^ _MIN) < (r_a ^ _MIN)).to(torch.long)  # unsigned r_a + r_b >= 2^64
    big_m = (r < 0).to(torch.long)  # r_h < 2^d leaves the top bit as it is
    corr = torch.stack([wrap - w0, big_m - m0]) & low
    zh = z + r_h
    payload = torch.cat([zh.reshape(-1).view(torch.uint8), corr.to(small).reshape(-1)
                         .view(torch.uint8)])
    exchange([(zh + r_b, a), (payload, b)], [])
    exchange([], [])  # the helper's empty round 2 (keeps every party's rounds aligned)
    t0 = rand_ring(size, "next", dev)
    t2 = rand_ring(size, "prev", dev)
    return t2, t0


def _truncate_probabilistic(z: torch.Tensor, y) -> Tuple[torch.Tensor, torch.Tensor]:
    """ABY3's two-share truncation (benchmarks only): wrong by about 2^64 / y with
    probability about |x| / 2^64 per element."""
    rank, _ = _rank_ws()
    size, dev = z.size(), z.device
    if rank == 0:
        t0 = _floor_div(z, y).contiguous()
        t1 = torch.empty_like(t0)
        exchange([(t0, 2)], [])  # each message in the same exchange at both ends (lockstep)
        exchange([], [(t1, 1)])
        return t0, t1
    if rank == 1:
        z2 = torch.empty_like(z)
        exchange([], [(z2, 2)])
        r = rand_ring(size, "next", dev)
        t1 = _floor_div(z + z2, y) - r
        exchange([(t1, 0)], [])
        return t1, r
    r = rand_ring(size, "prev", dev)
    t0 = torch.empty_like(z)
    exchange([(z, 1)], [(t0, 0)])
    exchange([], [])
    return r, t0


def _truncation_method() -> str:
    return config.current().truncation


def truncate_shares(z: torch.Tensor, y: Divisor, method: Optional[str] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Divide the additive sharing ``z`` by the public positive integer ``y`` (int or long
    tensor broadcastable with ``z``).

    Returns this party's new share and its replica (replicated output, re-randomised),
    both contiguous on every party. ``method`` is ``"exact"`` (default, from
    ``protocols.config``: error at most one unit for |x| < 2^62) or ``"probabilistic"``
    (ABY3's, benchmarks only).
    """
    method = _truncation_method() if method is None else method
    if torch.is_tensor(y):
        if y.numel() == 1:
            y = int(y.item())
        else:
            y = y.to(torch.long)
            z = z.expand(torch.broadcast_shapes(z.shape, y.shape))
    if isinstance(y, int):
        if y <= 0 or y >= TRUNCATION_BOUND:
            raise ValueError(f"truncation needs a divisor in [1, 2^62), got {y}")
    elif bool((y <= 0).any()) or bool((y >= TRUNCATION_BOUND).any()):
        raise ValueError("truncation needs divisors in [1, 2^62)")
    z = z.contiguous()
    if method == "exact":
        return _truncate_exact(z, y, helper_rotation.next())
    if method == "probabilistic":
        return _truncate_probabilistic(z, y)
    raise ValueError(f"unknown truncation method {method!r}; use 'exact' or 'probabilistic'")


# ---------------------------------------------------------------- CrypTen protocol interface

def _bilinear(op: Callable, x, y, *args, **kwargs):
    xs, ys = x.share, y.share
    x_next, y_next = replicate_many([xs, ys]) if xs is not ys else [replicate(xs)] * 2
    result = x.shallow_copy()
    result.share = local_product(op, xs, x_next, ys, y_next, *args, **kwargs)
    return result


def mul(x: ArithmeticSharedTensor, y: ArithmeticSharedTensor) -> ArithmeticSharedTensor:
    return _bilinear(torch.mul, x, y)


def matmul(x: ArithmeticSharedTensor, y: ArithmeticSharedTensor) -> ArithmeticSharedTensor:
    return _bilinear(torch.matmul, x, y)


def conv1d(x: ArithmeticSharedTensor, y: ArithmeticSharedTensor,
           **kwargs: Any) -> ArithmeticSharedTensor:
    return _bilinear(torch.conv1d, x, y, **kwargs)


def conv2d(x: ArithmeticSharedTensor, y: ArithmeticSharedTensor,
           **kwargs: Any) -> ArithmeticSharedTensor:
    return _bilinear(torch.conv2d, x, y, **kwargs)


def conv_transpose1d(x: ArithmeticSharedTensor, y: ArithmeticSharedTensor,
                     **kwargs: Any) -> ArithmeticSharedTensor:
    return _bilinear(torch.conv_transpose1d, x, y, **kwargs)


def conv_transpose2d(x: ArithmeticSharedTensor, y: ArithmeticSharedTensor,
                     **kwargs: Any) -> ArithmeticSharedTensor:
    return _bilinear(torch.conv_transpose2d, x, y, **kwargs)


def square(x: ArithmeticSharedTensor) -> ArithmeticSharedTensor:
    xs = x.share
    xn = replicate(xs)
    result = x.shallow_copy()
    z = xs * (xs + 2 * xn)  # x_i^2 + 2 x_i x_{i+1}: the three cross terms of x^2
    result.share = (z + zero_share(z.size(), device=z.device)).contiguous()
    return result


def truncate(x: ArithmeticSharedTensor, y: Divisor) -> ArithmeticSharedTensor:
    """In-place division of CrypTen share ``x`` by a public nonzero integer (scalar or tensor).

    A negative divisor divides by ``|y|`` and negates (locally, share and replica).
    """
    if torch.is_tensor(y):
        if y.numel() == 1:
            y = int(y.item())
        else:
            y = y.to(torch.long)
    if isinstance(y, int):
        if y == 0:
            raise ZeroDivisionError("truncation by zero")
        if y == 1:  # nothing to divide (e.g. a model's output_scale_factor of 1.0): no round
            return x
        sign, mag = (-1 if y < 0 else 1), abs(y)
    else:
        if bool((y == 0).any()):
            raise ZeroDivisionError("truncation by a divisor tensor containing zero")
        sign, mag = (None if bool((y > 0).all()) else torch.sign(y)), y.abs()
    share, nxt = truncate_shares(x.share, mag)
    if isinstance(sign, int) and sign < 0:
        share, nxt = -share, -nxt
    elif torch.is_tensor(sign):
        share, nxt = (share * sign).contiguous(), (nxt * sign).contiguous()
    x.share = share
    remember(x.share, nxt)
    return x
