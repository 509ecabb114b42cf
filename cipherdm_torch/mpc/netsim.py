"""Emulated network links between the parties (LAN / WAN), at the communicator.

The kernel on the development machines has no ``netem`` queueing discipline,
so latency cannot be added with ``tc``. Instead each party delays its own
traffic where it passes through CrypTen's communicator (see :mod:`.cost`):
every round (a point where the party waits for a peer) costs one one-way
latency, and every byte sent costs ``8 / bandwidth`` seconds. Compute and
real loopback transfer still happen, so the measured time is loopback time
plus the emulated link, a slight overestimate of a real link where sending and
computing overlap.

Select a link per party with :func:`activate` or the environment variable
``CIPHERDM_LINK`` (``lan``, ``wan`` or ``<Mbit/s>:<ms>``), read by
:func:`cipherdm_torch.mpc.runtime.init_party`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

from cipherdm_torch.mpc import cost

__all__ = ["LinkProfile", "PROFILES", "activate", "deactivate", "from_env"]


@dataclass(frozen=True)
class LinkProfile:
    name: str
    bandwidth_bps: float  # bits per second each way
    latency_s: float  # one-way delay per round

    def delay(self, sent_bytes: int, rounds: int) -> float:
        return rounds * self.latency_s + 8.0 * sent_bytes / self.bandwidth_bps


PROFILES = {
    "lan": LinkProfile("lan", 1e9, 0.1e-3),  # 1 Gbit/s, 0.1 ms
    "wan": LinkProfile("wan", 100e6, 40e-3),  # 100 Mbit/s, 40 ms
}

_active: Optional[LinkProfile] = None


def parse(spec: str) -> LinkProfile:
    """``lan`` | ``wan`` | ``<Mbit/s>:<ms>`` -> LinkProfile."""
    if spec in PROFILES:
        return PROFILES[spec]
    try:
        mbit, ms = (float(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(f"link {spec!r}: use 'lan', 'wan' or '<Mbit/s>:<ms>'") from None
    if mbit <= 0 or ms < 0:
        raise ValueError(f"link {spec!r}: bandwidth must be > 0 and latency >= 0")
    return LinkProfile(spec, mbit * 1e6, ms * 1e-3)


def _hook(sent: int, received: int, rounds: int) -> None:
    if _active is not None:
        wait = _active.delay(sent, rounds)
        if wait > 0:
            time.sleep(wait)


def activate(profile: LinkProfile | str) -> LinkProfile:
    """Emulate ``profile`` for this party's traffic from now on."""
    global _active
    _active = parse(profile) if isinstance(profile, str) else profile
    if _hook not in cost.HOOKS:
        cost.HOOKS.append(_hook)
    return _active


def deactivate() -> None:
    global _active
    _active = None


def from_env() -> Optional[LinkProfile]:
    spec = os.environ.get("CIPHERDM_LINK", "").strip()
    return activate(spec) if spec and spec != "loopback" else None
