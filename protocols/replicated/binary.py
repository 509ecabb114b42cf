"""Replicated three-party binary (XOR) sharing: AND, arithmetic-to-binary, bit-to-arithmetic.

A binary secret ``x = x_0 ^ x_1 ^ x_2``; party ``i`` holds the pair ``(x_i, x_{i+1})``
(a :data:`Pair`). Values are either 64-bit words (``torch.long``) or tensors of
single bits (``torch.uint8`` holding 0/1, last dimension usually the bit
position); bit tensors are packed eight to a byte on the wire, so a bit costs
one bit of traffic.

* XOR, shifts and masking with public constants are local.
* AND (:func:`and_many`) uses the replicated product
  ``z_i = x_i & (y_i ^ y_{i+1}) ^ x_{i+1} & y_i`` re-randomised by a pseudo-random
  XOR-sharing of zero from the pairwise keyed streams (:mod:`cipherdm_torch.mpc.prg`),
  then one re-share (each party sends its ``z_i`` to the previous party): one element per party,
  one round, any number of ANDs batched into the same round. No dealer.
* :func:`a2b` converts a replicated arithmetic sharing ``x = y + x_2`` (``y = x_0 + x_1``
  known to P0, ``x_2`` to P1 and P2): P0 inputs ``y`` and, in the same round, the generate
  bits ``y & x_2`` come out replicated (:func:`generate_propagate`, a 3-party OT-style
  exchange: no carry-save AND round), then a Kogge-Stone parallel-prefix adder (6 rounds).
* :func:`msb` only needs the carry into bit 63: a binary tree over the bits
  (6 rounds of ANDs on bit planes, 64 elements per int64 word) instead of the full
  adder, about 24 bytes per element in total.
* :func:`b2a_bit` (bit injection): P0 knows ``b_0 ^ b_1`` and inputs it as a
  replicated arithmetic value (P0 sends one element to P1), then
  ``b = c + b_2 - 2 c b_2`` with a local re-randomised product: one round, only
  P0 sends; the output is a 3-out-of-3 additive share (CrypTen's layout).
* :func:`b2a_bit_replicated`: the same injection with a *replicated* output in the same one
  round (P0 sends two elements, P1 and P2 one each), for bits that go on into a product,
  whose re-share round it saves; see its docstring.
* :func:`msb_masked` (what the comparisons use): the sign bit as ``c ^ rho`` with ``c``
  public and ``rho`` a random bit injected in the generate / propagate round; the carry
  tree's last AND is merged with the opening of ``c``, so the bit costs one round less than
  :func:`msb` + injection, and products of the bit can be prepared from ``rho`` while the
  tree runs (:func:`.compare.largest_of_three`). Words of 64, 32 or 16 bits (16 after a
  local shift: a one-sided error zone just above zero, see :func:`_narrow`).
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch

from cipherdm_torch.protocols.replicated import arith as ra

__all__ = ["Pair", "random_bits", "bits_of", "to_planes", "to_planes32", "to_planes_narrow", "from_plane", "xor", "xor_public",
           "and_many", "and_", "generate_propagate", "a2b", "msb", "msb_masked", "msb_arith", "unmask", "b2a_bit",
           "b2a_bit_replicated", "b2a",
           "reveal_binary", "pack_bits", "unpack_bits"]

Pair = Tuple[torch.Tensor, torch.Tensor]
_WEIGHTS = 1 << torch.arange(8, dtype=torch.uint8)
_BIT_IN_OCTET = torch.arange(8, dtype=torch.uint8)
_LITTLE_ENDIAN = sys.byteorder == "little"


# ---------------------------------------------------------------- packing

def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """0/1 uint8 tensor -> flat uint8 tensor with 8 bits per byte."""
    flat = bits.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _WEIGHTS).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`."""
    bits = (packed.unsqueeze(-1) >> _BIT_IN_OCTET) & 1
    return bits.reshape(-1)[:math.prod(shape)].reshape(shape)


