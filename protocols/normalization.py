"""GroupNorm and LayerNorm on secret shares.

Mean and variance are local sums and one square per element; the only
nonlinear step is one inverse square root per group (or per row), passed in as
``rsqrt`` by :mod:`.functions`: CrypTen's ``inv_sqrt`` or the magnitude-guided
protocol, as the norm's own variant switch says.
The affine weight / bias may be public tensors or secret shares.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch

__all__ = ["group_norm", "layer_norm"]

if TYPE_CHECKING:
    from crypten.mpc import MPCTensor


def _normalise_last(x, eps: float, rsqrt: Callable):
    """(x - mean) * rsqrt(var + eps) over the last dimension of ``x``."""
    centred = x - x.mean(-1, keepdim=True)
    var = centred.square().mean(-1, keepdim=True)
    return _times_rsqrt(centred, var + eps, rsqrt)


def _times_rsqrt(t, v, rsqrt: Callable):
    """t * rsqrt(v); one product shallower when the rsqrt protocol takes ``times``."""
    if getattr(rsqrt, "accepts_times", False):
        return rsqrt(v, times=t)
    return t * rsqrt(v)


def _affine(y, weight, bias, shape):
    if weight is not None:
        y = y * _view(weight, shape)
    if bias is not None:
        y = y + _view(bias, shape)
    return y


def _view(t, shape):
    return t.reshape(shape) if torch.is_tensor(t) else t.view(*shape)


def group_norm(x: MPCTensor, num_groups: int,
               weight: Optional[Union[torch.Tensor, MPCTensor]] = None,
               bias: Optional[Union[torch.Tensor, MPCTensor]] = None, eps: float = 1e-5, *,
               rsqrt: Callable[[MPCTensor], MPCTensor]) -> MPCTensor:
    """GroupNorm of ``x`` (N, C, *) with ``num_groups`` groups."""
    n, c = x.size(0), x.size(1)
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels are not divisible into {num_groups} groups")
    spatial = list(x.size())[2:]
    if weight is not None and not torch.is_tensor(weight):
        return _group_norm_secret_weight(x, num_groups, weight, bias, eps, rsqrt)
    y = _normalise_last(x.reshape(n, num_groups, -1), eps, rsqrt)
    y = y.reshape(n, c, *spatial)
    return _affine(y, weight, bias, [1, c] + [1] * len(spatial))


def _group_norm_secret_weight(x, num_groups, weight, bias, eps, rsqrt):
    """GroupNorm with a secret per-channel weight w, one product shallower:
    ((x - mean) w) * rsqrt(var + eps) + b, where (x - mean)^2 (for the variance) and
    (x - mean) w are ONE batched product, taken before the rsqrt instead of after it.
    Same products and bytes as normalising first; two rounds fewer per call."""
    n, c = x.size(0), x.size(1)
    spatial = list(x.size())[2:]
    xg = x.reshape(n, num_groups, -1)
    centred = xg - xg.mean(-1, keepdim=True)
    w = weight.reshape(1, c, *([1] * len(spatial))).expand(n, c, *spatial)
    w = w.reshape(n, num_groups, -1)
    prod = crypten_stack([centred, centred]) * crypten_stack([centred, w])
    sq, cw = prod[0], prod[1]
    var = sq.mean(-1, keepdim=True)
    y = _times_rsqrt(cw, var + eps, rsqrt).reshape(n, c, *spatial)
    return _affine(y, None, bias, [1, c] + [1] * len(spatial))


def crypten_stack(tensors):
    import crypten

    return crypten.stack(tensors)


def layer_norm(x: MPCTensor, normalized_shape: Union[int, Sequence[int]],
               weight: Optional[Union[torch.Tensor, MPCTensor]] = None,
               bias: Optional[Union[torch.Tensor, MPCTensor]] = None, eps: float = 1e-5, *,
               rsqrt: Callable[[MPCTensor], MPCTensor]) -> MPCTensor:
    """LayerNorm over the trailing ``normalized_shape`` dimensions of ``x``."""
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    lead = list(x.size())[: x.dim() - len(shape)]
    if list(x.size())[x.dim() - len(shape):] != shape:
        raise ValueError(f"layer_norm: input {tuple(x.size())} does not end in {tuple(shape)}")
    y = _normalise_last(x.reshape(*lead, math.prod(shape)), eps, rsqrt)
    y = y.reshape(*lead, *shape)
    return _affine(y, weight, bias, shape)
