"""The preconditioned denoiser (EDM and v-prediction) and its noise-level distributions.

The denoiser is ``D(x; sigma, y) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), y)``
for a backbone ``F`` and noisy input ``x = x0 + sigma n`` (variance-exploding form).

* ``EDMPrecond``: ln sigma ~ N(P_mean, P_std^2) (DPDM eps 1 and 10: sigma_data = sqrt(1/3),
  P_mean = P_std = 1.2).
* ``VPrecond``: v-prediction, the high-sigma schedule of DPDM (eps 0.2): sigma = tan(pi t / 2) with
  t uniform on the interval whose logSNR = -2 ln sigma lies in [logsnr_min, logsnr_max]. With the
  same c_* as EDM (and EDM's loss weight, :mod:`cipherdm_torch.training.loss`) the network's
  target is the v-target (exactly so for sigma_data = 1).

The coefficients are plain functions of sigma, so the secure sampler computes them in public.
``Denoiser.save_pretrained`` / ``from_pretrained`` use the folder format of :mod:`.checkpoints`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from cipherdm_torch.diffusion import checkpoints

__all__ = [
    "edm_coefficients",
    "EDMPrecond",
    "VPrecond",
    "make_precond",
    "Denoiser",
    "save_denoiser",
    "load_denoiser",
]


def edm_coefficients(sigma: Union[torch.Tensor, float],
                     sigma_data: float) -> Tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) for noise level(s) ``sigma`` (tensor or float)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    s2 = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / s2
    c_out = sigma * sigma_data / s2.sqrt()
    c_in = 1.0 / s2.sqrt()
    c_noise = sigma.log() / 4.0
    return c_skip, c_out, c_in, c_noise


class _EDMForm:
    """EDM's coefficients around ``sigma_data`` (shared by both noise-level laws)."""

    sigma_data: float

    def coefficients(self, sigma) -> Tuple[torch.Tensor, ...]:
        return edm_coefficients(sigma, self.sigma_data)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EDMPrecond(_EDMForm):
    """EDM preconditioning with a log-normal noise-level distribution."""

    sigma_data: float = math.sqrt(1.0 / 3.0)
    p_mean: float = -1.2
    p_std: float = 1.2
    kind: str = "edm"

    def sample_sigma(self, n: int, generator: Optional[torch.Generator] = None,
                     device: Optional[torch.device] = None) -> torch.Tensor:
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
    def t_range(self) -> Tuple[float, float]:
        s_max = math.exp(-self.logsnr_min / 2.0)
        s_min = math.exp(-self.logsnr_max / 2.0)
        return 2.0 / math.pi * math.atan(s_min), 2.0 / math.pi * math.atan(s_max)

    def sample_sigma(self, n: int, generator: Optional[torch.Generator] = None,
                     device: Optional[torch.device] = None) -> torch.Tensor:
        t_lo, t_hi = self.t_range
        t = torch.rand(n, generator=generator, device=device) * (t_hi - t_lo) + t_lo
        return torch.tan(math.pi * t / 2.0)


def make_precond(kind: str = "edm", **kw) -> Union[EDMPrecond, VPrecond]:
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

    def forward(self, x: torch.Tensor, sigma: Union[torch.Tensor, float],
                class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.precond.coefficients(sigma)
        bc = (-1, 1, 1, 1)
        f = self.backbone(x * c_in.reshape(bc), c_noise, class_labels)
        return c_skip.reshape(bc) * x + c_out.reshape(bc) * f

    # -- the folder format (checkpoints) ----------------------------------------------------
    def save_pretrained(self, folder: str, ema: Optional["Denoiser"] = None) -> None:
        """Write this denoiser to the checkpoint folder ``folder`` (and ``ema``'s backbone as the
        EMA weights)."""
        checkpoints.write_checkpoint(folder, self.backbone, self.num_classes, self.precond.to_dict(),
                                     ema.backbone if ema is not None else None)

    @classmethod
    def from_pretrained(cls, folder: str, ema: bool = True, with_weights: bool = True) -> "Denoiser":
        """The denoiser in a checkpoint folder (EMA weights by default), in eval mode.

        ``with_weights=False`` builds the architecture from the config files only.
        """
        backbone, meta = checkpoints.load_backbone(folder, ema=ema, with_weights=with_weights)
        return cls(backbone, make_precond(**meta["precond"]), meta["num_classes"]).eval()


def save_denoiser(denoiser: Denoiser, folder: str, ema: Optional[Denoiser] = None) -> None:
    """``denoiser.save_pretrained(folder, ema)``: write a checkpoint folder (:mod:`.checkpoints`)."""
    denoiser.save_pretrained(folder, ema)


def load_denoiser(folder: str, ema: bool = True, with_weights: bool = True) -> Denoiser:
    """``Denoiser.from_pretrained(folder, ema, with_weights)``: a checkpoint folder's denoiser."""
    return Denoiser.from_pretrained(folder, ema=ema, with_weights=with_weights)
