"""The DPDM denoising loss with noise multiplicity K.

Each example ``x0`` is repeated K times with independent noise levels and draws; row ``r`` of the
batch costs ``lambda(sigma_r) * ||D(x0 + sigma_r n_r; sigma_r, y) - x0||^2`` with EDM's weight
``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` (for both preconditionings of
:mod:`cipherdm_torch.diffusion.denoiser`), and an example's loss is the mean over its K rows.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from cipherdm_torch.diffusion.denoiser import Denoiser

__all__ = ["edm_loss_weight", "rows_for", "row_loss", "per_example_loss", "Rows"]

# (noisy input, sigma, labels or None, clean target), B*K rows each
Rows = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def rows_for(denoiser: Denoiser, x0: torch.Tensor, labels: Optional[torch.Tensor], k: int,
             generator: Optional[torch.Generator] = None, label_dropout: float = 0.0) -> Rows:
    """Expand a batch to B*K rows (example-major: row i*K + j is example i, noise draw j).

    Returns (noisy input, sigma, labels, clean target), all with B*K rows; noise levels come from
    the preconditioning's law (``denoiser.precond.sample_sigma``), and with ``label_dropout`` a
    row's label is replaced by the null label with that probability.
    """
    b = x0.shape[0]
    x_rep = x0.repeat_interleave(k, dim=0)
    sigma = denoiser.precond.sample_sigma(b * k, generator=generator, device=x0.device)
    noise = torch.randn(x_rep.shape, generator=generator, device=x0.device)
    lab = None
    if denoiser.num_classes > 0:
        if labels is None:
            lab = torch.full((b * k,), denoiser.null_label, dtype=torch.long, device=x0.device)
        else:
            lab = labels.long().repeat_interleave(k, dim=0)
            if label_dropout > 0:
                drop = torch.rand(b * k, generator=generator, device=x0.device) < label_dropout
                lab = torch.where(drop, torch.full_like(lab, denoiser.null_label), lab)
    return x_rep + sigma.reshape(-1, 1, 1, 1) * noise, sigma, lab, x_rep


def row_loss(denoiser: Denoiser, model_out: torch.Tensor, sigma: torch.Tensor,
             target: torch.Tensor, pixel_reduction: str = "sum") -> torch.Tensor:
    """Weighted squared error per row: an (N,) tensor (pixels summed, or averaged with "mean")."""
    err = (model_out - target) ** 2
    err = err.flatten(1)
    err = err.sum(1) if pixel_reduction == "sum" else err.mean(1)
    return edm_loss_weight(sigma, denoiser.precond.sigma_data) * err


def per_example_loss(model: nn.Module, denoiser: Denoiser, x0: torch.Tensor,
                     labels: Optional[torch.Tensor], k: int,
                     generator: Optional[torch.Generator] = None, label_dropout: float = 0.0,
                     pixel_reduction: str = "sum", rows: Optional[Rows] = None) -> torch.Tensor:
    """Each example's loss averaged over its K noise draws: a (B,) tensor.

    ``model`` is what is called on the noisy rows (the denoiser itself, or an Opacus wrapper of it).
    ``rows`` (from :func:`rows_for`) fixes the noise draws, e.g. to compare gradient methods.
    """
    if rows is None:
        rows = rows_for(denoiser, x0, labels, k, generator=generator, label_dropout=label_dropout)
    xn, sigma, lab, target = rows
    out = model(xn, sigma, lab)
    loss_rows = row_loss(denoiser, out, sigma, target, pixel_reduction)
    return loss_rows.reshape(x0.shape[0], k).mean(dim=1)
