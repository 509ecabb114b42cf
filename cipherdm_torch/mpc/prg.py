"""Keyed cryptographic randomness for the MPC protocols (AES-128 in counter mode).

Why: zero sharings, masks and re-randomisations hide secrets only if the third party
cannot predict them. ``torch.Generator`` (MT19937) is not a cryptographic generator and
keeps only 32 bits of its seed, so a party could search the seed space and strip the
mask off a share. Here every *pairwise* stream is AES-128-CTR under a 128-bit key that
the two parties agreed over their mutually authenticated TLS link
(:mod:`cipherdm_torch.mpc.channel`); the key never travels in the clear. Every *local*
secret random value comes from the operating system's CSPRNG (``os.urandom``).

Both parties of a pair draw the same number of bytes in the same order, so their
streams stay aligned (exactly as the protocols already used CrypTen's generators).
Naming follows CrypTen: on party ``i``, ``"next"`` is the stream shared with party
``i + 1`` and ``"prev"`` the one shared with party ``i - 1``.
"""

from __future__ import annotations

import contextvars
import os
from typing import Dict, List, Optional, Sequence

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["KeyStream", "install_streams", "stream", "has_streams", "local_ring", "local_bytes",
           "clear_streams", "allow_insecure_generators", "insecure_generators_allowed",
           "fork_streams", "use_branch_streams"]

_ZEROS = bytes(1 << 22)  # 4 MiB of plaintext zeros: keystream = AES-CTR(zeros)


class KeyStream:
    """An AES-128-CTR keystream, consumed front to back (no byte is ever reused)."""

    def __init__(self, key: bytes, nonce: bytes = bytes(16)):
        if len(key) != 16:
            raise ValueError(f"a stream key has 16 bytes (128 bits), got {len(key)}")
        if len(nonce) != 16:
            raise ValueError("the initial counter block has 16 bytes")
        self._enc = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
        self.drawn = 0  # bytes consumed so far (both parties of a pair must agree)

    def bytes(self, n: int) -> torch.Tensor:
        """The next ``n`` keystream bytes as a uint8 tensor."""
        out = torch.empty(n + 16, dtype=torch.uint8)
        view = memoryview(out.numpy())
        pos = 0
        while pos < n:
            k = min(n - pos, len(_ZEROS))
            self._enc.update_into(memoryview(_ZEROS)[:k], view[pos:pos + k + 15])
            pos += k
        self.drawn += n
        return out[:n]

    def ring(self, size: Sequence[int], device: Optional[torch.device] = None) -> torch.Tensor:
        """Uniform elements of Z_2^64 (int64) of shape ``size``."""
        size = torch.Size(size)
        out = self.bytes(8 * size.numel()).view(torch.int64).reshape(size)
        return out if device is None or torch.device(device).type == "cpu" else out.to(device)

    def bits(self, size: Sequence[int], device: Optional[torch.device] = None) -> torch.Tensor:
        """Uniform 0/1 values (uint8) of shape ``size``: 8 per keystream byte."""
        size = torch.Size(size)
        n = size.numel()
        raw = self.bytes((n + 7) // 8)
        bits = ((raw.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:n]
        out = bits.reshape(size)
        return out if device is None or torch.device(device).type == "cpu" else out.to(device)


_STREAMS: Dict[str, KeyStream] = {}
_INSECURE = [False]


def allow_insecure_generators(flag: bool = True) -> None:
    """Let the protocols fall back to CrypTen's MT19937 generators when no keyed streams
    exist: set only by a party started with ``secure=False`` (overhead benchmarks)."""
    _INSECURE[0] = bool(flag)


def insecure_generators_allowed() -> bool:
    return _INSECURE[0]


def install_streams(streams: Dict[str, KeyStream]) -> None:
    """Set this process's pairwise streams (``"prev"``, ``"next"``); done by the channel set-up."""
    _STREAMS.clear()
    _STREAMS.update(streams)


def clear_streams() -> None:
    _STREAMS.clear()


def has_streams() -> bool:
    return bool(_STREAMS)


# a lockstep branch's own streams (fork_streams); a context variable, so each branch (a
# coroutine in the caller's thread) sees its own
_BRANCH_STREAMS: contextvars.ContextVar = contextvars.ContextVar("prg_branch_streams",
                                                                  default=None)


def fork_streams(count: int) -> List[Dict[str, KeyStream]]:
    """``count`` independent sets of pairwise streams, keyed by 16 bytes drawn from each of
    this party's streams (its neighbour draws the same bytes from its side of the pair).

    Why: branches run side by side (:mod:`cipherdm_torch.protocols.replicated.lockstep`)
    draw between different rounds on the two ends of a pair (a truncation helper draws its
    output masks after a round that the other parties use to draw theirs), so one shared
    stream would hand the same bytes to different variables. Each branch draws from its own
    streams in its own program order, the same on both parties of every pair."""
    out: List[Dict[str, KeyStream]] = [{} for _ in range(count)]
    for which in ("next", "prev"):
        keys = stream(which).bytes(16 * count).numpy().tobytes()
        for i in range(count):
            out[i][which] = KeyStream(keys[16 * i:16 * (i + 1)])
    return out


def use_branch_streams(streams: Optional[Dict[str, KeyStream]]) -> None:
    """Make ``streams`` (from :func:`fork_streams`) the pairwise streams of the current context
    (a lockstep branch); None: the process's own again."""
    _BRANCH_STREAMS.set(streams)


def stream(which: str) -> KeyStream:
    """The pairwise stream ``which`` ("prev" / "next") of this party (of this lockstep branch)."""
    own = _BRANCH_STREAMS.get()
    if own is not None:
        return own[which]
    try:
        return _STREAMS[which]
    except KeyError:
        raise RuntimeError(
            f"no keyed pairwise stream {which!r}: the secure channels are not set up in this "
            f"process (parties are started by cipherdm_torch.launch / PartyPool / torchrun, "
            f"which agree the pair keys over authenticated TLS links)") from None


def local_bytes(n: int) -> torch.Tensor:
    """``n`` bytes from the OS CSPRNG (uint8 tensor)."""
    return torch.frombuffer(bytearray(os.urandom(n)), dtype=torch.uint8) if n else \
        torch.empty(0, dtype=torch.uint8)


def local_ring(size: Sequence[int], device: Optional[torch.device] = None,
               bits: Optional[int] = None) -> torch.Tensor:
    """Uniform int64 ring elements (or ``bits``-bit non-negative values) from the OS CSPRNG;
    draws only the bytes ``bits`` needs (1, 2, 4 or 8 per element)."""
    size = torch.Size(size)
    width = 8 if bits is None or bits > 32 else 4 if bits > 16 else 2 if bits > 8 else 1
    dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[width]
    out = local_bytes(width * size.numel()).view(dtype).to(torch.int64).reshape(size)
    if bits is not None and bits < 64:
        out = out & ((1 << bits) - 1)
    return out if device is None or torch.device(device).type == "cpu" else out.to(device)
