"""Scaled dot-product attention on secret shares: two products around a softmax (the second
fused with it: ``protocols.functions.softmax_matmul`` normalises after the product).

Masks, attention dropout and causal attention are refused by :func:`_sdpa_check`.
"""

from __future__ import annotations

import math

import torch

from cipherdm_torch.mpc import cost

from cipherdm_torch.mpc.crypten_compat import crypten

from .linear import mm
from .registry import is_secret, nonlinear, register

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


def scaled_scores(q, kt, scale: float):
    """``(q @ kt) * scale`` with ONE truncation: the secret product is taken without its
    fixed-point truncation (``kt`` read at integer scale) and then divided by the public integer
    ``round(2^f / scale)``, so the logit scale costs no product and no round of its own. The
    divisor's rounding changes the scale by a relative 2^-f / scale at most (1e-5 for f = 16,
    d = 8). Falls back to ``mm(q, kt) * scale`` when an operand is public or the divisor would
    be below 2 (a scale of 2^(f-1) or more)."""
    if not (is_secret(q) and is_secret(kt)) or not hasattr(q, "_tensor"):
        return mm(q, kt) * scale
    f_scale = q.encoder.scale
    divisor = int(round(f_scale / scale))
    if f_scale <= 1 or kt.encoder.scale != f_scale or divisor < 2:
        return mm(q, kt) * scale
    raw = kt.shallow_copy()
    raw._tensor = kt._tensor.shallow_copy()  # same shares (and cached replicas), scale 1
    raw._tensor.encoder = crypten.encoder.FixedPointEncoder(precision_bits=0)
    out = q.matmul(raw)  # no truncation: q's encoder, values x y 2^(2f)
    out._tensor.div_(divisor)
    return out


@register(aten.scaled_dot_product_attention.default, kind="attention", check=_sdpa_check)
def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    d = q.size(-1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = scaled_scores(q, k.transpose(-1, -2), scale)
    if not (is_secret(scores) and is_secret(v)):
        with cost.region("softmax"):  # inside the node's "attention" region
            probs = nonlinear("softmax")(scores, -1)
        return mm(probs, v)
    # softmax and the product by v in one region: the optimised protocol normalises after
    # the product (protocols.exp_softmax.softmax_matmul); the baseline does softmax then mm
    with cost.region("softmax"):
        return nonlinear("softmax_matmul")(scores, v)
