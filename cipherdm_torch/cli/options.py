"""Argument types shared by several subcommands (number checks live in :mod:`cipherdm_torch.errors`)."""

from __future__ import annotations

import argparse
from typing import Tuple

from cipherdm_torch.errors import positive_float

__all__ = ["ints", "ints_or_none", "sample_rate"]


def ints(s: str) -> Tuple[int, ...]:
    try:
        values = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {s!r}")
    return values


def ints_or_none(s: str) -> Tuple[int, ...]:
    return ints(s) if s.strip() else ()


def sample_rate(s: str) -> float:
    v = positive_float(s)
    if v > 1:
        raise argparse.ArgumentTypeError(f"a sample rate lies in (0, 1], got {s!r}")
    return v
