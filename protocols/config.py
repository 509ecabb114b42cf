"""Which variant of each nonlinear protocol runs, and its accuracy knobs.

One switch per function selects ``"baseline"`` (CrypTen's direct method) or
``"optimised"`` (this package's protocols); knobs trade accuracy for cost.
Settings live in a per-process stack (each party is its own process), so a
``with use(...)`` block changes them for the code inside it only::

    with use("baseline"):                   # every function on CrypTen's methods
        ...
    with use(silu="baseline", exp_squarings=6):
        ...
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

__all__ = ["Settings", "FUNCTIONS", "VARIANTS", "TRUNCATIONS", "use", "current"]

VARIANTS = ("baseline", "optimised")
TRUNCATIONS = ("exact", "probabilistic")
FUNCTIONS = ("silu", "mish", "gelu", "exp", "softmax", "reciprocal", "rsqrt",
             "group_norm", "layer_norm")


@dataclass(frozen=True)
class Settings:
    """Active settings. Function fields hold a variant name; the rest are knobs."""

    silu: str = "optimised"
    mish: str = "optimised"
    gelu: str = "optimised"
    exp: str = "optimised"
    softmax: str = "optimised"
    reciprocal: str = "optimised"
    rsqrt: str = "optimised"
    group_norm: str = "optimised"
    layer_norm: str = "optimised"
    # activations: name of the coefficient set in coefficients.py ("<fn>" default)
    activation_fit: str = "default"
    # exp(x), x <= 0: exp(x) = b(x / 2^n)^(2^n), b(z) = 1 + z + z^2/2, n = exp_squarings
    exp_squarings: int = 6
    exp_clip: float = 32.0  # inputs below -exp_clip give exactly 0 when exp_clip_compare
    exp_clip_compare: bool = True  # one comparison per element; off: correct only down to -2^(n+1)
    # reciprocal / rsqrt: magnitude guess from comparisons with 2^j, j in [lo, hi], then Newton
    magnitude_lo: int = -16
    magnitude_hi: int = 24
    reciprocal_iters: int = 2
    rsqrt_iters: int = 2
    # softmax row max: "tree" (pairwise, n - 1 comparisons per row) or CrypTen's max
    softmax_max_method: str = "tree"  # "tree" (pairwise, n-1 comparisons) or "crypten"
    # rss backend fixed-point truncation: "exact" (P2-assisted, error <= 1 unit for |x| < 2^62,
    # 2 rounds, 16 B per element from two parties and 32 B from the helper, which rotates per
    # call: 21.3 B per party on average) or "probabilistic" (ABY3's two-share
    # truncation, 1 round, 8 B per party, wrong by ~2^64/y with probability ~|x|/2^64;
    # for benchmarks only)
    truncation: str = "exact"

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)


_STACK = [Settings()]


def current() -> Settings:
    """The settings in force in this process."""
    return _STACK[-1]


@contextmanager
def use(variant: Optional[str] = None, **knobs) -> Iterator[Settings]:
    """Run a block with ``variant`` for every function and/or individual overrides.

    ``variant`` is "baseline" or "optimised" (None keeps the current choices);
    keyword arguments name a function (value: a variant) or a knob.
    """
    changes = {}
    if variant is not None:
        _check_variant("variant", variant)
        changes.update({f: variant for f in FUNCTIONS})
    fields = {f.name for f in dataclasses.fields(Settings)}
    for key, value in knobs.items():
        if key not in fields:
            raise TypeError(f"unknown protocol setting {key!r}; known: {sorted(fields)}")
        if key in FUNCTIONS:
            _check_variant(key, value)
        if key == "truncation" and value not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {value!r}")
        changes[key] = value
    _STACK.append(current().replace(**changes))
    try:
        yield current()
    finally:
        _STACK.pop()


def _check_variant(name: str, value: str) -> None:
    if value not in VARIANTS:
        raise ValueError(f"{name}: variant must be one of {VARIANTS}, got {value!r}")
