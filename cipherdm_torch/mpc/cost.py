"""Cost meter: bytes sent / received, communication rounds and wall time per party.

Every message a party exchanges goes through CrypTen's communicator
(``crypten.communicator.get()``). :func:`install` swaps that communicator's class
for a metered subclass once per party; while a :class:`CostMeter` is active, each
call records its cost into the meter's total and into every open region::

    with CostMeter() as meter:
        with meter.region("softmax"):
            y = x.softmax(-1)
    meter.regions["softmax"].bytes_sent

Conventions (logical traffic of this party, ``b`` bytes of payload, ``n`` parties):

* send / isend: ``b`` sent; recv / irecv: ``b`` received.
* broadcast: the source sends ``(n-1)b``, every other party receives ``b``.
* all_reduce / all_gather: each party sends its tensor to the ``n-1`` others and
  receives theirs: ``(n-1)b`` each way (what an additive-share reveal costs;
  gloo's ring algorithm moves ``2(n-1)/n * b`` on the wire).
* reduce / gather: non-destination parties send ``b``; the destination receives ``(n-1)b``.
* Rounds count the points where this party waits for others: every blocking
  collective is one round; receives posted together (``irecv`` calls before the
  next ``wait``) count as one round, as in a resharing step.
"""

from __future__ import annotations

import pickle
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional

import torch

__all__ = ["Cost", "CostMeter", "region", "install"]


