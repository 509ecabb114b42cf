"""Three CrypTen hot spots made cheap, behaviour unchanged (issue 15).

Profiled on the bench UNet's secure forward (party 0, rss backend), CrypTen's own bookkeeping
cost more local time than the protocols' arithmetic:

* **Config reads.** Every attribute access on a ``CrypTensor`` reads
  ``cfg.debug.validation_mode`` (CrypTen's ``register_validation``), and every encoder,
  protocol dispatch and backend check reads another key: about 187,000 reads per forward, each
  going through ``CrypTenConfig.__getattribute__`` (a caught ``AttributeError``) and
  OmegaConf's node resolution, about 45 us apiece on this machine. :func:`install_config_cache`
  gives CrypTen's one ``cfg`` object a subclass (:class:`CachedConfig`) that answers repeated
  reads from a dictionary.
* **Throw-away tensors.** ``MPCTensor.shallow_copy``, ``from_shares``, ``clone`` and CrypTen's
  ``stack`` / ``cat`` start from ``MPCTensor([])``, which builds and secret-shares an empty
  tensor (encoder, pseudo-random zero sharing, source checks) only to overwrite it a line later:
  about 7,000 per forward. :func:`install_empty_tensor_fast_path` builds the same empty sharing
  directly from an empty share. Nothing is sent either way, and no randomness is drawn (a
  zero-element draw), so no party's view changes.
* **Attribute dispatch.** Plain attribute reads on a ``CrypTensor`` (``share``, ``encoder``,
  ``size``: about 80,000 per forward) went through CrypTen's autograd dispatch and validation
  wrapper; :func:`install_attribute_fast_path` answers them directly when the answer is the
  same (see there).

Cache rule (why it is exact): the cache is emptied whenever the configuration can change
through ``cfg``: ``cfg.config`` is replaced (``load_config``, ``set_config``,
``temp_override`` on entry and exit, ``cfg.x = ...``), a value is written through a section
(``cfg.mpc.protocol = "rss"``, as CrypTen documents), or someone takes the raw OmegaConf
object (``cfg.config``), who may then write to it. A write through an OmegaConf node kept
from before such an access is not seen: write through ``cfg``.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from omegaconf import DictConfig

__all__ = ["CachedConfig", "install_config_cache", "install_empty_tensor_fast_path",
           "install_attribute_fast_path", "install"]


_MISS = object()


class _Section:
    """A cached view of one OmegaConf section of :class:`CachedConfig` (``cfg.mpc``, ...)."""

    __slots__ = ("_owner", "_path")

    def __init__(self, owner: "CachedConfig", path: Tuple[str, ...]):
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_path", path)

    def _node(self):
        node = object.__getattribute__(self._owner, "config")
        for key in self._path:
            node = getattr(node, key)
        return node

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        return CachedConfig._cached(self._owner, self._path + (key,),
                                    lambda: getattr(self._node(), key))

    def __setattr__(self, key: str, value: Any) -> None:
        setattr(self._node(), key, value)
        CachedConfig._forget(self._owner)

    def __getitem__(self, key: str) -> Any:
        return self.__getattr__(key)

    def __setitem__(self, key: str, value: Any) -> None:
        self.__setattr__(key, value)

    def __contains__(self, key: str) -> bool:
        return key in self._node()

    def __iter__(self):
        return iter(self._node())

    def __repr__(self) -> str:
        return repr(self._node())


class CachedConfig:
    """Mixin for CrypTen's ``CrypTenConfig``: config keys answered from a dictionary that is
    emptied on every change made through the config (see the module's cache rule)."""

    def _forget(self) -> None:
        object.__getattribute__(self, "__dict__")["_cache"] = {}

    def _cached(self, path: Tuple[str, ...], read) -> Any:
        cache: Dict[Tuple[str, ...], Any] = object.__getattribute__(self, "__dict__")["_cache"]
        try:
            return cache[path]
        except KeyError:
            pass
        value = read()
        if isinstance(value, DictConfig):
            value = _Section(self, path)
        cache[path] = value
        return value

    def __getattribute__(self, name: str) -> Any:
        d = object.__getattribute__(self, "__dict__")
        hit = d["_cache"].get((name,), _MISS)
        if hit is not _MISS:
            return hit
        if name == "config":  # the raw OmegaConf object: the caller may write to it
            d["_cache"] = {}
            return d["config"]
        try:
            return object.__getattribute__(self, name)
        except AttributeError:
            pass
        path = tuple(name.split("."))

        def read():
            node = d["config"]
            for key in path:
                node = getattr(node, key)
            return node

        return CachedConfig._cached(self, path, read)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        self._forget()


def install_config_cache(cfg=None) -> None:
    """Give CrypTen's ``cfg`` object the cached lookups (idempotent)."""
    if cfg is None:
        from crypten.config import cfg
    if isinstance(cfg, CachedConfig):
        return
    base = type(cfg)
    vars(cfg)["_cache"] = {}  # before the class changes: every lookup then finds a cache
    cfg.__class__ = type("Cached" + base.__name__, (CachedConfig, base), {
        "__doc__": f"{base.__name__} with cached lookups (cipherdm_torch.mpc.crypten_speed)."})


def install_empty_tensor_fast_path() -> None:
    """``MPCTensor([])`` builds its empty sharing from an empty share (idempotent)."""
    from crypten.cryptensor import CrypTensor
    from crypten.mpc import MPCTensor
    from crypten.mpc.ptype import ptype as Ptype

    original = MPCTensor.__init__
    if getattr(original, "_cipherdm_fast_empty", False):
        return

    def __init__(self, tensor, ptype=Ptype.arithmetic, device=None, *args, **kwargs):
        if type(tensor) is list and not tensor and not args and not kwargs:
            CrypTensor.__init__(self, requires_grad=False)
            share = torch.empty(0, dtype=torch.long, device=device)
            # CrypTen's own constructors: binary sharings have no fractional bits, arithmetic
            # ones the configured precision
            precision = 0 if ptype == Ptype.binary else None
            self._tensor = ptype.to_tensor().from_shares(share, precision=precision)
            self.ptype = ptype
            return
        original(self, tensor, ptype, device, *args, **kwargs)

    __init__._cipherdm_fast_empty = True
    __init__.__wrapped__ = original
    __init__.__doc__ = original.__doc__
    MPCTensor.__init__ = __init__


def install_attribute_fast_path() -> None:
    """``CrypTensor.__getattribute__`` answers plain attributes (``share``, ``encoder``,
    ``size``, ...) with ``object.__getattribute__`` directly (idempotent; needs the config cache).

    CrypTen's version scans a list of protected names, maps Python operators, looks the name up
    among its autograd functions and then, in ``register_validation``'s wrapper, reads
    ``cfg.debug.validation_mode``: about 80,000 times per forward of the bench UNet. For a name
    that is protected, or has no autograd function, is not an operator alias and not an
    in-place form, all of that ends in ``object.__getattribute__(self, name)``; this path goes
    there at once, unless validation mode is on (then CrypTen's own code runs, validation
    included). Every other name (``mul``, ``add_``, ``__add__``, ...) takes CrypTen's path.
    """
    from crypten.config import cfg
    from crypten.cryptensor import CrypTensor
    from crypten.gradients import FUNCTION_REGISTRY

    original = CrypTensor.__getattribute__
    if getattr(original, "_cipherdm_fast_attribute", False):
        return
    if not isinstance(cfg, CachedConfig):
        raise RuntimeError("install_attribute_fast_path needs install_config_cache first")
    protected = frozenset(CrypTensor.PROTECTED_ATTRIBUTES)
    builtin = CrypTensor.PYTHON_BUILTIN
    config_dict = vars(cfg)  # holds "_cache", replaced whenever the configuration changes
    key = ("debug", "validation_mode")
    plain = object.__getattribute__

    def __getattribute__(self, name):
        if name in protected or (name not in FUNCTION_REGISTRY and name not in builtin
                                 and not name.endswith("_")):
            validating = config_dict["_cache"].get(key, _MISS)
            if validating is _MISS:
                validating = cfg.debug.validation_mode  # fills the cache
            if not validating:
                return plain(self, name)
        return original(self, name)

    __getattribute__._cipherdm_fast_attribute = True
    __getattribute__.__wrapped__ = original
    CrypTensor.__getattribute__ = __getattribute__


def install() -> None:
    """All fast paths."""
    install_config_cache()
    install_empty_tensor_fast_path()
    install_attribute_fast_path()
