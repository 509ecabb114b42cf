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
:mod:`cipherdm_torch.protocols` (baseline or optimised, chosen by ``protocols.config``), with
CrypTen-direct fallbacks used only while that package does not provide a function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch.utils._pytree import tree_leaves

from cipherdm_torch.mpc.crypten_compat import crypten

__all__ = ["OpImpl", "REGISTRY", "register", "lookup", "supported_ops", "is_secret", "any_secret",
           "lift", "local", "nonlinear", "wrap"]


@dataclass(frozen=True)
class OpImpl:
    """How one ATen op runs when at least one input is secret."""

    fn: Callable[..., Any]
    kind: str  # cost-meter region (op type) its communication is attributed to
    check: Optional[Callable[[torch.fx.Node], Optional[str]]] = None  # reason if unsupported


REGISTRY: Dict[Any, OpImpl] = {}


def register(*targets, kind: str, check=None):
    """Decorator: register ``fn`` for every ATen op overload (or python callable) in ``targets``."""
    def deco(fn):
        for t in targets:
            REGISTRY[t] = OpImpl(fn, kind, check)
        return fn
    return deco


def lookup(target) -> Optional[OpImpl]:
    return REGISTRY.get(target)


def supported_ops() -> list:
    """Names of every registered op (for documentation and reports)."""
    return sorted(str(t) for t in REGISTRY)


# ------------------------------------------------------------------ share helpers

def is_secret(x) -> bool:
    return isinstance(x, crypten.CrypTensor)


def any_secret(*args, **kwargs) -> bool:
    return any(is_secret(v) for v in tree_leaves((args, kwargs)))


def lift(x):
    """A public tensor as a (trivial) sharing: pseudo-random zero shares, no communication."""
    if is_secret(x):
        return x
    return crypten.cryptensor(torch.as_tensor(x, dtype=torch.float32), src=0)


def local(x, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Apply a share-wise linear op (view, permute, index, ...) to every share locally."""
    share = fn(x.share)
    _carry_replica([x.share], share, lambda reps: fn(reps[0]))
    return wrap(x, share)


def _carry_replica(sources, result, fn) -> None:
    """Under the replicated backend, apply the same local op to the cached replica shares.

    (Otherwise the next multiplication would re-share a tensor each party could derive.)
    """
    try:
        from cipherdm_torch.protocols.replicated import arith as rss_arith  # type: ignore
    except ImportError:
        return
    reps = [rss_arith.cached_next(s) for s in sources]
    if reps and all(r is not None for r in reps):
        rep = fn(reps)
        if rep.shape == result.shape:
            rss_arith.remember(result, rep)


def wrap(template, share: torch.Tensor):
    """A new secret tensor with ``template``'s encoding holding ``share`` (no copy of template).

    (CrypTen's ``shallow_copy`` shares the inner share object, so assigning to it would
    overwrite the template too.)
    """
    out = template.shallow_copy()
    out._tensor = template._tensor.shallow_copy()
    out._tensor.share = share
    return out


def _fp_dtype_only(node) -> Optional[str]:
    return None


# ------------------------------------------------------------------ nonlinear functions

class _CryptenDirect:
    """CrypTen's own methods: the fallback when ``cipherdm_torch.protocols`` lacks a function."""

    @staticmethod
    def silu(x):
        return x * x.sigmoid()

    @staticmethod
    def mish(x):
        return x * (x.exp() + 1).log().tanh()

    @staticmethod
    def gelu(x, approximate="tanh"):
        # tanh form for both modes (|error| vs exact GELU < 5e-4); CrypTen's erf diverges past ~2.5.
        inner = (x + x * x * x * 0.044715) * math.sqrt(2.0 / math.pi)
        return x * (inner.tanh() + 1) * 0.5

    @staticmethod
    def softmax(x, dim):
        return x.softmax(dim)

    @staticmethod
    def exp(x):
        return x.exp()

    @staticmethod
    def reciprocal(x):
        return x.reciprocal()

    @staticmethod
    def rsqrt(x):
        return x.inv_sqrt()

    @staticmethod
    def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
        shape = x.size()
        n, c = shape[0], shape[1]
        xg = x.reshape(n, num_groups, -1)
        centred = xg - xg.mean(-1, keepdim=True)
        var = (centred * centred).mean(-1, keepdim=True)
        y = (centred * nonlinear("rsqrt")(var + eps)).reshape(*shape)
        return _affine(y, weight, bias, [1, c] + [1] * (len(shape) - 2))

    @staticmethod
    def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        dims = tuple(range(-len(normalized_shape), 0))
        mean = x.mean(dims, keepdim=True) if len(dims) > 1 else x.mean(-1, keepdim=True)
        centred = x - mean
        sq = centred * centred
        var = sq.mean(dims, keepdim=True) if len(dims) > 1 else sq.mean(-1, keepdim=True)
        y = centred * nonlinear("rsqrt")(var + eps)
        return _affine(y, weight, bias, list(normalized_shape))


def _affine(y, weight, bias, shape):
    if weight is not None:
        y = y * weight.reshape(*shape)
    if bias is not None:
        y = y + bias.reshape(*shape)
    return y


def _protocols():
    try:
        from cipherdm_torch.protocols import functions as proto  # type: ignore
    except ImportError:
        return None
    return proto


def self_metered(kind: str) -> bool:
    """True when the protocol function behind ``kind`` opens its own cost region."""
    proto = _protocols()
    return proto is not None and getattr(proto, kind, None) is not None


def nonlinear(name: str) -> Callable:
    """The configured implementation of nonlinear function ``name``.

    ``cipherdm_torch.protocols.functions`` (which follows ``protocols.config.use(...)``) when it
    provides ``name``; CrypTen's direct method otherwise.
    """
    proto = _protocols()
    fn = getattr(proto, name, None) if proto is not None else None
    return fn if fn is not None else getattr(_CryptenDirect, name)
