"""Privacy accounting for Poisson-subsampled Gaussian DP-SGD (Opacus' RDP or PRV accountant).

A run's privacy history is a list of ``(noise_multiplier, sample_rate, steps)`` segments, the format
of Opacus' accountants; it is what the ledger stores, so a resumed run continues the same history.
``dp_accounting_epsilon`` recomputes epsilon with Google's ``dp-accounting`` package (an independent
implementation) for cross-checks.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Iterable, List, Sequence, Tuple

from opacus.accountants import create_accountant

from cipherdm_torch.errors import UserError

__all__ = [
    "ACCOUNTANTS",
    "noise_multiplier_for",
    "epsilon_spent",
    "max_steps_within_budget",
    "merge_history",
    "dp_accounting_epsilon",
]

ACCOUNTANTS = ("rdp", "prv")
MAX_SIGMA = 1e4  # more noise than this drowns any gradient; a target needing it is refused
# RDP orders: Opacus' defaults extended to large orders, where the optimum lies at small epsilon /
# large noise (Opacus' default range stops at 63 and then overstates epsilon). The ledger, the
# budget check and the sigma search all use these same orders.
RDP_ORDERS = ([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
              + list(range(64, 256, 8)) + list(range(256, 1025, 64)))
Segment = Tuple[float, float, int]


@contextmanager
def _quiet_order_warning():
    """Opacus warns when the optimal RDP order is the largest tried; expected at large sigma."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        yield


def _check(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return accountant


def merge_history(history: Iterable[Sequence]) -> List[Segment]:
    """Canonical history: consecutive segments with equal (sigma, q) merged, empty ones dropped."""
    out: List[Segment] = []
    for sigma, q, steps in history:
        steps = int(steps)
        if steps <= 0:
            continue
        if out and out[-1][0] == float(sigma) and out[-1][1] == float(q):
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + steps)
        else:
            out.append((float(sigma), float(q), steps))
    return out


def epsilon_spent(history: Iterable[Sequence], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after all segments of ``history`` (0 for an empty history)."""
    hist = merge_history(history)
    if not hist:
        return 0.0
    acc = create_accountant(mechanism=_check(accountant))
    acc.history = [tuple(h) for h in hist]
    kw = {"alphas": RDP_ORDERS} if accountant == "rdp" else {}
    with _quiet_order_warning():
        return float(acc.get_epsilon(delta=delta, **kw))


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    relative_tolerance: float = 1e-3,
) -> float:
    """Smallest noise multiplier with epsilon(steps) <= target_epsilon, to a relative tolerance.

    The returned sigma meets the target exactly (epsilon <= target) and spends at least
    ``(1 - relative_tolerance) * target_epsilon``: a relative, not absolute, tolerance, so a small
    budget does not buy more noise than it needs. Epsilon is computed as the ledger computes it
    (same accountant, same RDP orders). An unreachable target raises ``UserError``.
    """
    for name, value in (("epsilon", target_epsilon), ("delta", delta), ("sample rate", sample_rate)):
        if not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value}")
    if not target_epsilon > 0:
        raise UserError(f"epsilon must be > 0, got {target_epsilon}")
    if not 0 < delta < 1:
        raise UserError(f"delta must lie strictly between 0 and 1, got {delta}")
    if not (0 < sample_rate <= 1):
        raise UserError(f"sample rate must be in (0, 1], got {sample_rate}")
    if int(steps) < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    _check(accountant)

    def eps(sigma):
        return epsilon_spent([(sigma, sample_rate, int(steps))], delta, accountant)

    lo, hi = 0.0, 1.0
    while not eps(hi) <= target_epsilon:
        lo, hi = hi, hi * 2
        if hi > MAX_SIGMA:
            raise UserError(
                f"epsilon {target_epsilon} at delta {delta} is out of reach for {int(steps)} steps at "
                f"sample rate {sample_rate:.4g} (it would need a noise multiplier above {MAX_SIGMA:g}): "
                "raise epsilon, or use fewer steps or a smaller batch")
    # invariant: eps(lo) > target (or lo = 0) and eps(hi) <= target
    while True:
        e_hi = eps(hi)
        if target_epsilon - e_hi <= relative_tolerance * target_epsilon or hi - lo <= 1e-9 * hi:
            return float(hi)
        mid = (lo + hi) / 2
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid


def max_steps_within_budget(
    history: Iterable[Sequence],
    noise_multiplier: float,
    sample_rate: float,
    epsilon_budget: float,
    delta: float,
    accountant: str = "rdp",
    upper: int = 10_000_000,
) -> int:
    """Largest n >= 0 such that ``history`` + n steps at (sigma, q) stays within the budget."""
    base = merge_history(history)

    def eps(n):
        return epsilon_spent(base + [(noise_multiplier, sample_rate, n)], delta, accountant)

    if eps(0) > epsilon_budget:
        return 0
    lo, hi = 0, 1
    while eps(hi) <= epsilon_budget:
        lo, hi = hi, hi * 2
        if hi > upper:
            return upper
    while hi - lo > 1:  # invariant: eps(lo) <= budget < eps(hi)
        mid = (lo + hi) // 2
        if eps(mid) <= epsilon_budget:
            lo = mid
        else:
            hi = mid
    return lo


def dp_accounting_epsilon(
    history: Iterable[Sequence], delta: float, method: str = "rdp"
) -> float:
    """Epsilon of the same history by Google's ``dp_accounting`` (``method`` "rdp" or "pld")."""
    import dp_accounting  # test / cross-check dependency

    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
        for sigma, q, steps in merge_history(history)
    ]
    event = dp_accounting.ComposedDpEvent(events)
    if method == "rdp":
        acc = dp_accounting.rdp.RdpAccountant()
    elif method == "pld":
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    else:
        raise ValueError("method must be 'rdp' or 'pld'")
    acc.compose(event)
    return float(acc.get_epsilon(delta))
