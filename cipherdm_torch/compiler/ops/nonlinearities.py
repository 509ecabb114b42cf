"""Nonlinear ops on secret shares: activations, exp, softmax, normalisations, clamps.

SiLU, Mish, GELU, exp, reciprocal, rsqrt, softmax and the normalisations run the configured
protocol of :mod:`cipherdm_torch.protocols.functions` (``protocols.config``); sigmoid, tanh
and relu are CrypTen's methods (relu on the active backend's comparison).

The clamp family runs on the active backend's comparison (CrypTen's or the replicated one):
clamp and hardtanh as relus of shifted copies, evaluated in one batched comparison;
leaky_relu as a public blend of x and relu(x).
"""

from __future__ import annotations

import torch

from cipherdm_torch.mpc.crypten_compat import crypten

from .registry import lift, nonlinear, register

aten = torch.ops.aten


def _unary(name):
    def run(x, *args, **kwargs):
        return nonlinear(name)(x)
    return run


register(aten.silu.default, kind="silu")(_unary("silu"))
register(aten.mish.default, kind="mish")(_unary("mish"))
register(aten.exp.default, kind="exp")(_unary("exp"))
register(aten.reciprocal.default, kind="reciprocal")(_unary("reciprocal"))
register(aten.rsqrt.default, kind="rsqrt")(_unary("rsqrt"))


@register(aten.sigmoid.default, kind="sigmoid")
def _sigmoid(x):
    return x.sigmoid()


@register(aten.tanh.default, kind="tanh")
def _tanh(x):
    return x.tanh()


@register(aten.relu.default, kind="relu")
def _relu(x):
    return x.relu()


@register(aten.gelu.default, kind="gelu")
def _gelu(x, approximate="none"):
    return nonlinear("gelu")(x, approximate=approximate)


@register(aten.softmax.int, aten._softmax.default, kind="softmax")
def _softmax(x, dim, *rest):
    return nonlinear("softmax")(x, dim)


@register(aten.group_norm.default, kind="group_norm")
def _group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    return nonlinear("group_norm")(lift(x), num_groups, weight, bias, eps)


@register(aten.layer_norm.default, kind="layer_norm")
def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return nonlinear("layer_norm")(lift(x), list(normalized_shape), weight, bias, eps)


# ------------------------------------------------------------------ comparisons (relu based)

def _relus(*xs):
    """relu of several equally shaped secrets in one batched comparison."""
    if len(xs) == 1:
        return [xs[0].relu()]
    stacked = crypten.stack(list(xs))
    out = stacked.relu()
    return [out[i] for i in range(len(xs))]


def _bounds_check(node):
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    if lo is None and hi is None:
        return "clamp without bounds"
    for b in (lo, hi):
        if b is not None and not isinstance(b, (int, float)):
            return "a secret or tensor bound (only public scalar bounds)"
    return None


def _clamp_secret(x, lo=None, hi=None):
    if lo is not None and hi is not None:
        if hi < lo:
            return x * 0.0 + float(hi)  # torch: min(max(x, lo), hi) = hi everywhere
        a, b = _relus(x - float(lo), x - float(hi))
        return a - b + float(lo)   # lo + relu(x - lo) - relu(x - hi)
    if lo is not None:
        return _relus(x - float(lo))[0] + float(lo)
    return -_relus(-x + float(hi))[0] + float(hi)  # hi - relu(hi - x)


@register(aten.clamp.default, kind="relu", check=_bounds_check)
def _clamp(x, min=None, max=None):
    return _clamp_secret(x, min, max)


@register(aten.clamp_min.default, kind="relu")
def _clamp_min(x, min):
    return _clamp_secret(x, float(min), None)


@register(aten.clamp_max.default, kind="relu")
def _clamp_max(x, max):
    return _clamp_secret(x, None, float(max))


@register(aten.hardtanh.default, kind="relu")
def _hardtanh(x, min_val=-1.0, max_val=1.0):
    return _clamp_secret(x, float(min_val), float(max_val))


@register(aten.relu6.default, kind="relu")
def _relu6(x):
    return _clamp_secret(x, 0.0, 6.0)


@register(aten.leaky_relu.default, kind="relu")
def _leaky_relu(x, negative_slope=0.01):
    a = float(negative_slope)
    r = x.relu()
    return r if a == 0 else x * a + r * (1.0 - a)   # a*x + (1-a)*relu(x)