def bits_of(word: torch.Tensor, lo: int = 0, hi: int = 64) -> torch.Tensor:
    """Bits ``lo..hi-1`` of int64 words as a uint8 tensor with a trailing bit dimension.

    Read from the words' bytes (little-endian: byte k holds bits 8k..8k+7), so the work is on
    uint8, not on a 64-fold int64 expansion (eight times less memory traffic)."""
    if _LITTLE_ENDIAN and word.dtype == torch.long and word.numel():
        flat = word.reshape(-1)
        if flat.stride(0) != 1:  # (a one-element view may keep its base's stride)
            flat = flat.clone(memory_format=torch.contiguous_format)
        octets = flat.view(torch.uint8).reshape(*word.shape, 8, 1)
        bits = (octets >> _BIT_IN_OCTET.to(word.device)) & 1
        return bits.reshape(*word.shape, 64)[..., lo:hi]
    shifts = torch.arange(lo, hi, dtype=torch.long, device=word.device)
    return ((word.unsqueeze(-1) >> shifts) & 1).to(torch.uint8)


# ---------------------------------------------------------------- local operations

def xor(x: Pair, y: Pair) -> Pair:
    return x[0] ^ y[0], x[1] ^ y[1]


def xor_public(x: Pair, c: Union[int, torch.Tensor]) -> Pair:
    """XOR a public constant into share index 0 (held by P0 first, by P2 second)."""
    rank, _ = ra._rank_ws()
    a, b = x
    if rank == 0:
        a = a ^ c
    elif rank == 2:
        b = b ^ c
    return a, b


def _bit_zero_share(shape, device=None) -> torch.Tensor:
    return ra.rand_bits(shape, "next", device) ^ ra.rand_bits(shape, "prev", device)


def _zero_share(like: torch.Tensor) -> torch.Tensor:
    if like.dtype == torch.uint8:
        return _bit_zero_share(like.shape, like.device)
    zero = ra.rand_ring(like.shape, "next", like.device) ^ ra.rand_ring(like.shape, "prev",
                                                                        like.device)
    return zero if like.dtype == torch.long else zero.to(like.dtype)  # int32 words: low half


def random_bits(shape: Sequence[int], bits: int = 64, device: ra.Device = None) -> Pair:
    """A random replicated binary word no party knows: share j drawn from the PRG of
    parties j-1 and j, so party i's pair is (prev draw, next draw); no communication."""
    mask = -1 if bits >= 64 else (1 << bits) - 1
    return (ra.rand_ring(shape, "prev", device) & mask, ra.rand_ring(shape, "next", device) & mask)


# ---------------------------------------------------------------- AND

def and_many(pairs: Sequence[Tuple[Pair, Pair]], extra: Sequence["Step"] = ()) -> List[Pair]:
    """AND of several (x, y) pairs of binary sharings in a single round (``extra``: other
    one-round steps whose messages ride in the same round; their finish runs after it)."""
    rank, ws = ra._rank_ws()
    zs = []
    for (xa, xb), (ya, yb) in pairs:
        z = (xa & (ya ^ yb)) ^ (xb & ya)
        zs.append(z ^ _zero_share(z))
    # one message per word width (int64, int32 for narrow comparisons) and one of packed bits
    widths = [dt for dt in (torch.long, torch.int32) if any(z.dtype == dt for z in zs)]
    groups = [[k for k, z in enumerate(zs) if z.dtype == dt] for dt in widths]
    bits = [k for k, z in enumerate(zs) if z.dtype == torch.uint8]
    sends, recvs = [], []
    for words in groups:
        flat = torch.cat([zs[k].reshape(-1) for k in words])
        wbuf = torch.empty_like(flat)
        sends.append((flat, (rank - 1) % ws))
        recvs.append((wbuf, (rank + 1) % ws))
    if bits:
        packed = pack_bits(torch.cat([zs[k].reshape(-1) for k in bits]))
        bbuf = torch.empty_like(packed)
        sends.append((packed, (rank - 1) % ws))
        recvs.append((bbuf, (rank + 1) % ws))
    ra.exchange(sends + [m for st in extra for m in st[0]],
                recvs + [m for st in extra for m in st[1]])
    for st in extra:
        st[2]()
    out: List[Pair] = [None] * len(zs)  # type: ignore[list-item]
    for g, words in enumerate(groups):
        got, pos = recvs[g][0], 0
        for k in words:
            n = zs[k].numel()
            out[k] = (zs[k], got[pos:pos + n].view(zs[k].shape))
            pos += n
    if bits:
        total = sum(zs[k].numel() for k in bits)
        got, pos = unpack_bits(recvs[-1][0], (total,)), 0
        for k in bits:
            n = zs[k].numel()
            out[k] = (zs[k], got[pos:pos + n].view(zs[k].shape))
            pos += n
    return out


