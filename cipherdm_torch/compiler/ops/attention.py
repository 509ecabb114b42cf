"""Scaled dot-product attention on secret shares: two products around a softmax.

Masks, attention dropout and causal attention are refused by :func:`_sdpa_check`.
"""

from __future__ import annotations

import math

import torch

from cipherdm_torch.mpc import cost

from .linear import mm
from .registry import nonlinear, register

aten = torch.ops.aten


def _sdpa_check(node):
    kw = dict(node.kwargs)
    names = ["attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    for name, value in zip(names, node.args[3:]):
        kw[name] = value
    if kw.get("attn_mask") is not None:
        return "attn_mask"
    if kw.get("dropout_p", 0.0):
        return "attention dropout"
    if kw.get("is_causal", False):
        return "is_causal"
    return None


@register(aten.scaled_dot_product_attention.default, kind="attention", check=_sdpa_check)
def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    d = q.size(-1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = mm(q, k.transpose(-1, -2)) * scale
    with cost.region("softmax"):  # inside the node's "attention" region
        probs = nonlinear("softmax")(scores, -1)
    return mm(probs, v)
