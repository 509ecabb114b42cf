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

from cipherdm_torch.protocols import config
from cipherdm_torch.protocols.piecewise import square_untruncated
from cipherdm_torch.protocols.side_by_side import run_together

__all__ = ["group_norm", "layer_norm"]

if TYPE_CHECKING:
    from crypten.mpc import MPCTensor


def _normalise_last(x, eps: float, rsqrt: Callable):
    """(x - mean) * rsqrt(var + eps) over the last dimension of ``x``."""
    centred = x - x.mean(-1, keepdim=True)
    if _folds(centred):
        var, count = _mean_square(centred) + eps, 1
    else:
        var, count = _variance(centred.square(), eps, rsqrt)
    return _times_rsqrt(centred, var, rsqrt, count=count)


def _takes_count(rsqrt: Callable) -> bool:
    """Whether ``rsqrt`` inverts x / count itself (:func:`.reciprocal.rsqrt`'s ``count``)."""
    return getattr(rsqrt, "accepts_count", False) and getattr(rsqrt, "accepts_times", False)


def _variance(sq, eps: float, rsqrt: Callable):
    """(v, count) with v / count = var + eps, from the truncated squares ``sq`` (n per row).
    Where ``rsqrt`` takes a count: the SUM n (var + eps) with count n, since the mean's
    division by n would be a truncation (two rounds) and the rsqrt divides by n for free;
    else the mean with count 1."""
    if _takes_count(rsqrt):
        n = sq.size(-1)
        return sq.sum(-1, keepdim=True) + eps * n, n
    return sq.mean(-1, keepdim=True) + eps, 1


def _folds(t) -> bool:
    """Whether :func:`_mean_square` of ``t`` takes ONE truncation: where the sum of the
    UNtruncated squares, n var 2^(2f), stays inside the exact truncation's range 2^62 for every
    variance the rsqrt covers (n 2^magnitude_hi <= 2^(61 - 2f): calibrated GroupNorm ranges,
    small groups), on a protocol whose truncation is exact (``config.truncation_is_exact``:
    the rss backend)."""
    bits = round(math.log2(t.encoder.scale))
    return config.truncation_is_exact() and \
        t.size(-1) * 2.0 ** config.current().magnitude_hi <= 2.0 ** (61 - 2 * bits)


def _mean_square(t):
    """Mean of ``t^2`` over the last dimension (keepdim) where :func:`_folds`: the squares
    summed untruncated and divided by n 2^f in one truncation (2 rounds and the per-element
    truncation's bytes fewer than squaring first; elsewhere :func:`_variance`)."""
    total = square_untruncated(t).sum(-1, keepdim=True)  # n E[t^2] 2^(2f), raw integers
    return total.div(t.size(-1) * int(t.encoder.scale))


def _times_rsqrt(t, v, rsqrt: Callable, count: int = 1):
    """t * rsqrt(v / count); one product shallower when the rsqrt protocol takes ``times``
    (``count`` > 1 only for one that takes it, see :func:`_takes_count`).

    ``times`` rides in a product with weights of 32 fractional bits (raw values ~2^50 for
    normalised outputs of a few units): only where truncation is exact
    (:func:`.config.truncation_is_exact`). CrypTen's beaver truncation is wrong with
    probability ~|raw| / 2^64 per element, ~2^-14 there: several garbage entries per UNet
    forward; so on it the activations meet only the finished rsqrt, in an ordinary product."""
    kwargs = {"count": count} if count != 1 else {}
    if getattr(rsqrt, "accepts_times", False) and config.truncation_is_exact():
        return rsqrt(v, times=t, **kwargs)
    return t * rsqrt(v, **kwargs)


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
    if _folds(centred):  # (x - mean) w beside the one-truncation variance: rounds shared
        cw, var = run_together(lambda: centred * w, lambda: _mean_square(centred))
        var, count = var + eps, 1
    else:
        prod = crypten_stack([centred, centred]) * crypten_stack([centred, w])
        sq, cw = prod[0], prod[1]
        var, count = _variance(sq, eps, rsqrt)
    y = _times_rsqrt(cw, var, rsqrt, count=count).reshape(n, c, *spatial)
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
