"""The privacy ledger: a JSON record of what a set of weights cost, written atomically.

``ledger.json`` holds the accountant, delta, the epsilon budget, the privacy history (segments of
``[noise_multiplier, sample_rate, steps]``), the epsilon spent, the training hyperparameters that
matter for privacy (K, C, expected batch, data set size and fingerprint) and a pointer to the latest
checkpoint. Every write is atomic (:func:`cipherdm_torch.files.atomic_write_json`: a temporary file in
the same folder, fsync, ``os.replace``): a killed run leaves either the old or the new ledger, never
a torn one. This module is the one reader of ``ledger.json`` (:meth:`PrivacyLedger.load`,
:func:`read_ledger`); evaluation and the demo read ledgers through it.

Steps are recorded *before* their noisy gradient is applied, so the ledger never undercounts: a run
killed between checkpoints keeps the steps it took in its ledger even though the weights of those
steps are lost (a resumed run starts from the checkpoint and continues this same ledger).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from cipherdm_torch.errors import UserError
from cipherdm_torch.files import atomic_write_json, read_json
from cipherdm_torch.training.accounting import epsilon_spent, max_steps_within_budget, merge_history

__all__ = ["PrivacyLedger", "LedgerError", "BudgetExceeded", "read_ledger", "LEDGER_FILE",
           "LEDGER_VERSION"]

LEDGER_FILE = "ledger.json"
LEDGER_VERSION = 1


class LedgerError(RuntimeError):
    """A ledger that is missing, corrupt or does not match the run."""


class BudgetExceeded(RuntimeError):
    """A step would take the run past its privacy budget."""


@dataclass
class PrivacyLedger:
    accountant: str
    delta: float
    epsilon_budget: float
    max_grad_norm: float
    noise_multiplicity: int
    expected_batch_size: float
    dataset_size: int
    dataset_fingerprint: str
    dataset_name: str = ""
    history: List[List[float]] = field(default_factory=list)
    epsilon_spent: float = 0.0
    steps: int = 0
    checkpoint: Optional[str] = None
    checkpoint_step: int = 0
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    notes: Dict[str, Any] = field(default_factory=dict)
    version: int = LEDGER_VERSION

    # -- accounting -----------------------------------------------------------------------
    def compute_epsilon(self, extra_steps: int = 0, noise_multiplier: Optional[float] = None,
                        sample_rate: Optional[float] = None) -> float:
        hist = [tuple(h) for h in self.history]
        if extra_steps:
            hist.append((noise_multiplier, sample_rate, extra_steps))
        return epsilon_spent(hist, self.delta, self.accountant)

    def steps_left(self, noise_multiplier: float, sample_rate: float) -> int:
        """How many more steps at (sigma, q) fit in the budget."""
        return max_steps_within_budget(
            self.history, noise_multiplier, sample_rate, self.epsilon_budget, self.delta,
            self.accountant,
        )

    def record_steps(self, noise_multiplier: float, sample_rate: float, n: int = 1,
                     update_epsilon: bool = True) -> None:
        hist = merge_history([tuple(h) for h in self.history] + [(noise_multiplier, sample_rate, n)])
        self.history = [list(h) for h in hist]
        self.steps += int(n)
        if update_epsilon:
            self.epsilon_spent = self.compute_epsilon()
        self.updated = time.time()

    # -- persistence ----------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def save(self, path: str) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "PrivacyLedger":
        """The ledger in the file ``path`` (its epsilon recomputed from the history)."""
        if not os.path.exists(path):
            raise LedgerError(f"no privacy ledger at {path}")
        try:
            d = read_json(path)
        except UserError as e:
            raise LedgerError(str(e)) from None
        if not isinstance(d, dict) or d.get("version") != LEDGER_VERSION:
            raise LedgerError(f"{path} is not a version-{LEDGER_VERSION} privacy ledger")
        known = set(cls.__dataclass_fields__)
        led = cls(**{k: v for k, v in d.items() if k in known})
        # Never trust a stored epsilon: recompute it from the history.
        led.epsilon_spent = led.compute_epsilon()
        return led

    def check_matches(self, *, dataset_fingerprint: str, accountant: str, delta: float,
                      max_grad_norm: float, noise_multiplicity: int) -> None:
        """Resuming must continue the same ledger: same data, accountant, delta, C and K."""
        problems = []
        if dataset_fingerprint != self.dataset_fingerprint:
            problems.append("data set fingerprint differs")
        if accountant != self.accountant:
            problems.append(f"accountant {accountant} != {self.accountant}")
        if float(delta) != float(self.delta):
            problems.append(f"delta {delta} != {self.delta}")
        if float(max_grad_norm) != float(self.max_grad_norm):
            problems.append(f"clip norm {max_grad_norm} != {self.max_grad_norm}")
        if int(noise_multiplicity) != int(self.noise_multiplicity):
            problems.append(f"K {noise_multiplicity} != {self.noise_multiplicity}")
        if problems:
            raise LedgerError("cannot resume with this ledger: " + "; ".join(problems))


def read_ledger(folder: str) -> Optional[PrivacyLedger]:
    """The privacy ledger of a run folder or a checkpoint folder, or None if there is none.

    A folder's own ``ledger.json`` (a run's ledger, or the snapshot a checkpoint carries), else
    the one in its parent folder (a checkpoint inside its run folder).
    """
    for d in (folder, os.path.dirname(os.path.abspath(folder))):
        path = os.path.join(d, LEDGER_FILE)
        if os.path.isfile(path):
            return PrivacyLedger.load(path)
    return None
