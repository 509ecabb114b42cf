"""Public entry points for every nonlinear function on secret shares.

Each call dispatches on :func:`cipherdm_torch.protocols.config.current`:
``"baseline"`` runs CrypTen's direct method (:mod:`.baseline`), ``"optimised"``
runs this package's protocol. Inputs and outputs are CrypTen ``MPCTensor``\\ s
of any shape. These functions open no cost region: the caller names what it
measures (the compiler's interpreter opens one region per graph node, named by
its op kind; wrap a direct call in ``cost.region(...)`` to see it apart).
"""

from __future__ import annotations

from typing import Sequence, Union

from cipherdm_torch.protocols import activations, baseline, config, exp_softmax, normalization
from cipherdm_torch.protocols import reciprocal as magnitude  # (``reciprocal`` is a function here)

__all__ = ["silu", "mish", "gelu", "geglu", "exp", "softmax", "reciprocal", "rsqrt",
           "group_norm", "layer_norm"]


# function -> the module of its optimised protocol
_OPTIMISED = {"silu": activations, "mish": activations, "gelu": activations,
              "exp": exp_softmax, "softmax": exp_softmax,
              "reciprocal": magnitude, "rsqrt": magnitude}


def _optimised(name):
    """The optimised implementation of ``name``."""
    return getattr(_OPTIMISED[name], name)


def _impl(name):
    variant = getattr(config.current(), name)
    return getattr(baseline, name) if variant == "baseline" else _optimised(name)


def silu(x):
    """x * sigmoid(x)."""
    return _impl("silu")(x)


def mish(x):
    """x * tanh(softplus(x))."""
    return _impl("mish")(x)


def gelu(x, approximate: str = "none"):
    """GELU, erf form (``approximate="none"``) or tanh form (``"tanh"``)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _impl("gelu")(x, approximate=approximate)


def geglu(x, dim: int = -1, approximate: str = "none"):
    """GEGLU: ``a * gelu(b)`` with ``a, b = x.chunk(2, dim)`` (diffusers' GEGLU order)."""
    size = x.size(dim)
    if size % 2:
        raise ValueError(f"geglu: dimension {dim} has odd size {size}")
    a, b = x.split(size // 2, dim)
    return a * gelu(b, approximate=approximate)


def exp(x):
    """exp(x) for x <= 0 (softmax inputs after subtracting the row max)."""
    return _impl("exp")(x)


def softmax(x, dim: int):
    """Softmax along ``dim``."""
    return _impl("softmax")(x, dim)


def reciprocal(x):
    """1 / x for x > 0."""
    return _impl("reciprocal")(x)


def rsqrt(x):
    """1 / sqrt(x) for x > 0."""
    return _impl("rsqrt")(x)


def _norm_rsqrt(name):
    variant = getattr(config.current(), name)
    return baseline.rsqrt if variant == "baseline" else _optimised("rsqrt")


def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """GroupNorm of x (N, C, *); weight / bias: torch tensor, MPCTensor or None."""
    return normalization.group_norm(x, num_groups, weight, bias, eps,
                                    rsqrt=_norm_rsqrt("group_norm"))


def layer_norm(x, normalized_shape: Union[int, Sequence[int]], weight=None, bias=None,
               eps: float = 1e-5):
    """LayerNorm over the trailing ``normalized_shape`` dimensions."""
    return normalization.layer_norm(x, normalized_shape, weight, bias, eps,
                                    rsqrt=_norm_rsqrt("layer_norm"))
