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

Third, two fast paths for CrypTen's bookkeeping (cached config reads, no throw-away sharing
behind ``MPCTensor([])``): :mod:`.crypten_speed`, behaviour unchanged.

The fixes are applied when MPC is first used: ``from cipherdm_torch.mpc.crypten_compat import
crypten`` applies them and returns the module; ``import cipherdm_torch`` only installs :func:`install_import_hook`, so that a
user's own ``import crypten`` after it gets the fixes too, while DP training never loads CrypTen.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
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


def _patch_loaded_crypten() -> None:
    """The fixes that act on CrypTen's classes, and the fast paths of :mod:`.crypten_speed`."""
    from crypten.encoder import FixedPointEncoder

    from cipherdm_torch.mpc import crypten_speed  # local: it imports OmegaConf, which comes with CrypTen

    FixedPointEncoder.decode = _decode
    crypten_speed.install()


def apply() -> types.ModuleType:
    """Apply the compatibility fixes and return the imported ``crypten`` module."""
    _install_onnx_registration_stand_in()
    import crypten  # noqa: WPS433 (import after the fix on purpose)

    _patch_loaded_crypten()
    return crypten


class _CryptenImportHook(importlib.abc.MetaPathFinder):
    """Apply the fixes around the first ``import crypten``, whoever triggers it."""

    def find_spec(self, name, path=None, target=None):
        if name != "crypten" or "crypten" in sys.modules:
            return None
        sys.meta_path.remove(self)  # one shot; the real finders do the import
        _install_onnx_registration_stand_in()
        spec = importlib.util.find_spec("crypten")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch_loaded_crypten()

        spec.loader.exec_module = exec_and_patch
        return spec


def install_import_hook() -> None:
    """Make a later ``import crypten`` (by anyone) apply the fixes; imports nothing now."""
    if "crypten" in sys.modules or any(isinstance(f, _CryptenImportHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _CryptenImportHook())


def __getattr__(name: str):
    """``from cipherdm_torch.mpc.crypten_compat import crypten`` applies the fixes on first use."""
    if name == "crypten":
        return apply()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
