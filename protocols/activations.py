"""SiLU, Mish and GELU as window-limited polynomials (see :mod:`.piecewise`).

Each costs one batched comparison (sign and window, 2 bits per element) plus
about ``degree + 2`` multiplications; coefficients come from
:mod:`.coefficients` (regenerate with ``python -m tools.fit_coefficients``).
Outside the window the result is exactly relu(x); the fits are continuous at
x = 0 and at |x| = T. :func:`reference` is the plaintext twin.
"""

from __future__ import annotations

import torch
from crypten.mpc import MPCTensor

from cipherdm_torch.protocols import config
from cipherdm_torch.protocols.coefficients import COEFFICIENTS
from cipherdm_torch.protocols.piecewise import relu_plus_window

__all__ = ["silu", "mish", "gelu", "reference", "entry"]


def entry(name: str) -> dict:
    """Coefficient set for ``name`` (``activation_fit`` knob may select ``"<name>:<tag>"``)."""
    tag = config.current().activation_fit
    key = name if tag == "default" else f"{name}:{tag}"
    if key not in COEFFICIENTS:
        raise KeyError(f"no coefficient set {key!r}; regenerate with "
                       f"python -m tools.fit_coefficients")
    return COEFFICIENTS[key]


def _apply(x, name):
    e = entry(name)
    return relu_plus_window(x, e["bound"], e["pos"], e["neg"])


def silu(x: MPCTensor) -> MPCTensor:
    return _apply(x, "silu")


def mish(x: MPCTensor) -> MPCTensor:
    return _apply(x, "mish")


def gelu(x: MPCTensor, approximate: str = "none") -> MPCTensor:
    return _apply(x, "gelu_tanh" if approximate == "tanh" else "gelu")


def reference(name: str, x: torch.Tensor) -> torch.Tensor:
    """Plaintext value of the optimised approximation ``name`` (silu, mish, gelu, gelu_tanh)."""
    e = entry(name)
    t = 2 * x.abs().double() / e["bound"] - 1
    pos = sum(a * t ** k for k, a in enumerate(e["pos"]))
    neg = sum(a * t ** k for k, a in enumerate(e["neg"]))
    p = torch.where(x < 0, neg, pos)
    y = x.double().clamp(min=0) + torch.where(x.abs() < e["bound"], p, torch.zeros_like(p))
    return y.to(x.dtype)
