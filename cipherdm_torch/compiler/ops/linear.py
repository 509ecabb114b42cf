"""Linear layers on secret shares: matmul / linear / addmm, conv2d and its transpose, embedding.

Each costs one multiplication (one round on either backend) plus the truncation.
"""

from __future__ import annotations

from typing import Union

import torch

from .registry import Secret, is_secret, lift, local, register

aten = torch.ops.aten


def mm(a: Union[Secret, torch.Tensor], b: Union[Secret, torch.Tensor]) -> Secret:
    """a @ b where at least one side is secret."""
    if is_secret(a):
        return a.matmul(b)
    # public @ secret = (secret^T @ public^T)^T
    return b.transpose(-1, -2).matmul(a.transpose(-1, -2)).transpose(-1, -2)


@register(aten.matmul.default, aten.mm.default, aten.bmm.default, kind="matmul")
def _matmul(a, b):
    return mm(a, b)


@register(aten.linear.default, kind="linear")
def _linear(x, weight, bias=None):
    out = mm(x, weight.transpose(-1, -2) if is_secret(weight) else weight.t())
    return out if bias is None else out + bias


@register(aten.addmm.default, kind="linear")
def _addmm(bias, a, b, beta=1, alpha=1):
    out = mm(a, b)
    if alpha != 1:
        out = out * alpha
    return out + (bias if beta == 1 else bias * beta)


def _conv_check(node):
    if len(node.args) > 5 and node.args[5] not in (None, 1, [1, 1], (1, 1)):
        return "dilation other than 1"
    return None


@register(aten.conv2d.default, kind="conv2d", check=_conv_check)
def _conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    x = lift(x)
    out = x.conv2d(weight, stride=stride, padding=padding, groups=groups)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out


@register(aten.conv_transpose2d.input, kind="conv2d", check=_conv_check)
def _conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                      dilation=1):
    x = lift(x)
    out = x.conv_transpose2d(weight, stride=stride, padding=padding,
                             output_padding=output_padding, groups=groups)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out


@register(aten.embedding.default, kind="embedding")
def _embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    if not is_secret(indices):  # public labels: a local row lookup on the shares
        idx = indices.long()
        return local(weight, lambda s: s[idx])
    # secret labels arrive one-hot encoded (..., num_embeddings): a matrix product
    if indices.size(-1) != weight.size(0):
        raise ValueError(f"secret embedding indices must be one-hot with {weight.size(0)} "
                         f"entries in the last dim, got shape {tuple(indices.size())}")
    return mm(indices, weight)
