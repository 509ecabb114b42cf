"""ATen op -> secret-share implementation registry, and the share helpers every kind uses.

The encrypted module (:mod:`cipherdm_torch.compiler.encrypted_module`) interprets a model's
ATen graph node by node. A node whose inputs are all public runs in plaintext torch; a node with
at least one secret (CrypTen) input runs the implementation registered here for its ATen op.
Each entry carries a ``kind`` (the cost-meter region its communication is attributed to) and an
optional ``check(node)`` that rejects argument combinations we do not support, so that
:func:`cipherdm_torch.compiler.graph.unsupported_ops` can list every problem before any secret
computation starts. The implementations live in one module per kind of op (``linear``,
``attention``, ``elementwise``, ``nonlinearities``, ``shape``, ``pooling``), which register
themselves on import.

Why the shape ops are cheap: CrypTen's arithmetic shares are plain int64 tensors, and every
shape / indexing op is linear and acts element-wise on positions, so applying the op to each
party's share gives a valid sharing of the result (no communication): :func:`local`. Linear
layers cost one multiplication round; the nonlinear ops are routed to
:mod:`cipherdm_torch.protocols.functions` (baseline or optimised, chosen by
``protocols.config``): :func:`nonlinear`.

Cost regions: the interpreter opens ONE region per secret node, named by the registered
``kind``; the protocol functions open none. An implementation that calls a nonlinear function of
another kind opens that function's region inside its own (attention's softmax, a secret
divisor's reciprocal), so the per-op breakdown shows them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, TypeVar, Union

import torch
from torch.utils._pytree import tree_leaves

from cipherdm_torch.mpc.crypten_compat import crypten
from cipherdm_torch.protocols import functions, sharewise

__all__ = ["OpImpl", "REGISTRY", "register", "lookup", "supported_ops", "is_secret", "any_secret",
           "lift", "local", "nonlinear", "wrap"]


Check = Callable[[torch.fx.Node], Optional[str]]  # the reason a node is unsupported, or None
Secret = crypten.CrypTensor
_Fn = TypeVar("_Fn", bound=Callable[..., Any])


@dataclass(frozen=True)
class OpImpl:
    """How one ATen op runs when at least one input is secret."""

    fn: Callable[..., Any]
    kind: str  # cost-meter region (op type) its communication is attributed to
    check: Optional[Check] = None  # rejects argument combinations we do not support


REGISTRY: Dict[Any, OpImpl] = {}


def register(*targets: Any, kind: str, check: Optional[Check] = None) -> Callable[[_Fn], _Fn]:
    """Decorator: register ``fn`` for every ATen op overload (or python callable) in ``targets``."""
    def deco(fn: _Fn) -> _Fn:
        for t in targets:
            REGISTRY[t] = OpImpl(fn, kind, check)
        return fn
    return deco


def lookup(target: Any) -> Optional[OpImpl]:
    return REGISTRY.get(target)


def supported_ops() -> List[str]:
    """Names of every registered op (for documentation and reports)."""
    return sorted(str(t) for t in REGISTRY)


# ------------------------------------------------------------------ share helpers

def is_secret(x: Any) -> bool:
    return isinstance(x, crypten.CrypTensor)


def any_secret(*args: Any, **kwargs: Any) -> bool:
    return any(is_secret(v) for v in tree_leaves((args, kwargs)))


def lift(x: Union[Secret, torch.Tensor, float]) -> Secret:
    """A public tensor as a (trivial) sharing: pseudo-random zero shares, no communication."""
    if is_secret(x):
        return x
    return crypten.cryptensor(torch.as_tensor(x, dtype=torch.float32), src=0)


def local(x: Secret, fn: Callable[[torch.Tensor], torch.Tensor]) -> Secret:
    """Apply a share-wise linear op (view, permute, index, ...) to every share locally.

    The op is reported to the backend's share-wise observers
    (:func:`cipherdm_torch.protocols.sharewise.notify_local_op`), which apply it to whatever
    they keep per share (the replicated backend: the cached replica, so the next
    multiplication need not re-share a tensor each party can derive).
    """
    share = fn(x.share)
    sharewise.notify_local_op([x.share], share, lambda shares: fn(shares[0]))
    return wrap(x, share)


def wrap(template: Secret, share: torch.Tensor) -> Secret:
    """A new secret tensor with ``template``'s encoding holding ``share`` (no copy of template).

    (CrypTen's ``shallow_copy`` shares the inner share object, so assigning to it would
    overwrite the template too.)
    """
    out = template.shallow_copy()
    out._tensor = template._tensor.shallow_copy()
    out._tensor.share = share
    return out


def nonlinear(name: str) -> Callable[..., Any]:
    """The configured implementation of nonlinear function ``name`` (``"silu"``, ``"softmax"``,
    ``"group_norm"``, ...): :mod:`cipherdm_torch.protocols.functions`, which follows
    ``protocols.config.use(...)`` (CrypTen's method for ``"baseline"``, ours for
    ``"optimised"``)."""
    if name not in functions.__all__:
        raise KeyError(f"no nonlinear function {name!r} in cipherdm_torch.protocols.functions; "
                       f"known: {functions.__all__}")
    return getattr(functions, name)