@dataclass
class Cost:
    """Communication and time cost of one party (one region or the total)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    rounds: int = 0
    seconds: float = 0.0
    calls: int = 0
    # wall time blocked in the communicator (waiting on receives / collectives / sends)
    wait_seconds: float = 0.0

    def add(self, sent: int = 0, received: int = 0, rounds: int = 0) -> None:
        self.bytes_sent += int(sent)
        self.bytes_received += int(received)
        self.rounds += int(rounds)

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def as_dict(self) -> dict:
        return asdict(self)


_ACTIVE: List["CostMeter"] = []
_LOCK = threading.Lock()
# Functions called as hook(sent, received, rounds) on every communicator call (e.g. netsim).
HOOKS: List = []


class CostMeter:
    """Records this party's communication while active (a context manager).

    ``total`` is the whole span; ``regions`` maps each region name (see
    :meth:`region` and :func:`region`) to its accumulated :class:`Cost`.
    """

    def __init__(self) -> None:
        self.total = Cost()
        self.regions: Dict[str, Cost] = {}
        self._open: List[str] = []
        self._t0: Optional[float] = None

    def __enter__(self) -> "CostMeter":
        self._t0 = time.perf_counter()
        with _LOCK:
            _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with _LOCK:
            _ACTIVE.remove(self)
        self.total.seconds += time.perf_counter() - self._t0

    @contextmanager
    def region(self, name: str) -> Iterator[Cost]:
        """Attribute everything inside the block to ``name`` (regions may nest)."""
        cost = self.regions.setdefault(name, Cost())
        self._open.append(name)
        t0 = time.perf_counter()
        try:
            yield cost
        finally:
            cost.seconds += time.perf_counter() - t0
            cost.calls += 1
            self._open.remove(name)

    def _record_wait(self, seconds: float) -> None:
        self.total.wait_seconds += seconds
        for name in set(self._open):
            self.regions[name].wait_seconds += seconds

    def _record(self, sent: int, received: int, rounds: int) -> None:
        self.total.add(sent, received, rounds)
        for name in set(self._open):
            self.regions[name].add(sent, received, rounds)

    def as_dict(self) -> dict:
        return {"total": self.total.as_dict(),
                "regions": {k: v.as_dict() for k, v in self.regions.items()}}

    def table(self) -> str:
        """A plain-text table: one line per region, then the total."""
        rows = [("region", "calls", "sent MB", "recv MB", "rounds", "seconds", "wait s")]
        for name, c in sorted(self.regions.items(), key=lambda kv: -kv[1].bytes_sent):
            rows.append((name, str(c.calls), f"{c.bytes_sent / 1e6:.3f}",
                         f"{c.bytes_received / 1e6:.3f}", str(c.rounds), f"{c.seconds:.3f}",
                         f"{c.wait_seconds:.3f}"))
        t = self.total
        rows.append(("TOTAL", "", f"{t.bytes_sent / 1e6:.3f}", f"{t.bytes_received / 1e6:.3f}",
                     str(t.rounds), f"{t.seconds:.3f}", f"{t.wait_seconds:.3f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


@contextmanager
def region(name: str) -> Iterator[None]:
    """Open region ``name`` on every active meter; a no-op when none is active."""
    meters = list(_ACTIVE)
    if not meters:
        yield
        return
    with _nested([m.region(name) for m in meters]):
        yield


@contextmanager
def _nested(contexts):
    if not contexts:
        yield
        return
    with contexts[0]:
        with _nested(contexts[1:]):
            yield


# ---------------------------------------------------------------- communicator hook

def _nbytes(x) -> int:
    if torch.is_tensor(x):
        return x.nelement() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _obj_bytes(obj) -> int:
    return len(pickle.dumps(obj)) + 8  # payload + the int64 size header CrypTen sends first


def _log_wait(seconds: float) -> None:
    for meter in list(_ACTIVE):
        meter._record_wait(seconds)


@contextmanager
def _blocked() -> Iterator[None]:
    """Time spent inside the block counts as waiting on the network."""
    if not _ACTIVE:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _log_wait(time.perf_counter() - t0)


class _Wait:
    """Wraps a pending receive (or send) so that waiting on it is timed as blocked and, for a
    receive, closes the open round."""

    def __init__(self, work, comm, closes_round=True):
        self._work, self._comm, self._closes = work, comm, closes_round

    def wait(self, *args, **kwargs):
        if self._closes:
            self._comm._cipherdm_round_open = False
        with _blocked():
            return self._work.wait(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._work, name)


def _log(comm, sent=0, received=0, blocking=False, opens_round=False):
    rounds = 0
    if blocking:
        rounds = 1
        comm._cipherdm_round_open = False
    elif opens_round and not getattr(comm, "_cipherdm_round_open", False):
        rounds = 1
        comm._cipherdm_round_open = True
    for meter in list(_ACTIVE):
        meter._record(sent, received, rounds)
    for hook in HOOKS:
        hook(sent, received, rounds)


def _metered_class(base):
    """A subclass of CrypTen's communicator class ``base`` that reports to the active meters."""

    class MeteredCommunicator(base):
        def send(self, tensor, dst):
            _log(self, sent=_nbytes(tensor))
            return super().send(tensor, dst)

        def recv(self, tensor, src=None):
            _log(self, received=_nbytes(tensor), blocking=True)
            with _blocked():
                return super().recv(tensor, src)

        def isend(self, tensor, dst):
            _log(self, sent=_nbytes(tensor))
            return _Wait(super().isend(tensor, dst), self, closes_round=False)

        def irecv(self, tensor, src=None):
            _log(self, received=_nbytes(tensor), opens_round=True)
            return _Wait(super().irecv(tensor, src), self)

        def broadcast(self, input, src, group=None, batched=False):
            n, b = self.get_world_size(), _nbytes(input)
            if self.get_rank() == src:
                _log(self, sent=(n - 1) * b, blocking=True)
            else:
                _log(self, received=b, blocking=True)
            with _blocked():
                return super().broadcast(input, src, group=group, batched=batched)

        def all_reduce(self, input, *args, **kwargs):
            b = (self.get_world_size() - 1) * _nbytes(input)
            _log(self, sent=b, received=b, blocking=True)
            with _blocked():
                return super().all_reduce(input, *args, **kwargs)

        def all_gather(self, tensor):
            b = (self.get_world_size() - 1) * _nbytes(tensor)
            _log(self, sent=b, received=b, blocking=True)
            with _blocked():
                return super().all_gather(tensor)

        def reduce(self, input, dst, *args, **kwargs):
            self._to_one(_nbytes(input), dst)
            with _blocked():
                return super().reduce(input, dst, *args, **kwargs)

        def gather(self, tensor, dst):
            self._to_one(_nbytes(tensor), dst)
            with _blocked():
                return super().gather(tensor, dst)

        def _to_one(self, b, dst):
            if self.get_rank() == dst:
                _log(self, received=(self.get_world_size() - 1) * b, blocking=True)
            else:
                _log(self, sent=b, blocking=True)

        def scatter(self, scatter_list, src, size=None, device=None):
            if self.get_rank() == src:
                sent = sum(_nbytes(t) for i, t in enumerate(scatter_list) if i != src)
                _log(self, sent=sent, blocking=True)
                return super().scatter(scatter_list, src, size=size, device=device)
            out = super().scatter(scatter_list, src, size=size, device=device)
            _log(self, received=_nbytes(out), blocking=True)
            return out

        def barrier(self):
            _log(self, blocking=True)
            with _blocked():
                return super().barrier()

        def send_obj(self, obj, dst, group=None):
            _log(self, sent=_obj_bytes(obj))
            return super().send_obj(obj, dst, group=group)

        def recv_obj(self, src, group=None):
            with _blocked():
                obj = super().recv_obj(src, group=group)
            _log(self, received=_obj_bytes(obj), blocking=True)
            return obj

        def broadcast_obj(self, obj, src, group=None):
            with _blocked():
                out = super().broadcast_obj(obj, src, group=group)
            b = _obj_bytes(out)
            if self.get_rank() == src:
                _log(self, sent=(self.get_world_size() - 1) * b, blocking=True)
            else:
                _log(self, received=b, blocking=True)
            return out

    MeteredCommunicator.__name__ = f"Metered{base.__name__}"
    return MeteredCommunicator


def install() -> None:
    """Meter this party's CrypTen communicator (idempotent; call after ``crypten.init()``)."""
    import crypten.communicator as comm

    instance = comm.get()
    if getattr(type(instance), "_cipherdm_metered", False):
        return
    cls = _metered_class(type(instance))
    cls._cipherdm_metered = True
    instance.__class__ = cls  # same object and state, metered methods
    instance._cipherdm_round_open = False