def and_(x: Pair, y: Pair) -> Pair:
    return and_many([(x, y)])[0]


# ---------------------------------------------------------------- arithmetic -> binary

def _shl(x: Pair, k: int) -> Pair:
    return x[0] << k, x[1] << k


def generate_propagate(x: torch.Tensor, x_next: torch.Tensor) -> Tuple[Pair, Pair]:
    """(g, p) = (y & x_2, y ^ x_2) as replicated binary sharings, in ONE round, where
    x = y + x_2 with y = x_0 + x_1 (P0 holds both) and x_2 held by P1 and P2: the start of a
    two-operand adder, with no carry-save round before it (that took one AND round, and the
    generate AND a second).

    P0 inputs y as ``(rho, tau, s)`` with ``s = y ^ rho ^ tau`` (rho from the P0-P2 stream,
    tau from P0-P1) and sends ``s`` to P1 and P2. g's shares are ``(alpha, beta,
    g ^ alpha ^ beta)`` (alpha: P0-P2 stream, beta: P0-P1). P1 knows ``s ^ tau = y ^ rho``,
    so ``x_2 & (s ^ tau) = g ^ (x_2 & rho)``; P2 sends it ``(x_2 & rho) ^ alpha`` and
    symmetrically receives ``(x_2 & tau) ^ beta`` from P1. Each receiver's two words are
    masked by stream values it does not hold (rho and alpha for P1, tau and beta for P2).
    Words: P0 sends two, P1 and P2 one each (the carry-save and generate ANDs: two each).
    Words may be int64, int32 or int16 (the sum read mod 2^32 / 2^16)."""
    return _one_round(_generate_propagate_start(x, x_next))


Step = Tuple[list, list, Callable[[], Any]]  # (sends, receives, finish): one round's share


def _one_round(*steps: Step):
    """Run the messages of several independent one-round steps as ONE exchange; the finished
    results in order (a single step: its result)."""
    ra.exchange([m for s in steps for m in s[0]], [m for s in steps for m in s[1]])
    out = [s[2]() for s in steps]
    return out[0] if len(out) == 1 else out


def _generate_propagate_start(x: torch.Tensor, x_next: torch.Tensor) -> Step:
    """:func:`generate_propagate` as messages and a finish step (to share its round)."""
    rank, _ = ra._rank_ws()
    dt, shape, dev = x.dtype, x.shape, x.device

    def draw(which):
        return ra.rand_ring(shape, which, dev).to(dt)

    if rank == 0:
        tau, beta = draw("next"), draw("next")
        rho, alpha = draw("prev"), draw("prev")
        s = (x + x_next) ^ rho ^ tau
        return [(s, 1), (s, 2)], [], lambda: ((alpha, beta), (rho, tau))
    got_s, got_t = torch.empty_like(x), torch.empty_like(x)
    if rank == 1:  # holds (x_1, x_2)
        x2 = x_next
        tau, beta = draw("prev"), draw("prev")

        def finish1():
            g2 = (x2 & (got_s ^ tau)) ^ got_t ^ beta
            return (beta, g2), (tau, got_s ^ x2)

        return [((x2 & tau) ^ beta, 2)], [(got_s, 0), (got_t, 2)], finish1
    x2 = x  # party 2 holds (x_2, x_0)
    rho, alpha = draw("next"), draw("next")

    def finish2():
        g2 = (x2 & (got_s ^ rho)) ^ got_t ^ alpha
        return (g2, alpha), (got_s ^ x2, rho)

    return [((x2 & rho) ^ alpha, 1)], [(got_s, 0), (got_t, 1)], finish2


