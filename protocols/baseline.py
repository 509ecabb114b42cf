"""CrypTen-direct implementations: the baseline every optimised protocol is measured against.

These call CrypTen's own approximations (exp by repeated squaring, sigmoid /
tanh through exp and reciprocal, softmax with an argmax-style max, 10-step
Newton reciprocal, inverse square root from a fixed initial guess) without
changing them, so costs and errors are CrypTen's.
"""

from __future__ import annotations

import math

__all__ = ["silu", "mish", "gelu", "exp", "softmax", "reciprocal", "rsqrt"]


def silu(x):
    return x * x.sigmoid()


def mish(x):
    """softplus(x) = relu(x) + log(1 + exp(-|x|)): CrypTen's ops in their stable order
    (``log(1 + exp(x))`` overflows to garbage above x ~ 10)."""
    softplus = x.relu() + ((-x.abs()).exp() + 1).log()
    return x * softplus.tanh()


def gelu(x, approximate="none"):
    """Tanh form for both: CrypTen's ``erf`` is a Taylor series that diverges for
    |x| > ~2.5 (garbage, not a baseline); the tanh form is within 1e-3 of erf GELU."""
    inner = (x + x * x.square() * 0.044715) * math.sqrt(2 / math.pi)
    return x * (inner.tanh() + 1) * 0.5


def exp(x):
    return x.exp()


def softmax(x, dim):
    return x.softmax(dim)


def reciprocal(x):
    return x.reciprocal()


def rsqrt(x):
    return x.inv_sqrt()
