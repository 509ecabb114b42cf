"""Differentially private diffusion training, DPDM recipe (imported as ``cipherdm_torch.training``).

Quick start::

    from cipherdm_torch.training import DPDMTrainer, TrainConfig
    trainer = DPDMTrainer(TrainConfig(data="mnist", output_dir="runs/m", epsilon=10, epochs=5,
                                      batch_size=256, noise_multiplicity=4, model_channels=16))
    ledger = trainer.train()
    print(ledger.epsilon_spent)
"""

from cipherdm_torch.training.accounting import dp_accounting_epsilon, epsilon_spent, max_steps_within_budget, noise_multiplier_for
from cipherdm_torch.data import DatasetMissing, ImageDataset, load_dataset
from cipherdm_torch.training.dpsgd import DPSGDEngine, poisson_sample
from cipherdm_torch.training.ledger import BudgetExceeded, LedgerError, PrivacyLedger
from cipherdm_torch.diffusion.denoiser import Denoiser, EDMPrecond, VPrecond, make_precond, per_example_loss
from cipherdm_torch.diffusion.sampling import sample, sample_edm, sample_euler
from cipherdm_torch.training.trainer import DPDMTrainer, TrainConfig, build_denoiser, latest_checkpoint, load_denoiser, save_denoiser, save_image_grid
from cipherdm_torch.diffusion.backbones import DiffusersBackbone, DDPMppUNet, make_diffusers_unet

__all__ = [
    "DPDMTrainer", "TrainConfig", "build_denoiser", "load_denoiser", "save_denoiser",
    "latest_checkpoint", "save_image_grid",
    "DDPMppUNet", "DiffusersBackbone", "make_diffusers_unet",
    "Denoiser", "EDMPrecond", "VPrecond", "make_precond", "per_example_loss",
    "DPSGDEngine", "poisson_sample",
    "noise_multiplier_for", "epsilon_spent", "max_steps_within_budget", "dp_accounting_epsilon",
    "PrivacyLedger", "LedgerError", "BudgetExceeded",
    "ImageDataset", "DatasetMissing", "load_dataset",
    "sample", "sample_edm", "sample_euler",
]