def a2b(x: torch.Tensor, x_next: torch.Tensor) -> Pair:
    """Binary sharing of the replicated arithmetic value (x_i, x_{i+1}): 7 rounds (the
    generate / propagate start, then 6 Kogge-Stone levels)."""
    g, p = generate_propagate(x, x_next)
    half_sum = p  # y ^ x_2; the carries are added to it at the end
    k = 1
    while k < 64:
        last = k * 2 >= 64
        gs, ps = _shl(g, k), _shl(p, k)
        if last:
            (pg,) = and_many([(p, gs)])
        else:
            pg, p = and_many([(p, gs), (p, ps)])
        g = xor(g, pg)
        k *= 2
    return xor(half_sum, _shl(g, 1))


_WORD = {64: torch.long, 32: torch.int32, 16: torch.int16}


def _narrow(x: torch.Tensor, x_next: torch.Tensor, bits: int, shift: int = 0
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The shares shifted right by ``shift`` bits and read mod 2^bits (two's complement words
    of that width): local.

    Each share drops its own low bits, so the sum of the shifted shares is
    ``floor(x / 2^shift) - k`` with ``k`` in {0, 1, 2} (the carries the dropped bits would
    have made): its sign is that of x, except for ``0 <= x < 2^(shift + 1)``, which may read
    as negative (a one-sided error zone; none for ``shift = 0``)."""
    if bits not in _WORD:
        raise ValueError(f"msb reads a ring of 16, 32 or 64 bits, not {bits}")
    if not 0 <= shift <= 64 - bits:
        raise ValueError(f"shift must be in [0, {64 - bits}] for {bits} bits, not {shift}")
    if shift:
        x, x_next = x >> shift, x_next >> shift
    if bits < 64:
        return x.to(_WORD[bits]), x_next.to(_WORD[bits])
    return x, x_next


def _carry_planes(g: Pair, p: Pair, bits: int, keep_last: bool = False,
                  extra: Optional[Callable[[int], Sequence["Step"]]] = None):
    """Carry into the top bit by a binary tree over bit planes (one AND round per level).

    Returns the carry's plane pair, or with ``keep_last`` the last level's operands
    ``(g_hi, p_hi, g_lo)`` before its AND (carry = g_hi ^ (p_hi & g_lo)) for a caller that
    merges that AND into its next round. ``extra(k)`` gives the steps that ride in the k-th
    AND round (called when that round is about to go out)."""
    planes = to_planes if bits == 64 else functools.partial(to_planes_narrow, width=bits)
    # generate / propagate planes of bits 0..bits-2, with a zero plane below bit 0
    G = tuple(planes(t << 1) for t in g)
    P = tuple(planes(t << 1) for t in p)
    level = 0
    while G[0].shape[0] > 1:
        g_lo, g_hi = tuple(t[0::2] for t in G), tuple(t[1::2] for t in G)
        p_lo, p_hi = tuple(t[0::2] for t in P), tuple(t[1::2] for t in P)
        if G[0].shape[0] == 2 and keep_last:
            return g_hi, p_hi, g_lo
        steps = extra(level) if extra is not None else ()
        if G[0].shape[0] == 2:
            (pg,) = and_many([(p_hi, g_lo)], steps)
        else:
            pg, P = and_many([(p_hi, g_lo), (p_hi, p_lo)], steps)
        level += 1
        G = xor(g_hi, pg)
    return G


def _top_bit(p: Pair, bits: int) -> Pair:
    return tuple((p[k] >> (bits - 1)).to(torch.uint8) & 1 for k in range(2))


def msb(x: torch.Tensor, x_next: torch.Tensor, bits: int = 64, shift: int = 0) -> Pair:
    """Binary sharing (0/1 uint8) of the sign bit of the replicated arithmetic value, read in
    the ring of ``bits`` bits (64, or 32: the top bit of x mod 2^32).

    With ``bits=32`` the three shares are taken mod 2^32 locally (``x mod 2^32`` is their sum
    mod 2^32), so the answer is exact for encoded values in [-2^31, 2^31), and the words on
    the wire are int32 and the carry tree has 5 levels instead of 6: one round and about 16
    bytes per element less.

    The carry tree runs on bit planes (:func:`to_planes`): at every level the ANDs, the zero
    sharings and the messages are whole int64 words of 64 elements' bits, nothing is unpacked
    until the final carry. ``shift``: see :func:`_narrow` (16 bits: one tree level less
    again, for values bounded by 2^(15 + shift), with a one-sided error zone)."""
    x, x_next = _narrow(x, x_next, bits, shift)
    g, p = generate_propagate(x, x_next)
    G = _carry_planes(g, p, bits)
    carry = tuple(from_plane(t[0], x.shape) for t in G)
    return xor(_top_bit(p, bits), carry)


def msb_masked(x: torch.Tensor, x_next: torch.Tensor, bits: int = 64, shift: int = 0,
               during: Sequence[Callable[[Any], Sequence[torch.Tensor]]] = (),
               rho_dtype: torch.dtype = torch.long,
               riders: Optional[Callable[[int], Sequence["Step"]]] = None):
    """The sign bit of the replicated arithmetic value ``(x, x_next)`` (read mod 2^bits) in
    MASKED form ``(c, rho, extra)``: ``c`` public (uint8, the same on every party), ``rho``
    this party's replicated arithmetic share (integer scale, replica attached) of a random bit
    no party knows, and ``msb = c ^ rho = c + (1 - 2c) rho``.

    Why: the bit injection needs the finished bit, so it cost a round after the carry tree's
    last AND. Here the random bit ``rho`` (XOR-shared from the pairwise streams) is injected
    instead, in the generate / propagate round (same messages as injecting the real bit, so
    the same bytes), and the last AND is merged with an OPENING of ``msb ^ rho``:

    * the last level's AND ``p_hi & g_lo`` leaves each party a 3-out-of-3 XOR share ``z_i``
      (no message); party i XORs in share i of ``g_hi``, of the top bit and of ``rho``, and a
      share of a pseudo-random XOR sharing of zero (both its streams), so ``e_0 ^ e_1 ^ e_2 =
      msb ^ rho`` and each ``e_j`` alone is uniform to the other parties;
    * every party sends its ``e_i`` to both others (one bit per element each, packed), so all
      learn ``c = msb ^ rho``: uniform, since no party knows ``rho``.

    Because ``rho`` is known a few rounds before ``c``, products of the bit can be prepared
    meanwhile, at no round of their own: ``during`` is a sequence of stages; stage 0 gets
    ``rho`` and returns 3-out-of-3 shares (e.g. products of several comparisons' ``rho``),
    re-shared in the carry tree's first AND round; stage k gets the list stage k - 1 returned,
    now replicated, and its shares ride in the (k+1)-th AND round (log2(bits) - 2 rounds are
    there: 2 for 16 bits). ``extra`` is the list of the stages' outputs, replicated (replica
    attached).

    Rounds: generate / propagate and injection 1, carry tree levels but the last
    (log2(bits) - 1), opening 1: 6 for 32 bits, 7 for 64. Bytes: the injection's (P0 16,
    P1 / P2 8 per element), the tree's, and 2 bits per element per party for the opening.
    ``bits`` 16 with a ``shift`` (:func:`_narrow`): 5 rounds, for bounded values.
    ``rho_dtype`` int16: ``rho``'s arithmetic sharing mod 2^16 only (its products then live in
    that ring: :mod:`.word16_max`), a quarter of the injection's bytes. ``riders(k)``: other
    one-round steps (another protocol's messages) that ride in round k before the opening
    (0: the generate / propagate round, k >= 1: the k-th AND round), called when that round
    is about to go out."""
    rank, _ = ra._rank_ws()
    x, x_next = _narrow(x, x_next, bits, shift)
    shape, dev = x.shape, x.device
    rho = (ra.rand_bits(shape, "prev", dev), ra.rand_bits(shape, "next", dev))
    extra = list(riders(0)) if riders is not None else []
    (g, p), rho_arith, *_ = _one_round(_generate_propagate_start(x, x_next),
                                       _inject_start(rho, rho_dtype), *extra)
    outs: List[List[torch.Tensor]] = []

    def stage(level):
        more = list(riders(level + 1)) if riders is not None else []
        if level >= len(during):
            return more
        steps = [_reshare_start(z) for z in during[level](outs[-1] if outs else rho_arith)]
        outs.append([st[3] for st in steps])
        return steps + more

    g_hi, p_hi, g_lo = _carry_planes(g, p, bits, keep_last=True, extra=stage)
    if len(outs) < len(during):
        raise ValueError(f"{len(during)} stages do not fit in the carry tree of {bits} bits")
    # this party's 3-out-of-3 XOR share of g_hi ^ (p_hi & g_lo), on bit planes
    z = (p_hi[0] & (g_lo[0] ^ g_lo[1])) ^ (p_hi[1] & g_lo[0]) ^ g_hi[0]
    e = from_plane(z[0], shape) ^ _top_bit(p, bits)[0] ^ rho[0] ^ _bit_zero_share(shape, dev)
    packed = pack_bits(e)
    from_prev, from_next = torch.empty_like(packed), torch.empty_like(packed)
    ra.exchange([(packed, (rank + 1) % 3), (packed, (rank - 1) % 3)],
                [(from_prev, (rank - 1) % 3), (from_next, (rank + 1) % 3)])
    c = e ^ unpack_bits(from_prev, shape) ^ unpack_bits(from_next, shape)
    return c, rho_arith, outs


def _reshare_start(z: torch.Tensor) -> Step:
    """The re-share of a 3-out-of-3 share (each party sends its share to the previous one) as
    a step; its finish attaches the replica. The share object is ``step[3]``."""
    rank, _ = ra._rank_ws()
    z = z.contiguous()
    buf = torch.empty_like(z)
    return [(z, (rank - 1) % 3)], [(buf, (rank + 1) % 3)], lambda: ra.remember(z, buf), z


def unmask(c: torch.Tensor, rho: torch.Tensor, rho_next: torch.Tensor
           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(share, replica) of the bit ``c ^ rho = c + (1 - 2c) rho`` (local): P0 adds ``c`` to
    its share, P2 to its replica (share index 0)."""
    c = c.to(torch.long)
    sign = 1 - 2 * c
    share, nxt = ra.add_public(sign * rho, sign * rho_next, c)
    return share.contiguous(), nxt.contiguous()


def msb_arith(x: torch.Tensor, x_next: torch.Tensor, bits: int = 64, shift: int = 0
              ) -> torch.Tensor:
    """Replicated ARITHMETIC share (integer scale, replica attached) of the sign bit of the
    replicated arithmetic value ``(x, x_next)``, read mod 2^bits: what :func:`msb` followed
    by :func:`b2a_bit_replicated` gives, in one round fewer (:func:`msb_masked`, unmasked
    locally)."""
    c, rho, _ = msb_masked(x, x_next, bits, shift)
    return ra.remember(*unmask(c, rho, ra.cached_next(rho)))


# ---------------------------------------------------------------- bit planes

def _transpose64(blocks: torch.Tensor) -> torch.Tensor:
    """(B, 64) int64 -> (B, 64) with bit i of ``out[b, j]`` = bit j of ``blocks[b, i]``: the
    64 x 64 bit-matrix transpose of each block by six swap stages (Hacker's Delight 7-3)."""
    out = blocks.clone()
    j, mask = 32, 0x00000000FFFFFFFF
    while j:
        halves = out.view(out.shape[0], 64 // (2 * j), 2, j)
        a, b = halves[:, :, 0, :], halves[:, :, 1, :]
        t = ((a >> j) ^ b) & mask  # the arithmetic shift's sign bits fall outside the mask
        b ^= t
        a ^= t << j
        j //= 2
        mask ^= mask << j
    return out


def to_planes(word: torch.Tensor) -> torch.Tensor:
    """int64 words (any shape, N elements) -> (64, ceil(N / 64)) int64 bit planes: bit i of
    ``planes[j, b]`` is bit j of element ``64 b + i`` (zero-padded)."""
    flat = word.reshape(-1)
    pad = (-flat.numel()) % 64
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return _transpose64(flat.view(-1, 64)).t().contiguous()


def to_planes_narrow(word: torch.Tensor, width: int) -> torch.Tensor:
    """int32 / int16 words (N elements, ``width`` 32 / 16) -> (width, ceil(N / 64 k) * k)
    int64 bit planes laid out like :func:`to_planes`'s (bit i of ``planes[j, b]`` is bit j of
    element ``64 b + i``), k = 64 / width, from 1/k of the transposes: the k parts of the
    elements share int64 words (part q in bits q width .. (q + 1) width - 1), so one 64-plane
    transpose yields the planes of all k parts."""
    k = 64 // width
    flat = word.reshape(-1)
    pad = (-flat.numel()) % (64 * k)
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    part = flat.numel() // k
    low = (1 << width) - 1
    packed = flat[:part].to(torch.long) & low
    for q in range(1, k):
        packed = packed | ((flat[q * part:(q + 1) * part].to(torch.long) & low) << (q * width))
    planes = to_planes(packed)  # (64, part / 64): rows q width .. (q + 1) width - 1 for part q
    return torch.cat([planes[q * width:(q + 1) * width] for q in range(k)], dim=1)


def to_planes32(word: torch.Tensor) -> torch.Tensor:
    """:func:`to_planes_narrow` of int32 words."""
    return to_planes_narrow(word, 32)


def from_plane(plane: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """One bit plane (``ceil(N / 64)`` words) -> the N bits as uint8 0/1 of ``shape``."""
    return bits_of(plane).reshape(-1)[:math.prod(shape)].reshape(shape)


# ---------------------------------------------------------------- binary -> arithmetic

def b2a_bit(b: Pair) -> torch.Tensor:
    """Additive arithmetic share (int64, integer scale) of a replicated 0/1 bit."""
    rank, _ = ra._rank_ws()
    b0, b1 = (t.to(torch.long) & 1 for t in b)
    shape, dev = b0.shape, b0.device
    zero = torch.zeros_like(b0)
    if rank == 0:
        c = b0 ^ b1
        rho = ra.rand_ring(shape, "prev", dev)
        ra.exchange([(c - rho, 1)], [])
        cp, b2p = (rho, c - rho), (zero, zero)
    elif rank == 1:
        got = torch.empty(shape, dtype=torch.long, device=dev)
        ra.exchange([], [(got, 0)])
        cp, b2p = (got, zero), (zero, b1)
    else:
        rho = ra.rand_ring(shape, "next", dev)
        ra.exchange([], [])  # nothing to send or receive: keeps the rounds aligned (lockstep)
        cp, b2p = (zero, rho), (b0, zero)
    z = ra.local_product(torch.mul, cp[0], cp[1], b2p[0], b2p[1])
    return cp[0] + b2p[0] - 2 * z


def b2a_bit_replicated(b: Pair) -> torch.Tensor:
    """Replicated arithmetic share (integer scale) of a replicated 0/1 bit in ONE round: this
    party's share, with the replica attached (:func:`.arith.remember`).

    Why: a bit from :func:`b2a_bit` is a 3-out-of-3 share, so the product it usually goes into
    (a selection, ReLU) first re-shares it: a round of its own. Here the re-share rides in
    the injection's round, for the same bytes in total (P0 two elements, P1 and P2 one).

    ``b = b2 + c (1 - 2 b2)`` with ``c = b0 ^ b1`` known to P0 and ``b2`` known to P1 and P2.
    Shares ``s0 = rho`` (P0-P2 stream), ``s1 = tau`` (P0-P1 stream), ``s2 = b - rho - tau``,
    which P1 and P2 both need. Masks ``w`` (P0-P1 stream) and ``w'`` (P0-P2 stream):

    * P0 -> P2: ``c + w``;   P1 -> P2: ``(1 - 2 b2) w + tau``;
    * P0 -> P1: ``c + w'``;  P2 -> P1: ``(1 - 2 b2) w' + rho``;
    * P2: ``s2 = (1 - 2 b2)(c + w) - ((1 - 2 b2) w + tau) + b2 - rho``, P1 symmetrically.

    Each receiver's two messages are masked by two stream values it does not hold (``w`` and
    ``tau`` for P2, ``w'`` and ``rho`` for P1): uniform and independent of the bit. P0
    receives nothing. Both streams of a pair are drawn in the same order by its two holders.
    """
    return _one_round(_inject_start(b))


def _inject_start(b: Pair, dtype: torch.dtype = torch.long) -> Step:
    """:func:`b2a_bit_replicated` as messages and a finish step (to share its round).
    ``dtype`` int16 (or int32): the bit's arithmetic sharing mod 2^16 (2^32), for bits that
    only enter products in that ring; 2 (4) bytes per word instead of 8."""
    rank, _ = ra._rank_ws()
    b0, b1 = (t.to(dtype) & 1 for t in b)
    shape, dev = b0.shape, b0.device

    def draw(which):
        word = ra.rand_ring(shape, which, dev)
        return word if dtype == torch.long else word.to(dtype)  # uniform low bits

    if rank == 0:
        c = b0 ^ b1
        tau, w = draw("next"), draw("next")
        rho, w2 = draw("prev"), draw("prev")
        return [(c + w, 2), (c + w2, 1)], [], lambda: ra.remember(rho, tau)
    b2 = b1 if rank == 1 else b0  # P1 holds (b1, b2), P2 holds (b2, b0)
    sign = 1 - 2 * b2
    got_c = torch.empty(shape, dtype=dtype, device=dev)
    got_m = torch.empty(shape, dtype=dtype, device=dev)
    if rank == 1:
        tau, w = draw("prev"), draw("prev")
        return ([(sign * w + tau, 2)], [(got_c, 0), (got_m, 2)],
                lambda: ra.remember(tau, sign * got_c - got_m + b2 - tau))
    rho, w2 = draw("next"), draw("next")
    return ([(sign * w2 + rho, 1)], [(got_c, 0), (got_m, 1)],
            lambda: ra.remember(sign * got_c - got_m + b2 - rho, rho))


def b2a(x: Pair, bits: int = 64) -> torch.Tensor:
    """Additive arithmetic share of a binary word, bit by bit (one round, P0 sends)."""
    planes = tuple(bits_of(t, 0, bits) for t in x)
    arith = b2a_bit(planes)
    weights = (1 << torch.arange(bits, dtype=torch.long, device=arith.device))
    return (arith * weights).sum(-1)


def reveal_binary(x: Pair) -> torch.Tensor:
    """Open a binary sharing to everyone (test helper): x_0 ^ x_1 ^ x_2."""
    rank, ws = ra._rank_ws()
    other = torch.empty_like(x[0])
    ra.exchange([(x[0], (rank + 1) % ws)], [(other, (rank - 1) % ws)])
    # party i now holds x_i, x_{i+1} and x_{i-1}
    return x[0] ^ x[1] ^ other
