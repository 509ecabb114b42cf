"""Run independent protocol branches side by side so that their rounds are shared.

Why: a protocol whose parts do not depend on each other (SiLU's sign comparison and its
polynomial, for example) pays the sum of their rounds when the parts run one after the other,
but needs only the longer part's rounds when each round carries both parts' messages. Every
message of the replicated backend goes through :func:`.arith.exchange`, so the parts need no
rewriting: :func:`run_together` runs each branch (a function without arguments) as a
coroutine (a ``greenlet``: its own stack, switched to and from explicitly, in the caller's
thread), and a branch's ``exchange`` does not talk to the network: it hands its sends and
receives to the group and switches back to the caller. When every unfinished branch is waiting
(or done), the caller posts all of their sends and receives as ONE exchange (one round), then
resumes the branches.

Determinism (why every party sends the same things in the same order): the caller resumes the
branches in a fixed order. Each pass runs branch 0 up to its next exchange, then branch 1 up to
its next exchange, ..., then the merged exchange. So local work and the truncation helper's
rotation happen in an order fixed by the program. Two rules make the merged rounds agree
between parties:

* every protocol calls ``exchange`` the same number of times on every party, and a message
  leaves in the sender's k-th exchange exactly when the receiver takes it in its k-th (a party
  with nothing to send or receive in a round calls ``exchange([], [])``). Then pass k holds the
  k-th exchange of every branch on every party, messages to one peer leave in branch order and
  the peer posts its receives in the same order (links are first in, first out);
* each branch draws from its own pairwise streams (:func:`cipherdm_torch.mpc.prg.fork_streams`),
  because two ends of a pair may draw in different passes (a truncation helper draws its output
  masks after its empty second round, the others before their second round).

Why coroutines and not threads: a first version ran each branch in a thread and passed a baton
between them; every hand-over waited for the operating system to schedule the woken thread,
which with three parties on two cores cost milliseconds (the bench UNet's grouped projections
took 1.0 s of local time instead of 0.3 s). A greenlet switch costs about a microsecond.

Nesting: a branch may call :func:`run_together` itself; its branches' rounds are merged into
ONE exchange of that branch, which the outer group merges again with its siblings' (a
softmax's reciprocal beside the re-share of its numerators, inside it two products beside
each other). Communication that bypasses :func:`.arith.exchange` (CrypTen's own collectives)
still works inside a branch (nothing else runs meanwhile), as a round of its own. Branch state
(the group, the pairwise streams of :mod:`cipherdm_torch.mpc.prg`, the protocol settings of
:mod:`cipherdm_torch.protocols.config`) lives in context variables: each branch runs in a copy
of the caller's context.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any, Callable, List, Optional, Sequence, Tuple

import crypten
import torch
from greenlet import greenlet

from cipherdm_torch.mpc import prg
from cipherdm_torch.protocols import config

__all__ = ["run_together", "defer", "resharing", "mark_resharing"]

Message = Tuple[torch.Tensor, int]
_BRANCH: contextvars.ContextVar = contextvars.ContextVar("lockstep_branch", default=None)


class _Group:
    """Mailbox of one :func:`run_together` call."""

    def __init__(self, n: int, caller: greenlet):
        self.caller = caller
        self.posted: List[Optional[Tuple[list, Sequence[Message]]]] = [None] * n
        self.done = [False] * n
        self.results: List[Any] = [None] * n
        self.error: Optional[BaseException] = None
        # replicas being re-shared in this round: id(share) -> (share, receive buffer)
        self.resharing: dict = {}


def defer(sends: Sequence[Message], recvs: Sequence[Message]) -> bool:
    """Called by :func:`.arith.exchange`: inside a branch, post this round's messages to the
    group, switch back to the caller until the merged round has run (the receive buffers are
    then filled) and return True; outside a branch return False (the caller exchanges itself)."""
    branch = _BRANCH.get()
    if branch is None:
        return False
    group, index = branch
    group.posted[index] = ([(t, dst, t._version) for t, dst in sends], list(recvs))
    group.caller.switch()
    return True


def resharing(share: torch.Tensor) -> Optional[torch.Tensor]:
    """The buffer into which a sibling branch re-shares ``share`` in the coming round, or None.

    Branches that multiply the same input (the q, k and v projections of one activation) would
    each re-share it; the later ones wait for the first one's round instead (same rounds, 8 B
    per element less each). The answer depends on the program only (which branch asked first
    for this very tensor object in this round), so it is the same on every party."""
    branch = _BRANCH.get()
    if branch is None:
        return None
    entry = branch[0].resharing.get(id(share))
    if entry is None or entry[0] is not share or entry[1] != share._version:
        return None
    return entry[2]


def mark_resharing(share: torch.Tensor, buf: torch.Tensor) -> None:
    """Announce that this branch re-shares ``share`` into ``buf`` in the coming round.

    Matched like the replica cache (:func:`.arith.cached_next`): the very tensor object, not
    modified in place since. Object identity alone is not the same on every party: CrypTen's
    in-place public add keeps party 0's share object and gives the others a new one."""
    branch = _BRANCH.get()
    if branch is not None:
        branch[0].resharing[id(share)] = (share, share._version, buf)


