"""Run independent protocol branches side by side so that their rounds are shared.

Why: a protocol whose parts do not depend on each other (SiLU's sign comparison and its
polynomial, for example) pays the sum of their rounds when the parts run one after the other,
but needs only the longer part's rounds when each round carries both parts' messages. Every
message of the replicated backend goes through :func:`.arith.exchange`, so the parts need no
rewriting: :func:`run_together` runs each branch (a function without arguments) in its own
thread, and a branch's ``exchange`` does not talk to the network: it hands its sends and
receives to the group and waits. When every unfinished branch is waiting (or done), the
calling thread posts all of their sends and receives as ONE exchange (one round), then lets
the branches go on.

Determinism (why every party sends the same things in the same order): only one thread runs
at a time, passed on like a baton in a fixed order. Each pass runs branch 0 up to its next
exchange, then branch 1 up to its next exchange, ..., then the merged exchange. So local work
and the truncation helper's rotation happen in an order fixed by the program. Two rules make
the merged rounds agree between parties:

* every protocol calls ``exchange`` the same number of times on every party, and a message
  leaves in the sender's k-th exchange exactly when the receiver takes it in its k-th (a party
  with nothing to send or receive in a round calls ``exchange([], [])``). Then pass k holds the
  k-th exchange of every branch on every party, messages to one peer leave in branch order and
  the peer posts its receives in the same order (links are first in, first out);
* each branch draws from its own pairwise streams (:func:`cipherdm_torch.mpc.prg.fork_streams`),
  because two ends of a pair may draw in different passes (a truncation helper draws its output
  masks after its empty second round, the others before their second round).

Nothing depends on thread timing.

Limits: a branch that calls :func:`run_together` itself runs its branches one after the other
(no nesting). Communication that bypasses :func:`.arith.exchange` (CrypTen's own collectives)
still works inside a branch (it holds the baton, so nothing else runs), as a round of its own.
The protocol settings of :mod:`cipherdm_torch.protocols.config` are per thread: each branch
starts with a copy of the caller's.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, List, Optional, Sequence, Tuple

import crypten
import torch

from cipherdm_torch.mpc import prg
from cipherdm_torch.protocols import config

__all__ = ["run_together", "defer", "resharing", "mark_resharing"]

Message = Tuple[torch.Tensor, int]
_LOCAL = threading.local()  # .group, .index in a branch thread


class _Group:
    """Baton and mailbox of one :func:`run_together` call."""

    def __init__(self, n: int):
        self.cond = threading.Condition()
        self.turn: Optional[int] = None  # the branch allowed to run; None: the caller
        self.posted: List[Optional[Tuple[Sequence[Message], Sequence[Message]]]] = [None] * n
        self.done = [False] * n
        self.results: List[Any] = [None] * n
        self.error: Optional[BaseException] = None
        # replicas being re-shared in this round: id(share) -> (share, receive buffer)
        self.resharing: dict = {}

    def hand_to(self, turn: Optional[int]) -> None:
        with self.cond:
            self.turn = turn
            self.cond.notify_all()

    def wait_for(self, turn: Optional[int]) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == turn)


def defer(sends: Sequence[Message], recvs: Sequence[Message]) -> bool:
    """Called by :func:`.arith.exchange`: inside a branch, post this round's messages to the
    group, wait until the merged round has run (the receive buffers are then filled) and
    return True; outside a branch return False (the caller exchanges itself)."""
    group = getattr(_LOCAL, "group", None)
    if group is None:
        return False
    index = _LOCAL.index
    group.posted[index] = (list(sends), list(recvs))
    group.hand_to(None)
    group.wait_for(index)
    return True


def resharing(share: torch.Tensor) -> Optional[torch.Tensor]:
    """The buffer into which a sibling branch re-shares ``share`` in the coming round, or None.

    Branches that multiply the same input (the q, k and v projections of one activation) would
    each re-share it; the later ones wait for the first one's round instead (same rounds, 8 B
    per element less each). The answer depends on the program only (which branch asked first
    for this very tensor object in this round), so it is the same on every party."""
    group = getattr(_LOCAL, "group", None)
    if group is None:
        return None
    entry = group.resharing.get(id(share))
    return entry[1] if entry is not None and entry[0] is share else None


def mark_resharing(share: torch.Tensor, buf: torch.Tensor) -> None:
    """Announce that this branch re-shares ``share`` into ``buf`` in the coming round."""
    group = getattr(_LOCAL, "group", None)
    if group is not None:
        group.resharing[id(share)] = (share, buf)


def _branch_body(group: _Group, index: int, fn: Callable[[], Any], grad: bool,
                 settings_stack: list, streams: dict) -> None:
    _LOCAL.group, _LOCAL.index = group, index
    config.adopt_stack(settings_stack)
    prg.use_thread_streams(streams)
    group.wait_for(index)
    try:
        with torch.set_grad_enabled(grad):
            group.results[index] = fn()
    except BaseException as exc:  # re-raised in the caller
        if group.error is None:
            group.error = exc
    finally:
        group.done[index] = True
        group.hand_to(None)


def run_together(*fns: Callable[[], Any]) -> List[Any]:
    """[fn() for fn in fns], with the branches' communication rounds merged.

    The rounds taken are those of the longest branch (plus nothing): round r carries every
    branch's r-th exchange. Results come back in the order of ``fns``; the first exception a
    branch raised is raised here after every branch has finished.
    """
    from cipherdm_torch.protocols.replicated import arith  # local: arith imports this module

    if (len(fns) < 2 or getattr(_LOCAL, "group", None) is not None or not prg.has_streams()
            or crypten.cfg.mpc.protocol != "rss"):
        # one branch, nested, CrypTen's generators (insecure benchmark mode: one shared
        # sequence, no per-branch streams) or another backend (CrypTen's protocols do not
        # exchange through arith): one after the other
        return [fn() for fn in fns]
    group = _Group(len(fns))
    grad, stack = torch.is_grad_enabled(), config.snapshot_stack()
    streams = prg.fork_streams(len(fns))
    threads = [threading.Thread(target=_branch_body, args=(group, i, fn, grad, stack, streams[i]),
                                name=f"lockstep-{i}", daemon=True)
               for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    while not all(group.done):
        for i in range(len(fns)):
            if not group.done[i]:
                group.hand_to(i)  # branch i runs up to its next exchange (or its end)
                group.wait_for(None)
        posted = [p for p in group.posted if p is not None]
        group.posted = [None] * len(fns)
        resharing, group.resharing = group.resharing, {}  # kept alive until the round is done
        if posted:
            arith.exchange_now([m for s, _ in posted for m in s], [m for _, r in posted for m in r])
    for t in threads:
        t.join()
    if group.error is not None:
        raise group.error
    return group.results
