"""Public entry points for every nonlinear function on secret shares.

Each call dispatches on :func:`cipherdm_torch.protocols.config.current`:
``"baseline"`` runs CrypTen's direct method (:mod:`.baseline`), ``"optimised"``
runs this package's protocol. Inputs and outputs are CrypTen ``MPCTensor``\\ s
of any shape. These functions open no cost region: the caller names what it
measures (the compiler's interpreter opens one region per graph node, named by
its op kind; wrap a direct call in ``cost.region(...)`` to see it apart).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from cipherdm_torch.protocols import activations, baseline, config, exp_softmax, normalization
from cipherdm_torch.protocols import reciprocal as magnitude  # (``reciprocal`` is a function here)

__all__ = ["silu", "mish", "gelu", "geglu", "exp", "softmax", "softmax_matmul", "reciprocal",
           "rsqrt", "group_norm", "layer_norm"]

if TYPE_CHECKING:
    from crypten.mpc import MPCTensor


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


def silu(x: MPCTensor) -> MPCTensor:
    """x * sigmoid(x)."""
    return _impl("silu")(x)


def mish(x: MPCTensor) -> MPCTensor:
    """x * tanh(softplus(x))."""
    return _impl("mish")(x)


def gelu(x: MPCTensor, approximate: str = "none") -> MPCTensor:
    """GELU, erf form (``approximate="none"``) or tanh form (``"tanh"``)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _impl("gelu")(x, approximate=approximate)


def geglu(x: MPCTensor, dim: int = -1, approximate: str = "none") -> MPCTensor:
    """GEGLU: ``a * gelu(b)`` with ``a, b = x.chunk(2, dim)`` (diffusers' GEGLU order)."""
    size = x.size(dim)
    if size % 2:
        raise ValueError(f"geglu: dimension {dim} has odd size {size}")
    a, b = x.split(size // 2, dim)
    return a * gelu(b, approximate=approximate)


def exp(x: MPCTensor) -> MPCTensor:
    """exp(x) for x <= 0 (softmax inputs after subtracting the row max)."""
    return _impl("exp")(x)


def softmax(x: MPCTensor, dim: int) -> MPCTensor:
    """Softmax along ``dim``."""
    return _impl("softmax")(x, dim)


def softmax_matmul(x: MPCTensor, v: Union[MPCTensor, torch.Tensor]) -> MPCTensor:
    """softmax(x, -1) @ v (attention's probabilities times its values), as the ``softmax``
    variant says: CrypTen's softmax then the product, or the optimised protocol, which
    normalises after the product (:func:`.exp_softmax.softmax_matmul`)."""
    if config.current().softmax == "baseline":
        return baseline.softmax(x, -1).matmul(v)
    return exp_softmax.softmax_matmul(x, v)


def reciprocal(x: MPCTensor) -> MPCTensor:
    """1 / x for x > 0."""
    return _impl("reciprocal")(x)


def rsqrt(x: MPCTensor) -> MPCTensor:
    """1 / sqrt(x) for x > 0."""
    return _impl("rsqrt")(x)


def _norm_rsqrt(name):
    variant = getattr(config.current(), name)
    return baseline.rsqrt if variant == "baseline" else _optimised("rsqrt")


def group_norm(x: MPCTensor, num_groups: int,
               weight: Optional[Union[torch.Tensor, MPCTensor]] = None,
               bias: Optional[Union[torch.Tensor, MPCTensor]] = None,
               eps: float = 1e-5) -> MPCTensor:
    """GroupNorm of x (N, C, *); weight / bias: torch tensor, MPCTensor or None."""
    return normalization.group_norm(x, num_groups, weight, bias, eps,
                                    rsqrt=_norm_rsqrt("group_norm"))


def layer_norm(x: MPCTensor, normalized_shape: Union[int, Sequence[int]],
               weight: Optional[Union[torch.Tensor, MPCTensor]] = None,
               bias: Optional[Union[torch.Tensor, MPCTensor]] = None,
               eps: float = 1e-5) -> MPCTensor:
    """LayerNorm over the trailing ``normalized_shape`` dimensions."""
    return normalization.layer_norm(x, normalized_shape, weight, bias, eps,
                                    rsqrt=_norm_rsqrt("layer_norm"))
