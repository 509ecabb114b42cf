"""Run CrypTen's ``MPCTensor`` on the dealer-free replicated protocols (3 parties).

How it hooks in (no CrypTen code copied, nothing in CrypTen edited):

* CrypTen's ``ArithmeticSharedTensor`` looks its bilinear protocol up by the name
  in ``crypten.cfg.mpc.protocol`` among its module globals (``"beaver"``,
  ``"replicated"``). :func:`install` registers :mod:`.arith` there under the
  name ``"rss"``; with ``cfg.mpc.protocol == "rss"`` every ``x * y``, ``x @ y``,
  ``conv*``, ``square`` and fixed-point truncation runs on replicated shares.
* ``MPCTensor._ltz`` (behind ``<``, ``>``, ``>=``, ``<=``, ``==``, ``sign``,
  ``abs``, ``max``, ``argmax``, ``where``-style selections) and ``MPCTensor.relu``
  are wrapped: when ``"rss"`` is selected they dispatch to :mod:`.compare`,
  otherwise to CrypTen's originals.
* ``MPCTensor.rand`` (used by ``max`` / ``argmax`` to break ties) draws replicated
  random bits from the pairwise PRGs and injects them (no B2A triples).
* ``ArithmeticSharedTensor.clone``, its add / sub / negation, its multiplication by
  a public integer, ``stack`` / ``cat``, ``pad`` and the share-wise view / index / reduce
  functions CrypTen applies to the share (``view``, ``reshape``, ``t``, ``transpose``,
  ``permute``, ``__getitem__``, ``narrow``, ``unbind``, ``split``, ``sum``, ...) are
  wrapped to carry the cached replica share along (otherwise the next multiplication
  pays a re-share, 8 bytes per element). ``index_add_`` / ``scatter_add_``, which
  CrypTen runs on party 0 only for a public operand, drop the replica on every party.
* :func:`cipherdm_torch.protocols.side_by_side.run_together` (independent parts of an
  approximation) gets :func:`.lockstep.run_together` as its runner: their rounds are merged.

Party-independent communication (issue 13): whether an op re-shares is decided only by
:func:`.arith.cached_next` (replica attached to this tensor object, not modified in
place since). Every wrapper above attaches a replica exactly when all of its inputs had
one and the shapes agree: facts that are the same on every party, never the memory
layout, strides or a view's base. So every party takes the same decision, and a
diffusers attention UNet no longer desynchronises the parties (see the "Replica rule"
in :mod:`.arith`).

CrypTen's own protocols stay the default and the baseline: the patches only act
when ``cfg.mpc.protocol == "rss"``. Select the backend with::

    from cipherdm_torch.protocols.replicated import replicated_backend
    with replicated_backend():                 # or enable() / disable()
        y = (x * w).relu()                     # no Beaver triple, no dealer

or ``crypten.cfg.mpc.protocol = "rss"`` after :func:`install`. It must be done in
every party (it is per process, like any CrypTen setting).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import crypten
from crypten.config import cfg
from crypten.mpc import MPCTensor
from crypten.mpc.primitives import arithmetic as _arith_mod
from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor
from crypten.common.tensor_types import is_tensor

import torch
from crypten.encoder import FixedPointEncoder

from cipherdm_torch.protocols import sharewise, side_by_side
from cipherdm_torch.protocols.replicated import arith as rss_arith, binary as rss_binary, compare as rss_compare
from cipherdm_torch.protocols.replicated import lockstep

__all__ = ["NAME", "install", "uninstall", "is_active", "enable", "disable", "replicated_backend"]

NAME = "rss"
_BILINEAR = ("mul", "matmul", "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d")
_ORIG: dict = {}


def is_active() -> bool:
    """True when ``crypten.cfg.mpc.protocol`` selects this backend."""
    return cfg.mpc.protocol == NAME


def _ltz(self):
    if is_active() and self.ptype == crypten.mpc.arithmetic:
        return rss_compare.ltz(self)
    return _ORIG["_ltz"](self)


def _relu(self):
    if is_active() and self.ptype == crypten.mpc.arithmetic:
        return rss_compare.relu(self)
    return _ORIG["relu"](self)


def _rand(*sizes, device=None):
    """Uniform [0, 1) with 16 random bits, dealer-free (CrypTen's takes B2A triples)."""
    if not is_active():
        return _ORIG["rand"](*sizes, device=device)
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = tuple(sizes[0])
    bits = FixedPointEncoder()._precision_bits
    share = rss_binary.b2a(rss_binary.random_bits(sizes, bits, device), bits=bits)
    return MPCTensor.from_shares(share, precision=bits)


def _clone(self):
    result = _ORIG["clone"](self)
    nxt = rss_arith.cached_next(self.share)
    if nxt is not None:
        rss_arith.remember(result.share, nxt)
    return result


def _arithmetic_function(self, y, op, inplace=False, *args, **kwargs):
    """CrypTen's add / sub / mul..., plus the replica of the result for add / sub."""
    if is_active() and op in _BILINEAR and isinstance(y, ArithmeticSharedTensor):
        # re-share the operands themselves (not CrypTen's internal clone), so the
        # replicas stay cached on them for their next use
        rss_arith.replicate_many([self.share] if y.share is self.share else [self.share, y.share])
    if is_active() and op == "mul" and self.encoder.scale == 1 and (
            isinstance(y, int) or is_tensor(y)):
        return _scaled_by_public(self, y, inplace)
    if not is_active() or op not in ("add", "sub"):
        return _ORIG["_arithmetic_function"](self, y, op, inplace, *args, **kwargs)
    xn = rss_arith.cached_next(self.share)
    rep = None
    if xn is not None:
        if isinstance(y, ArithmeticSharedTensor):
            yn = rss_arith.cached_next(y.share)
            if yn is not None and y.encoder.scale == self.encoder.scale:
                rep = getattr(xn, op)(yn)
        elif isinstance(y, (int, float)) or is_tensor(y):
            enc = self.encoder.encode(y, device=self.device)
            rep = getattr(xn, op)(enc) if self.rank == 2 else xn + 0 * enc
    result = _ORIG["_arithmetic_function"](self, y, op, inplace, *args, **kwargs)
    if rep is not None and rep.shape == result.share.shape:
        rss_arith.remember(result.share, rep)
    return result


def _scaled_by_public(self, y, inplace):
    """``x * w`` for an integer-scale ``x`` (bits, one-hots) and a public ``w``: CrypTen
    multiplies each share by the encoded ``w`` and, at scale 1, does not truncate, so the
    replica is ``x_{i+1} * w`` (e.g. a one-hot weighed by public integer weights keeps its
    replica, and the product it goes into needs no re-share round)."""
    xn = rss_arith.cached_next(self.share)
    result = _ORIG["_arithmetic_function"](self, y, "mul", inplace)
    if xn is not None and result.encoder.scale == 1:
        rep = xn * self.encoder.encode(y, device=self.device)
        if rep.shape == result.share.shape:
            rss_arith.remember(result.share, rep)
    return result


def _mul_int(self, y):
    """``x * k`` for a public integer k (no truncation); the replica is ``x_{i+1} * k``."""
    result = _ORIG["mul"](self, y)
    if is_active() and isinstance(y, int):
        xn = rss_arith.cached_next(self.share)
        if xn is not None:
            rss_arith.remember(result.share, xn * y)
    return result


def _neg_(self):
    """In-place negation (behind ``-x`` and ``c - x``); the replica is negated too."""
    xn = rss_arith.cached_next(self.share) if is_active() else None
    _ORIG["neg_"](self)
    if xn is not None:
        rss_arith.remember(self.share, -xn)
    return self


def _joined(name, torch_fn):
    """CrypTen's ``stack`` / ``cat`` of shares, and the same join of the replicas when every
    input has one (the decision depends only on the inputs' replicas, the same on every party)."""
    def run(tensors, *args, **kwargs):
        result = _ORIG[name](tensors, *args, **kwargs)
        if is_active():
            reps = [rss_arith.cached_next(t.share) if isinstance(t, ArithmeticSharedTensor)
                    else None for t in tensors]
            if all(r is not None for r in reps):
                rep = torch_fn(reps, *args, **kwargs)
                if rep.shape == result.share.shape:
                    rss_arith.remember(result.share, rep)
        return result

    run.__name__ = name
    return run


# share-wise ops that act the same way on every party's share: the replica gets the same op
_SHAREWISE = ("__getitem__", "expand", "flatten", "flip", "gather", "index_select", "narrow",
              "permute", "repeat", "reshape", "roll", "squeeze", "sum", "cumsum", "t", "take",
              "trace", "transpose", "unfold", "unsqueeze", "view", "_sum_pool2d")
_SHAREWISE_MANY = ("split", "unbind")
# in-place ops that CrypTen runs on party 0 only for a public operand: the replica is dropped
# on every party (without this, party 0's `_version` moves and the others' replica goes stale)
_RANK0_INPLACE = ("index_add_", "scatter_add_")


def _sharewise(name):
    orig = _ORIG[name]

    def run(self, *args, **kwargs):
        result = orig(self, *args, **kwargs)
        if is_active():
            xn = rss_arith.cached_next(self.share)
            if xn is not None:
                if name == "_sum_pool2d":  # not a torch.Tensor method: run CrypTen's on xn
                    rep = orig(_replica_view(self, xn), *args, **kwargs).share
                else:
                    rep = getattr(xn, name)(*args, **kwargs)
                if name in _SHAREWISE_MANY:
                    for r, t in zip(rep, result):
                        rss_arith.remember(t.share, r)
                elif rep.shape == result.share.shape:
                    rss_arith.remember(result.share, rep)
        return result

    run.__name__ = name
    run.__doc__ = f"CrypTen's ``{name}``, applied to the cached replica too (rss backend)."
    return run


def _replica_view(template, xn):
    """A throw-away ArithmeticSharedTensor holding ``xn`` as its share (for share-wise ops)."""
    t = template.shallow_copy()
    t.share = xn
    return t


def _rank0_inplace(name):
    orig = _ORIG[name]

    def run(self, *args, **kwargs):
        result = orig(self, *args, **kwargs)
        if is_active():
            rss_arith.forget(self.share)
        return result

    run.__name__ = name
    return run


def _data_alias(prop):
    """``ArithmeticSharedTensor.data`` (CrypTen's ``share.data``), which drops the replica first:
    ``.data`` is an alias with its own version counter, so an in-place edit through it (CrypTen's
    ``weighted_index`` fills ``shifted.data`` on every party) does not move the share's
    ``_version`` and would leave a stale replica. Dropped on every party alike (the same
    program), whether or not the caller then edits."""
    def get(self):
        if is_active():
            rss_arith.forget(self._tensor)
        return prop.fget(self)

    return property(get, prop.fset, doc=get.__doc__)


def _pad(self, pad, mode="constant", value=0):
    """CrypTen's pad (party 0 pads with the encoded value, the others with 0), and the replica
    padded the same way: party 2's replica is the share ``x_0``."""
    result = _ORIG["pad"](self, pad, mode=mode, value=value)
    if is_active() and isinstance(value, (int, float)):
        xn = rss_arith.cached_next(self.share)
        if xn is not None:
            fill = self.encoder.encode(value).item() if self.rank == 2 else 0
            rss_arith.remember(result.share, torch.nn.functional.pad(xn, pad, mode=mode,
                                                                     value=fill))
    return result


SUPPORTED_CRYPTEN = ("0.4.1",)  # the CrypTen versions whose private attributes we patch

# (owner, attribute) -> the raw class attribute it had before install() (staticmethods kept)
_SAVED: dict = {}
_PREVIOUS_PROTOCOL: list = []


def _patch(owner, name: str, new) -> None:
    _SAVED[(owner, name)] = owner.__dict__.get(name, _MISSING)
    setattr(owner, name, new)


_MISSING = object()


def replicate_for_products(shares) -> None:
    """Preparer of shares about to enter products (:func:`.sharewise.prepare_for_products`, e.g.
    a forward's secret weights and inputs): on this backend, re-share every one without a
    replica in ONE round, so that no product deep inside the network waits a round for a
    weight's or an input's replica (a model's weights are re-shared once, at their first
    forward). Whether a share is sent depends only on :func:`.arith.cached_next` (and on
    :func:`.lockstep.resharing` in a side-by-side branch), the same on every party."""
    if is_active() and any(rss_arith.cached_next(s) is None for s in shares):
        rss_arith.replicate_many(list(shares))


def install() -> None:
    """Register the ``"rss"`` protocol and the dispatching wrappers (idempotent).

    Every CrypTen attribute this backend touches is patched here and nowhere else, after a
    version check (they are private, so another CrypTen release may have moved them);
    :func:`uninstall` puts them all back.
    """
    if _SAVED:
        return
    if crypten.__version__ not in SUPPORTED_CRYPTEN:
        raise RuntimeError(
            f"the replicated backend patches private attributes of CrypTen "
            f"{', '.join(SUPPORTED_CRYPTEN)}; CrypTen {crypten.__version__} is installed. Install "
            f"crypten=={SUPPORTED_CRYPTEN[-1]} or use the 'crypten' backend")
    for name in ("_ltz", "relu", "clone", "_arithmetic_function", "mul", "neg_", "stack", "pad",
                 "cat", "rand", *_SHAREWISE, *_SHAREWISE_MANY, *_RANK0_INPLACE):
        owner = MPCTensor if name in ("_ltz", "relu", "rand") else ArithmeticSharedTensor
        _ORIG[name] = getattr(owner, name)
    _patch(_arith_mod, NAME, rss_arith)  # found by ArithmeticSharedTensor via globals()
    _patch(MPCTensor, "rand", staticmethod(_rand))
    _patch(MPCTensor, "_ltz", _ltz)
    _patch(MPCTensor, "relu", _relu)
    _patch(ArithmeticSharedTensor, "mul", _mul_int)
    _patch(ArithmeticSharedTensor, "neg_", _neg_)
    _patch(ArithmeticSharedTensor, "clone", _clone)
    _patch(ArithmeticSharedTensor, "_arithmetic_function", _arithmetic_function)
    _patch(ArithmeticSharedTensor, "pad", _pad)
    _patch(ArithmeticSharedTensor, "data", _data_alias(ArithmeticSharedTensor.__dict__["data"]))
    _patch(ArithmeticSharedTensor, "stack", staticmethod(_joined("stack", torch.stack)))
    _patch(ArithmeticSharedTensor, "cat", staticmethod(_joined("cat", torch.cat)))
    for name in _SHAREWISE + _SHAREWISE_MANY:
        _patch(ArithmeticSharedTensor, name, _sharewise(name))
    for name in _RANK0_INPLACE:
        _patch(ArithmeticSharedTensor, name, _rank0_inplace(name))
    sharewise.on_local_op(rss_arith.carry_local_op)  # the compiler's share-wise ops carry replicas
    sharewise.on_prepare(replicate_for_products)  # e.g. weights and inputs: one round, up front
    side_by_side.register_runner(lockstep.run_together)  # independent parts share their rounds


def uninstall() -> None:
    """Undo :func:`install`: CrypTen's own attributes back, the ``"rss"`` protocol gone."""
    if cfg.mpc.protocol == NAME:
        cfg.mpc.protocol = _PREVIOUS_PROTOCOL[0] if _PREVIOUS_PROTOCOL else "beaver"
    _PREVIOUS_PROTOCOL.clear()
    for (owner, name), raw in _SAVED.items():
        if raw is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, raw)
    _SAVED.clear()
    _ORIG.clear()
    sharewise.remove_local_op_observer(rss_arith.carry_local_op)
    sharewise.remove_preparer(replicate_for_products)
    side_by_side.register_runner(None)


def enable() -> None:
    """Select the replicated backend for this process (all later MPCTensor ops)."""
    install()
    if cfg.mpc.protocol != NAME:
        _PREVIOUS_PROTOCOL.append(cfg.mpc.protocol)
    cfg.mpc.protocol = NAME


def disable(protocol: str = None) -> None:
    """Leave the replicated backend: back to the protocol :func:`enable` replaced (or ``protocol``)."""
    previous = _PREVIOUS_PROTOCOL.pop() if _PREVIOUS_PROTOCOL else "beaver"
    cfg.mpc.protocol = protocol or previous


@contextmanager
def replicated_backend() -> Iterator[None]:
    """Use the replicated backend inside the block, then restore the previous protocol."""
    install()
    with cfg.temp_override({"mpc.protocol": NAME}):
        yield
