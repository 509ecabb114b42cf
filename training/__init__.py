"""Differentially private diffusion training, DPDM recipe (imported as ``cipherdm_torch.training``).

Layer 3 (never imports CrypTen): the DP-SGD engine with noise multiplicity K (:mod:`.dpsgd`), its
loss (:mod:`.loss`), privacy accounting (:mod:`.accounting`), the privacy ledger (:mod:`.ledger`),
the trainer and its config (:mod:`.trainer`), data-parallel training on torchrun
(:mod:`.distributed`), and the DP-SGD step benchmark (:mod:`.benchmark`).
The denoiser, its backbones and samplers are in :mod:`cipherdm_torch.diffusion`; data sets in
:mod:`cipherdm_torch.data`.

Quick start::

    from cipherdm_torch.training import DPDMTrainer, TrainConfig
    trainer = DPDMTrainer(TrainConfig(data="mnist", output_dir="runs/m", epsilon=10, epochs=5,
                                      batch_size=256, noise_multiplicity=4, model_channels=16))
    ledger = trainer.train()
    print(ledger.epsilon_spent)
"""

from cipherdm_torch.training.accounting import (dp_accounting_epsilon, epsilon_spent,
                                                max_steps_within_budget, noise_multiplier_for)
from cipherdm_torch.training.dpsgd import DPSGDEngine, poisson_sample
from cipherdm_torch.training.ledger import BudgetExceeded, LedgerError, PrivacyLedger, read_ledger
from cipherdm_torch.training.loss import per_example_loss
from cipherdm_torch.training.trainer import (DPDMTrainer, TrainConfig, build_denoiser,
                                             latest_checkpoint, resolve_checkpoint)

__all__ = [
    "DPDMTrainer", "TrainConfig", "build_denoiser", "latest_checkpoint", "resolve_checkpoint",
    "DPSGDEngine", "poisson_sample", "per_example_loss",
    "noise_multiplier_for", "epsilon_spent", "max_steps_within_budget", "dp_accounting_epsilon",
    "PrivacyLedger", "LedgerError", "BudgetExceeded", "read_ledger",
]
