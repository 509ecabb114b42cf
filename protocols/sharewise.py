"""Observers of share-wise ops: how a backend keeps per-share state through local ops.

A share-wise op (view, permute, index, pad, cat, split, ... applied to each party's share on
its own, no communication) is run by the compiler directly on the raw shares
(:func:`cipherdm_torch.compiler.ops.local`). A backend that keeps state attached to a share
object (the replicated backend caches the replica ``x_{i+1}`` on the share tensor) registers an
observer here when it is installed; the compiler reports each such op with
:func:`notify_local_op`, and the observer applies the same op to its state. So the generic op
layer never imports a backend, and the backend never imports the compiler (a layer above it).

Likewise, shares about to enter products can be announced (:func:`prepare_for_products`): the
compiler does it for a forward's secret weights and inputs before the forward runs, a protocol
for a value that several later products share (or whose preparation can ride in rounds it is
waiting for anyway). The replicated backend re-shares, in ONE round, those that carry no
replica yet (weights once per model, inputs once per forward), instead of one round at each
first use; other backends ignore it.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch

__all__ = ["LocalOp", "Observer", "on_local_op", "remove_local_op_observer", "observers",
           "notify_local_op", "Preparer", "on_prepare", "remove_preparer",
           "prepare_for_products"]

# op(shares) -> result share: the share-wise op, applicable to any tensors shaped like the shares
LocalOp = Callable[[Sequence[torch.Tensor]], torch.Tensor]
# observer(source shares, result share, op): called after result = op(source shares)
Observer = Callable[[Sequence[torch.Tensor], torch.Tensor, LocalOp], None]

# preparer(shares): this party's shares of secrets about to enter products
Preparer = Callable[[Sequence[torch.Tensor]], None]

_OBSERVERS: List[Observer] = []
_PREPARERS: List[Preparer] = []


def on_local_op(observer: Observer) -> Observer:
    """Call ``observer`` after every share-wise op of the compiler (registered once)."""
    if observer not in _OBSERVERS:
        _OBSERVERS.append(observer)
    return observer


def remove_local_op_observer(observer: Observer) -> None:
    """Stop calling ``observer`` (no error if it is not registered)."""
    if observer in _OBSERVERS:
        _OBSERVERS.remove(observer)


def observers() -> Tuple[Observer, ...]:
    """The registered observers, in registration order."""
    return tuple(_OBSERVERS)


def notify_local_op(sources: Sequence[torch.Tensor], result: torch.Tensor, op: LocalOp) -> None:
    """Report ``result = op(sources)`` (this party's shares) to every observer."""
    for observer in tuple(_OBSERVERS):
        observer(sources, result, op)


def on_prepare(preparer: Preparer) -> Preparer:
    """Call ``preparer`` with the shares announced by :func:`prepare_for_products` (once)."""
    if preparer not in _PREPARERS:
        _PREPARERS.append(preparer)
    return preparer


def remove_preparer(preparer: Preparer) -> None:
    """Stop calling ``preparer`` (no error if it is not registered)."""
    if preparer in _PREPARERS:
        _PREPARERS.remove(preparer)


def prepare_for_products(shares: Sequence[torch.Tensor]) -> None:
    """Announce shares (this party's, in an order that is the same on every party) of secrets
    that will enter products: a backend may prepare them now, e.g. all in one round."""
    for preparer in tuple(_PREPARERS):
        preparer(shares)
