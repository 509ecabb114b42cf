"""CrypTen-direct implementations: the baseline every optimised protocol is measured against.

These call CrypTen's own approximations (exp by repeated squaring, sigmoid /
tanh through exp and reciprocal, softmax with an argmax-style max, 10-step
Newton reciprocal, inverse square root from a fixed initial guess) without
changing them, so costs and errors are CrypTen's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crypten.mpc import MPCTensor

__all__ = ["silu", "mish", "gelu", "exp", "softmax", "reciprocal", "rsqrt"]


def silu(x: MPCTensor) -> MPCTensor:
    return x * x.sigmoid()


def mish(x: MPCTensor) -> MPCTensor:
    """softplus(x) = relu(x) + log(1 + exp(-|x|)): CrypTen's ops in their stable order
    (``log(1 + exp(x))`` overflows to garbage above x ~ 10)."""
    softplus = x.relu() + ((-x.abs()).exp() + 1).log()
    return x * softplus.tanh()


def gelu(x: MPCTensor, approximate: str = "none") -> MPCTensor:
    """Tanh form for both: CrypTen's ``erf`` is a Taylor series that diverges for
    |x| > ~2.5 (garbage, not a baseline); the tanh form is within 1e-3 of erf GELU."""
    inner = (x + x * x.square() * 0.044715) * math.sqrt(2 / math.pi)
    return x * (inner.tanh() + 1) * 0.5


def exp(x: MPCTensor) -> MPCTensor:
    return x.exp()


def softmax(x: MPCTensor, dim: int) -> MPCTensor:
    return x.softmax(dim)


def reciprocal(x: MPCTensor) -> MPCTensor:
    return x.reciprocal()


def rsqrt(x: MPCTensor) -> MPCTensor:
    return x.inv_sqrt()
