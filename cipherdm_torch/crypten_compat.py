"""Make CrypTen 0.4.1 importable and usable on current PyTorch (2.x).

CrypTen's ONNX converter imports ``torch.onnx._internal.registration`` at
import time; the module moved in newer PyTorch, so ``import crypten`` fails
before any MPC code runs. The MPC runtime does not need that module, so we
register an empty stand-in under that name *only if the real one is missing*.
The ONNX path (``crypten.nn.from_pytorch``) stays unsupported; models are
converted by :mod:`cipherdm_torch` from their ``torch.export`` graph instead.

A second fix: CrypTen 0.4.1's ``FixedPointEncoder.decode`` divides negative
values by ``scale - 1`` instead of ``scale``, so a negative value whose
magnitude lies just below an integer decodes one unit too far from zero
(-12.99998 -> -13.99998, -1e6 -> -1000015). :func:`_decode` replaces it with
floor division by the scale plus the exact remainder.

This module is applied automatically by ``import cipherdm_torch``.
"""

from __future__ import annotations

import importlib
import sys
import types

import torch

_ONNX_REGISTRATION = "torch.onnx._internal.registration"
STAND_IN_ATTR = "__cipherdm_stand_in__"


def _install_onnx_registration_stand_in() -> bool:
    """Register a stand-in for the moved ONNX module; return True if one was needed."""
    try:
        importlib.import_module(_ONNX_REGISTRATION)
        return False
    except ImportError:
        pass
    stand_in = types.ModuleType(_ONNX_REGISTRATION)
    stand_in.__doc__ = "cipherdm_torch stand-in: CrypTen's ONNX converter is unsupported here."
    stand_in.registry = None
    setattr(stand_in, STAND_IN_ATTR, True)
    sys.modules[_ONNX_REGISTRATION] = stand_in
    return True


def _decode(self, tensor):
    """Fixed-point integers -> floats: floor(t / scale) + (t mod scale) / scale, for any sign."""
    if tensor is None:
        return None
    if torch.is_floating_point(tensor):
        raise TypeError("decode expects an integer (encoded) tensor")
    if self._scale == 1:
        return tensor.float().data
    quotient = torch.div(tensor, self._scale, rounding_mode="floor")
    remainder = tensor - quotient * self._scale  # in [0, scale)
    return (quotient.double() + remainder.double() / self._scale).float().data


def apply() -> types.ModuleType:
    """Apply the compatibility fixes and return the imported ``crypten`` module."""
    _install_onnx_registration_stand_in()
    import crypten  # noqa: WPS433 (import after the fix on purpose)
    from crypten.encoder import FixedPointEncoder

    FixedPointEncoder.decode = _decode
    return crypten


crypten = apply()
