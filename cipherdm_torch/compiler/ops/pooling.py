"""Pooling on secret shares: average pools (local sums, a public division) and max pooling as a
tournament of max(a, b) = a + relu(b - a) over each window (ceil(log2 k^2) batched comparisons)."""

from __future__ import annotations

import torch

from cipherdm_torch.protocols import max_tree

from .registry import lift, local, register
from .shape import constant_pad

aten = torch.ops.aten


@register(aten.avg_pool2d.default, kind="pool")
def _avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False,
                count_include_pad=True, divisor_override=None):
    stride = stride or kernel_size
    return x.avg_pool2d(kernel_size, stride=stride, padding=padding)


@register(aten.adaptive_avg_pool2d.default, kind="pool")
def _adaptive_avg_pool2d(x, output_size):
    return x.adaptive_avg_pool2d(output_size)


def _max_pool_check(node):
    args = list(node.args) + [None] * 6
    dilation = args[4] if args[4] is not None else node.kwargs.get("dilation", 1)
    ceil_mode = args[5] if args[5] is not None else node.kwargs.get("ceil_mode", False)
    if dilation not in (1, [1, 1], (1, 1)):
        return "dilation other than 1"
    if ceil_mode:
        return "ceil_mode=True"
    return None


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


_POOL_PAD = -(2.0 ** 12)  # stands in for -inf on padded positions (far below activations)


@register(aten.max_pool2d.default, kind="pool", check=_max_pool_check)
def _max_pool2d(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride) if stride not in (None, (), []) else (kh, kw)
    ph, pw = _pair(padding)
    x = lift(x)
    if ph or pw:
        x = constant_pad(x, [pw, pw, ph, ph], _POOL_PAD)
    win = local(x, lambda s: s.unfold(-2, kh, sh).unfold(-2, kw, sw).contiguous())
    win = win.reshape(*win.size()[:-2], kh * kw)
    return max_tree.tree_max(win, -1, keepdim=False, combine=max_tree.larger_by_relu)
