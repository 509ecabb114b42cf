"""The ATen op -> secret-share implementation registry, one module per kind of op.

Like Opacus's one-file-per-layer grad samplers: :mod:`.registry` holds the table
(:class:`OpImpl`, :func:`register`, :func:`lookup`) and the share helpers every kind uses
(:func:`is_secret`, :func:`lift`, :func:`local`, :func:`wrap`, :func:`nonlinear`); each kind
registers its ops when imported here:

* :mod:`.linear` — matmul / linear / addmm, conv2d, conv_transpose2d, embedding;
* :mod:`.attention` — scaled dot-product attention;
* :mod:`.elementwise` — add / sub / mul / div / pow / neg / square, sum / mean;
* :mod:`.nonlinearities` — SiLU, Mish, GELU, exp, sigmoid, tanh, relu, softmax, GroupNorm,
  LayerNorm, the clamp family, leaky_relu;
* :mod:`.shape` — views, cat / stack / split, pad, index_select, nearest upsampling, dropout,
  casts and copies;
* :mod:`.pooling` — average, adaptive average and max pooling.

A new op goes into the module of its kind with ``@register(aten.<op>.<overload>, kind=...)``.
"""

from .registry import (REGISTRY, OpImpl, any_secret, is_secret, lift, local, lookup, nonlinear,
                       register, supported_ops, wrap)
# importing a kind registers its ops
from . import attention, elementwise, linear, nonlinearities, pooling, shape  # noqa: F401

__all__ = ["OpImpl", "REGISTRY", "register", "lookup", "supported_ops", "is_secret", "any_secret",
           "lift", "local", "nonlinear", "wrap"]
