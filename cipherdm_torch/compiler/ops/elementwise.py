"""Element-wise arithmetic on secret shares (add / sub / mul / div / pow / neg / square) and
sums / means (local reductions of the shares)."""

from __future__ import annotations

import torch

from cipherdm_torch.mpc import cost

from .registry import is_secret, local, nonlinear, register

aten = torch.ops.aten


def _scaled(x, alpha):
    return x if alpha == 1 else x * alpha


def _size(x):
    if is_secret(x):
        return tuple(x.size())
    return tuple(x.shape) if torch.is_tensor(x) else ()


def _broadcast(a, b):
    """Expand both operands to their broadcast shape (CrypTen adds shares in place)."""
    shape = torch.broadcast_shapes(_size(a), _size(b))

    def grow(x):
        if _size(x) == shape:
            return x
        if is_secret(x):
            return local(x, lambda s: s.expand(shape).contiguous())
        return torch.as_tensor(x).expand(shape).contiguous() if torch.is_tensor(x) else x
    return grow(a), grow(b)


@register(aten.add.Tensor, aten.add.Scalar, kind="add")
def _add(a, b, alpha=1):
    a, b = _broadcast(a, _scaled(b, alpha))
    return a + b if is_secret(a) else b + a


@register(aten.sub.Tensor, aten.sub.Scalar, kind="add")
def _sub(a, b, alpha=1):
    a, b = _broadcast(a, _scaled(b, alpha))
    return a - b if is_secret(a) else (-b) + a


@register(aten.rsub.Scalar, aten.rsub.Tensor, kind="add")
def _rsub(a, b, alpha=1):
    return _sub(b, a, alpha) if is_secret(b) else (-_scaled(a, alpha)) + b


@register(aten.neg.default, kind="add")
def _neg(x):
    return -x


@register(aten.mul.Tensor, aten.mul.Scalar, kind="mul")
def _mul(a, b):
    if is_secret(a) and is_secret(b):
        a, b = _broadcast(a, b)
    elif _size(a) != _size(b) and torch.is_tensor(a if not is_secret(a) else b):
        a, b = _broadcast(a, b)
    return a * b if is_secret(a) else b * a


@register(aten.div.Tensor, aten.div.Scalar, kind="div")
def _div(a, b):
    if is_secret(b):
        with cost.region("reciprocal"):  # inside the node's "div" region
            inverse = nonlinear("reciprocal")(b)
        return _mul(a, inverse)
    if torch.is_tensor(b) and b.numel() > 1:
        return a * (1.0 / b.float())
    if float(b) == 1.0:  # diffusers' output_scale_factor / rescale_output_factor: no truncation
        return a.clone()
    return a / float(b)


@register(aten.square.default, kind="mul")
def _square(x):
    return x.square()


def _pow_check(node):
    e = node.args[1]
    return None if isinstance(e, (int, float)) and float(e).is_integer() and 0 < e <= 8 \
        else f"exponent {e!r} (only small positive integers)"


@register(aten.pow.Tensor_Scalar, kind="mul", check=_pow_check)
def _pow(x, e):
    return x.pow(int(e))


@register(aten.sum.dim_IntList, kind="shape")
def _sum(x, dim=None, keepdim=False, dtype=None):
    if dim is None or dim == []:
        return x.sum()
    return local(x, lambda s: s.sum(dim=dim, keepdim=keepdim))


@register(aten.sum.default, kind="shape")
def _sum_all(x, dtype=None):
    return x.sum()


@register(aten.mean.dim, kind="shape")
def _mean(x, dim=None, keepdim=False, dtype=None):
    dims = list(range(x.dim())) if dim is None or dim == [] else list(dim)
    count = 1
    for d in dims:
        count *= x.size(d)
    return local(x, lambda s: s.sum(dim=dims, keepdim=keepdim)) / count


@register(aten.mean.default, kind="shape")
def _mean_all(x, dtype=None):
    return x.mean()
