"""Independent parts of a protocol, run side by side: the backend-independent entry point.

The approximations (:mod:`.piecewise`, :mod:`.exp_softmax`) call :func:`run_together` for parts
that do not depend on each other (a comparison and a polynomial). A backend that can merge the
communication rounds of such parts registers its runner here (the replicated backend's
:func:`cipherdm_torch.protocols.replicated.lockstep.run_together`, registered by its
``install``); without one the parts run one after the other, with the same results. So this
module, like the approximations, imports no backend.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

__all__ = ["run_together", "register_runner"]

Runner = Callable[..., List[Any]]
_RUNNER: List[Optional[Runner]] = [None]


def register_runner(runner: Optional[Runner]) -> None:
    """Install (or, with None, remove) the backend's side-by-side runner."""
    _RUNNER[0] = runner


def run_together(*fns: Callable[[], Any]) -> List[Any]:
    """[fn() for fn in fns]; the registered backend may merge their rounds."""
    runner = _RUNNER[0]
    if runner is None:
        return [fn() for fn in fns]
    return runner(*fns)
