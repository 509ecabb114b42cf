"""Preconditioning, noise-level distributions and the denoising loss (EDM and v-prediction).

The denoiser is ``D(x; sigma, y) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), y)``
for a backbone ``F`` and noisy input ``x = x0 + sigma n`` (variance-exploding form). Its loss per
row is ``lambda(sigma) * ||D(x0 + sigma n; sigma, y) - x0||^2`` with
``lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``.

* ``EDMPrecond``: ln sigma ~ N(P_mean, P_std^2) (DPDM eps 1 and 10: sigma_data = sqrt(1/3),
  P_mean = P_std = 1.2).
* ``VPrecond``: v-prediction, the high-sigma schedule of DPDM (eps 0.2): sigma = tan(pi t / 2) with
  t uniform on the interval whose logSNR = -2 ln sigma lies in [logsnr_min, logsnr_max]. With the
  same c_* and lambda as EDM the network's target is the v-target (exactly so for sigma_data = 1).

The coefficient functions are plain functions of sigma so that the sampling code can reuse them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn

__all__ = [
    "edm_coefficients",
    "edm_loss_weight",
    "EDMPrecond",
    "VPrecond",
    "make_precond",
    "Denoiser",
]


def edm_coefficients(sigma: torch.Tensor, sigma_data: float):
    """(c_skip, c_out, c_in, c_noise) for noise level(s) ``sigma`` (tensor or float)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    s2 = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / s2
    c_out = sigma * sigma_data / s2.sqrt()
    c_in = 1.0 / s2.sqrt()
    c_noise = sigma.log() / 4.0
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class _EDMForm:
    """EDM's coefficients and loss weight around ``sigma_data`` (shared by both noise-level laws)."""

    sigma_data: float

    def coefficients(self, sigma):
        return edm_coefficients(sigma, self.sigma_data)

    def loss_weight(self, sigma):
        return edm_loss_weight(sigma, self.sigma_data)

    def to_dict(self):
        return asdict(self)


@dataclass
class EDMPrecond(_EDMForm):
    """EDM preconditioning with a log-normal noise-level distribution."""

    sigma_data: float = math.sqrt(1.0 / 3.0)
    p_mean: float = -1.2
    p_std: float = 1.2
    kind: str = "edm"

    def sample_sigma(self, n: int, generator: Optional[torch.Generator] = None, device=None):
        z = torch.randn(n, generator=generator, device=device)
        return (z * self.p_std + self.p_mean).exp()


@dataclass
class VPrecond(_EDMForm):
    """v-prediction with sigma = tan(pi t / 2), t uniform on the logSNR range (DPDM, eps 0.2)."""

    sigma_data: float = 1.0
    logsnr_min: float = -9.0
    logsnr_max: float = 13.0
    kind: str = "v"

    @property
    def t_range(self):
        s_max = math.exp(-self.logsnr_min / 2.0)
        s_min = math.exp(-self.logsnr_max / 2.0)
        return 2.0 / math.pi * math.atan(s_min), 2.0 / math.pi * math.atan(s_max)

    def sample_sigma(self, n: int, generator: Optional[torch.Generator] = None, device=None):
        t_lo, t_hi = self.t_range
        t = torch.rand(n, generator=generator, device=device) * (t_hi - t_lo) + t_lo
        return torch.tan(math.pi * t / 2.0)


def make_precond(kind: str = "edm", **kw):
    """``make_precond("edm", sigma_data=...)`` or ``make_precond("v", ...)`` (also from to_dict())."""
    kw = {k: v for k, v in kw.items() if k != "kind"}
    if kind == "edm":
        return EDMPrecond(**kw)
    if kind in ("v", "vpred", "v-prediction"):
        return VPrecond(**kw)
    raise ValueError(f"unknown preconditioning {kind!r}; choose 'edm' or 'v'")


class Denoiser(nn.Module):
    """Preconditioned denoiser ``D(x; sigma, labels)`` around a backbone ``F(x, c_noise, labels)``.

    ``num_classes`` > 0 makes it class-conditional; label ``num_classes`` is the null label.
    """

    def __init__(self, backbone: nn.Module, precond, num_classes: int = 0):
        super().__init__()
        self.backbone = backbone
        self.precond = precond
        self.num_classes = num_classes

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.precond.coefficients(sigma)
        bc = (-1, 1, 1, 1)
        f = self.backbone(x * c_in.reshape(bc), c_noise, class_labels)
        return c_skip.reshape(bc) * x + c_out.reshape(bc) * f

    def rows_for(self, x0, labels, k: int, generator=None, label_dropout: float = 0.0):
        """Expand a batch to B*K rows (example-major: row i*K + j is example i, noise draw j).

        Returns (noisy input, sigma, labels, clean target), all with B*K rows.
        """
        b = x0.shape[0]
        x_rep = x0.repeat_interleave(k, dim=0)
        sigma = self.precond.sample_sigma(b * k, generator=generator, device=x0.device)
        noise = torch.randn(x_rep.shape, generator=generator, device=x0.device)
        lab = None
        if self.num_classes > 0:
            if labels is None:
                lab = torch.full((b * k,), self.null_label, dtype=torch.long, device=x0.device)
            else:
                lab = labels.long().repeat_interleave(k, dim=0)
                if label_dropout > 0:
                    drop = torch.rand(b * k, generator=generator, device=x0.device) < label_dropout
                    lab = torch.where(drop, torch.full_like(lab, self.null_label), lab)
        return x_rep + sigma.reshape(-1, 1, 1, 1) * noise, sigma, lab, x_rep

    def row_loss(self, model_out, sigma, target, pixel_reduction: str = "sum"):
        """Weighted squared error per row: (N,) tensor."""
        err = (model_out - target) ** 2
        err = err.flatten(1)
        err = err.sum(1) if pixel_reduction == "sum" else err.mean(1)
        return self.precond.loss_weight(sigma) * err


def per_example_loss(
    model: nn.Module,
    denoiser: Denoiser,
    x0: torch.Tensor,
    labels,
    k: int,
    generator=None,
    label_dropout: float = 0.0,
    pixel_reduction: str = "sum",
    rows=None,
):
    """Each example's loss averaged over its K noise draws: a (B,) tensor.

    ``model`` is what is called on the noisy rows (the denoiser itself, or an Opacus wrapper of it).
    ``rows`` (from ``denoiser.rows_for``) fixes the noise draws, e.g. to compare gradient methods.
    """
    if rows is None:
        rows = denoiser.rows_for(x0, labels, k, generator=generator, label_dropout=label_dropout)
    xn, sigma, lab, target = rows
    out = model(xn, sigma, lab)
    loss_rows = denoiser.row_loss(out, sigma, target, pixel_reduction)
    return loss_rows.reshape(x0.shape[0], k).mean(dim=1)


__all__.append("per_example_loss")
