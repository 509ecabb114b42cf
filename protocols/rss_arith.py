"""Replicated three-party arithmetic sharing over Z_2^64, dealer-free and re-randomised.

Representation (why it looks like this): a secret ``x`` is split into three additive
shares ``x = x_0 + x_1 + x_2 (mod 2^64)``; party ``i`` keeps ``x_i`` as the
``share`` of CrypTen's :class:`ArithmeticSharedTensor` (so every local CrypTen op,
``get_plain_text`` and the other developers' code keep working unchanged) and,
*when it has it*, the replica ``x_{i+1}`` cached on the share tensor itself
(:func:`cached_next` / :func:`remember`). The cache is valid only while the
share tensor is the same object at the same ``_version``; any CrypTen op that
builds a new share or edits it in place silently invalidates it, and the next
multiplication then re-shares on demand (:func:`replicate`: every party sends
its ``x_i`` to the previous party, 8 bytes per element, one round).

Multiplication of replicated ``x, y``: party ``i`` computes locally
``z_i = x_i y_i + x_i y_{i+1} + x_{i+1} y_i + alpha_i`` where ``alpha`` is a
pseudo-random sharing of zero from CrypTen's pairwise PRG seeds
(``crypten.generators["next"]`` is shared with party ``i+1``, ``["prev"]`` with
``i-1``). ``z`` is a fresh, uniformly re-randomised 3-out-of-3 sharing that
costs *no* communication; it becomes replicated either by :func:`truncate`
(fixed-point products, one element sent per party) or lazily by the next
operation that needs the replica. No dealer and no Beaver triple is involved.

Truncation (:func:`truncate_shares`, ABY3's share truncation): P2 hands ``z_2``
to P1, so P0 holds ``a = z_0`` and P1 holds ``b = z_1 + z_2`` with ``a`` uniform;
each divides locally (floor), P1 masks with ``r`` (PRG shared by P1 and P2) and
the three new shares ``(a >> d, (b >> d) - r, r)`` are made replicated by
P0 -> P2 and P1 -> P0. Cost: one element sent per party, two message hops (each
party waits once). Error: the result is ``floor(x / 2^d)`` or one less (at most
one unit in the last place, 2^-16 with CrypTen's default 16 fractional bits),
except with probability about ``|x| / 2^64`` (``x`` the encoded product; for a
product of magnitude 2^k at 16 fractional bits: 2^(k-32)) where it is off by
about 2^(64-d) (a wrap of the two-party shares). CrypTen's own truncation has the
same failure rate.

This module is also the CrypTen ``protocol`` named ``"rss"`` (see
:mod:`cipherdm_torch.protocols.rss_backend`): it exposes ``mul``, ``matmul``,
``conv1d``, ``conv2d``, ``conv_transpose1d``, ``conv_transpose2d``, ``square``
and ``truncate`` with the signatures CrypTen's ``ArithmeticSharedTensor`` calls.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

import cipherdm_torch  # noqa: F401  (CrypTen compatibility layer before crypten)
import crypten
import crypten.communicator as comm

__all__ = [
    "RING_BITS", "rand_ring", "zero_share", "cached_next", "remember", "replicate",
    "replicate_many", "local_product", "truncate_shares", "reshare_output", "transcript",
    "mul", "matmul", "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d", "square",
    "truncate",
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


def _gen(which: str, device=None) -> torch.Generator:
    device = torch.device("cpu") if device is None else torch.device(device)
    return crypten.generators[which][device]


def rand_ring(size, which: str, device=None) -> torch.Tensor:
    """Uniform int64 ring elements from the pairwise generator ``which`` ("prev"/"next")."""
    return torch.randint(-(2 ** 63), 2 ** 63 - 1, tuple(size), generator=_gen(which, device),
                         dtype=torch.long, device=device)


def zero_share(size, device=None) -> torch.Tensor:
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


def exchange(sends: Sequence[Tuple[torch.Tensor, int]], recvs: Sequence[Tuple[torch.Tensor, int]]):
    """Post all sends and receives, then wait: one communication round (metered)."""
    c = comm.get()
    reqs = [c.isend(t.contiguous(), dst) for t, dst in sends]
    # gloo receives only into contiguous memory (empty_like keeps a view's strides)
    landing = [buf if buf.is_contiguous() else torch.empty(buf.shape, dtype=buf.dtype)
               for buf, _ in recvs]
    reqs += [c.irecv(land, src=src) for land, (_, src) in zip(landing, recvs)]
    for r in reqs:
        r.wait()
    for land, (buf, _) in zip(landing, recvs):
        if land is not buf:
            buf.copy_(land)
        transcript.add(buf)


# ---------------------------------------------------------------- replica cache

def cached_next(share: torch.Tensor) -> Optional[torch.Tensor]:
    """The replica ``x_{i+1}`` of ``share`` if it is still valid, else None."""
    entry = getattr(share, _CACHE_ATTR, None)
    if entry is not None and entry[0] == share._version:
        return entry[1]
    base = share._base
    if base is None:
        return None
    entry = getattr(base, _CACHE_ATTR, None)
    # a view of a cached contiguous tensor: the same view of its (contiguous) replica
    if (entry is not None and entry[0] == base._version and base.is_contiguous()
            and base.storage_offset() == 0 and entry[1].is_contiguous()
            and entry[1].shape == base.shape):
        return entry[1].as_strided(share.size(), share.stride(), share.storage_offset())
    return None


def remember(share: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """Attach the replica ``nxt`` to ``share`` (valid until ``share`` changes)."""
    setattr(share, _CACHE_ATTR, (share._version, nxt))
    return share


def replicate_many(shares: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Replicas of several shares; the missing ones are re-shared together in one round."""
    rank, ws = _rank_ws()
    out = [cached_next(s) for s in shares]
    missing = [k for k, r in enumerate(out) if r is None]
    if missing:
        prev, nxt = (rank - 1) % ws, (rank + 1) % ws
        bufs = [torch.empty_like(shares[k], memory_format=torch.contiguous_format)
                for k in missing]
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
                  y_next: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Re-randomised 3-out-of-3 share of ``op(x, y)`` for a bilinear ``op`` (no communication)."""
    z = op(x, y + y_next, *args, **kwargs) + op(x_next, y, *args, **kwargs)
    return z + zero_share(z.size(), device=z.device)


def reshare_output(z: torch.Tensor) -> torch.Tensor:
    """Make the additive share ``z`` replicated (caches and returns the replica)."""
    return replicate(z)


def _divide(v: torch.Tensor, y) -> torch.Tensor:
    if isinstance(y, int) and y > 0 and y & (y - 1) == 0:
        return v >> (y.bit_length() - 1)
    return torch.div(v, y, rounding_mode="floor")


def truncate_shares(z: torch.Tensor, y) -> Tuple[torch.Tensor, torch.Tensor]:
    """Divide the additive sharing ``z`` by the public positive integer ``y``.

    Returns this party's new share and its replica (replicated output, re-randomised).
    """
    rank, _ = _rank_ws()
    if torch.is_tensor(y):
        z = z.expand(torch.broadcast_shapes(z.shape, y.shape)).contiguous()
    size, dev = z.size(), z.device
    if rank == 0:
        t0 = _divide(z, y)
        t1 = torch.empty_like(t0)
        exchange([(t0, 2)], [(t1, 1)])
        return t0, t1
    if rank == 1:
        z2 = torch.empty_like(z)
        exchange([], [(z2, 2)])
        r = rand_ring(size, "next", dev)
        t1 = _divide(z + z2, y) - r
        exchange([(t1, 0)], [])
        return t1, r
    r = rand_ring(size, "prev", dev)
    t0 = torch.empty_like(z)
    exchange([(z, 1)], [(t0, 0)])
    return r, t0


# ---------------------------------------------------------------- CrypTen protocol interface

def _bilinear(op: Callable, x, y, *args, **kwargs):
    xs, ys = x.share, y.share
    x_next, y_next = replicate_many([xs, ys]) if xs is not ys else [replicate(xs)] * 2
    result = x.shallow_copy()
    result.share = local_product(op, xs, x_next, ys, y_next, *args, **kwargs)
    return result


def mul(x, y):
    return _bilinear(torch.mul, x, y)


def matmul(x, y):
    return _bilinear(torch.matmul, x, y)


def conv1d(x, y, **kwargs):
    return _bilinear(torch.conv1d, x, y, **kwargs)


def conv2d(x, y, **kwargs):
    return _bilinear(torch.conv2d, x, y, **kwargs)


def conv_transpose1d(x, y, **kwargs):
    return _bilinear(torch.conv_transpose1d, x, y, **kwargs)


def conv_transpose2d(x, y, **kwargs):
    return _bilinear(torch.conv_transpose2d, x, y, **kwargs)


def square(x):
    xs = x.share
    xn = replicate(xs)
    result = x.shallow_copy()
    z = xs * (xs + 2 * xn)  # x_i^2 + 2 x_i x_{i+1}: the three cross terms of x^2
    result.share = z + zero_share(z.size(), device=z.device)
    return result


def truncate(x, y):
    """In-place division of CrypTen share ``x`` by a public integer (scalar or tensor)."""
    if torch.is_tensor(y):
        if y.numel() == 1:
            y = int(y.item())
        else:
            y = y.to(torch.long)
    if isinstance(y, int) and y <= 0:
        raise ValueError(f"truncation needs a positive divisor, got {y}")
    share, nxt = truncate_shares(x.share, y)
    x.share = share
    remember(x.share, nxt)
    return x
