"""Models that modify a hooked module's output in place, made trainable under Opacus.

Opacus registers a *full* backward hook on every module with trainable parameters. torch then
passes that module's output through ``BackwardHookFunction``, which returns it as a view, and an
in-place op on it fails: "Output 0 of BackwardHookFunction is a view and is being modified
inplace". diffusers' ``UNet2DModel`` with Skip up blocks (``SkipUpBlock2D`` /
``AttnSkipUpBlock2D``, NCSN++-style output skips) ends with ``sample = self.conv_out(...);
sample += skip_sample``, so DP-SGD fails there in both grad-sample modes.

A forward hook returning ``out.clone()`` does not help: torch wraps a module's output for its
backward hooks *after* the forward hooks ran, so the clone becomes the view. The clone has to happen
outside the hooked call. :func:`clone_in_place_outputs` therefore shadows the attribute the model
calls (``unet.conv_out``) with a small proxy that calls the registered module and returns a clone of
its output. The module itself stays registered where it was: parameter names, ``state_dict`` keys,
checkpoints and Opacus' hooks (on the module object) are unchanged, and the gradients are exactly
those of the original model (a clone is the identity for autograd). ``remove()`` restores the plain
attribute.
"""

from __future__ import annotations

from typing import Iterator, List, Tuple

import torch
import torch.nn as nn
from diffusers import UNet2DModel

__all__ = ["clone_in_place_outputs", "in_place_output_targets"]


def in_place_output_targets(model: nn.Module) -> Iterator[Tuple[nn.Module, str]]:
    """(parent, child name) of each submodule whose output ``model`` modifies in place."""
    for m in model.modules():
        # diffusers adds the skip image in place whenever an up block has a skip path (its test
        # is ``hasattr(block, "skip_conv")``)
        if isinstance(m, UNet2DModel) and any(hasattr(b, "skip_conv") for b in m.up_blocks):
            yield m, "conv_out"


class _CloneOutput:
    """Stands in for ``parent.<name>``: calls the registered module, returns a fresh output."""

    def __init__(self, parent: nn.Module, name: str):
        self._parent = parent
        self._name = name
        self._users = 0  # engines attached through this proxy

    @property
    def module(self) -> nn.Module:
        return self._parent._modules[self._name]

    def __call__(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        return out.clone() if isinstance(out, torch.Tensor) else out

    def __getattr__(self, attr):  # weights etc. read through the proxy still work
        if attr.startswith("__") or attr in ("_parent", "_name", "_users"):
            raise AttributeError(attr)
        return getattr(self.module, attr)


class _Installed:
    def __init__(self, proxies: List[_CloneOutput]):
        self.proxies = proxies

    def remove(self) -> None:
        for p in self.proxies:
            p._users -= 1
            if p._users <= 0 and vars(p._parent).get(p._name) is p:
                del vars(p._parent)[p._name]
        self.proxies = []


def clone_in_place_outputs(model: nn.Module) -> _Installed:
    """Make ``model`` trainable under Opacus' hooks where it adds into a module's output in place.

    Returns a handle whose ``remove()`` undoes it. A no-op for models without such modules.
    """
    proxies = []
    for parent, name in in_place_output_targets(model):
        proxy = vars(parent).get(name)
        if not isinstance(proxy, _CloneOutput):  # else shared with an engine already attached
            proxy = _CloneOutput(parent, name)
            # an instance attribute wins over nn.Module.__getattr__ (which reads ``_modules``), so
            # the model's ``self.conv_out(x)`` calls the proxy; ``_modules`` and parameters stay
            object.__setattr__(parent, name, proxy)
        proxy._users += 1
        proxies.append(proxy)
    return _Installed(proxies)