def _branch_body(group: _Group, index: int, fn: Callable[[], Any], settings_stack: list,
                 streams: dict) -> None:
    _BRANCH.set((group, index))
    config.adopt_stack(settings_stack)
    prg.use_branch_streams(streams)
    try:
        group.results[index] = fn()
    except BaseException as exc:  # re-raised in the caller
        if group.error is None:
            group.error = exc
    finally:
        group.done[index] = True


def run_together(*fns: Callable[[], Any]) -> List[Any]:
    """[fn() for fn in fns], with the branches' communication rounds merged.

    The rounds taken are those of the longest branch (plus nothing): round r carries every
    branch's r-th exchange. Results come back in the order of ``fns``; the first exception a
    branch raised is raised here after every branch has finished.
    """
    from cipherdm_torch.protocols.replicated import arith  # local: arith imports this module

    if len(fns) < 2 or not prg.has_streams() or crypten.cfg.mpc.protocol != "rss":
        # one branch, CrypTen's generators (insecure benchmark mode: one shared sequence, no
        # per-branch streams) or another backend (CrypTen's protocols do not exchange through
        # arith): one after the other
        return [fn() for fn in fns]
    # inside a branch, the merged round is this branch's exchange (deferred to its own group)
    post = arith.exchange if _BRANCH.get() is not None else arith.exchange_now
    caller = greenlet.getcurrent()
    group = _Group(len(fns), caller)
    stack = config.snapshot_stack()
    streams = prg.fork_streams(len(fns))
    branches = []
    for i, fn in enumerate(fns):
        g = greenlet(functools.partial(_branch_body, group, i, fn, stack, streams[i]),
                     parent=caller)
        g.gr_context = contextvars.copy_context()  # branch state stays in the branch
        branches.append(g)
    while not all(group.done):
        for i, g in enumerate(branches):
            if not group.done[i]:
                g.switch()  # branch i runs up to its next exchange (or its end)
        posted = [p for p in group.posted if p is not None]
        group.posted = [None] * len(fns)
        resharing, group.resharing = group.resharing, {}  # kept alive until the round is done
        if posted:
            sends = [(t, dst) for s, _ in posted for t, dst, _ in s]
            if any(t._version != v for s, _ in posted for t, _, v in s):
                # a sibling branch wrote to a tensor posted for sending before the round went
                # out: one after the other it would have left unchanged
                raise RuntimeError("lockstep: a branch modified a tensor in place while it "
                                   "waited to be sent; copy it before the in-place op")
            post(sends, [m for _, r in posted for m in r])
    if group.error is not None:
        raise group.error
    return group.results
