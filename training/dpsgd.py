"""DP-SGD with noise multiplicity K on Opacus.

One logical step (DPDM):

1. Poisson sampling: every training example joins the batch independently with probability q.
2. Each selected example gets K noise levels / noise draws; the B*K rows go through the model in
   physical micro-batches of at most ``max_physical_batch`` examples (so memory stays bounded).
3. Opacus' ``GradSampleModule`` (``loss_reduction="sum"``) gives one gradient per *row* of the
   loss ``sum_i mean_k l_ik``; we sum each example's K rows (rows are example-major), which is the
   gradient of that example's K-averaged loss: one per-example gradient, as in DPDM.
4. Opacus' ``DPOptimizer`` clips each per-example gradient to C, accumulates over micro-batches,
   adds N(0, sigma^2 C^2) noise once per logical step and divides by the expected batch size qN.

Stock Opacus on the B*K rows would clip each row separately (each example would contribute up to
K*C), which breaks the accounting; the K-collapse before clipping is what makes it right.
"""

from __future__ import annotations

import warnings
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator

from cipherdm_torch.diffusion.denoiser import Denoiser
from cipherdm_torch.errors import UserError
from cipherdm_torch.training.distributed import World, WorldDPOptimizer
from cipherdm_torch.training.loss import Rows, per_example_loss
from cipherdm_torch.training.opacus_compat import clone_in_place_outputs

__all__ = ["DPSGDEngine", "poisson_sample", "collapse_grad_samples", "check_no_example_mixing",
           "GRAD_SAMPLE_MODES"]

GRAD_SAMPLE_MODES = ("hooks", "functorch")


def poisson_sample(n: int, q: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Indices of a Poisson-sampled batch: each of n examples kept independently with prob. q."""
    return torch.nonzero(torch.rand(n, generator=generator) < q, as_tuple=False).flatten()


def collapse_grad_samples(params: Iterable[nn.Parameter], batch: int, k: int) -> None:
    """Replace each ``p.grad_sample`` of B*K rows by the per-example sums of its K rows (B rows)."""
    for p in params:
        gs = p.grad_sample
        if isinstance(gs, list):
            raise RuntimeError("grad samples from several forward passes; expected one")
        if gs.shape[0] != batch * k:
            raise RuntimeError(
                f"grad_sample has {gs.shape[0]} rows, expected batch*K = {batch}*{k}"
            )
        p.grad_sample = gs.reshape(batch, k, *gs.shape[1:]).sum(dim=1)


def check_no_example_mixing(model: nn.Module) -> None:
    """Refuse a model with a layer that mixes examples (BatchNorm, with or without running stats)
    or that Opacus cannot compute per-example gradients for.

    Per-example clipping bounds one example's influence only if every example's output depends on
    that example alone; a batch-statistics layer lets one example move every other example's
    gradient, so the ledger's epsilon would be wrong. Checked before any step (Opacus'
    ``ModuleValidator`` plus an explicit scan of the batch-norm family).
    """
    mixing = [f"{name or '<model>'} ({type(m).__name__})" for name, m in model.named_modules()
              if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm))]
    if mixing:
        raise UserError(
            f"the model has layers that mix examples within a batch, which breaks DP-SGD's "
            f"per-example clipping and the privacy accounting: {', '.join(mixing)}; replace them "
            f"with GroupNorm / LayerNorm (opacus.validators.ModuleValidator.fix does this)")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        first = " ".join(str(errors[0]).split())[:300]
        raise UserError(f"the model cannot be trained with DP-SGD ({len(errors)} problem(s) found "
                        f"by Opacus' ModuleValidator): {first}")


def _contiguous_pre_hook(module, args):
    return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)


class DPSGDEngine:
    """Per-example-clipped, noised gradient steps of a ``Denoiser`` with noise multiplicity K.

    ``optimizer`` is an ordinary torch optimizer over ``denoiser.parameters()``; it is wrapped in
    Opacus' ``DPOptimizer``. ``grad_sample_mode``: ``"hooks"`` (Opacus' per-layer samplers; conv
    inputs forced contiguous) or ``"functorch"`` (Opacus' vmap-based per-layer samplers).
    ``noise_multiplier=0`` and ``max_grad_norm=inf`` give non-private (but per-example) steps.
    ``world`` (torchrun, :mod:`.distributed`): ``step`` takes this rank's part of the logical batch;
    ``expected_batch_size`` stays the global one and ``noise_generator`` is used on rank 0 only.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        k: int = 1,
        max_physical_batch: int = 64,
        grad_sample_mode: str = "hooks",
        label_dropout: float = 0.1,
        pixel_reduction: str = "sum",
        noise_generator: Optional[torch.Generator] = None,
        world: Optional[World] = None,
    ):
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}")
        if k < 1:
            raise ValueError("noise multiplicity K must be >= 1")
        check_no_example_mixing(denoiser)
        self.denoiser = denoiser
        self.k = int(k)
        self.max_physical_batch = max(1, int(max_physical_batch))
        self.label_dropout = label_dropout
        self.pixel_reduction = pixel_reduction
        self._hooks = []
        if grad_sample_mode == "hooks":
            # Opacus' conv sampler assumes contiguous NCHW inputs (diffusion/backbones.py, notes).
            for m in denoiser.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    self._hooks.append(m.register_forward_pre_hook(_contiguous_pre_hook))
        # diffusers' Skip up blocks add into conv_out's output in place, which Opacus' full
        # backward hooks forbid: hand the model a clone of it (training/opacus_compat.py)
        self._hooks.append(clone_in_place_outputs(denoiser))
        self.gsm = GradSampleModule(
            denoiser,
            batch_first=True,
            loss_reduction="sum",
            force_functorch=(grad_sample_mode == "functorch"),
        )
        self.params = [p for p in denoiser.parameters() if p.requires_grad]
        # data-parallel (torchrun): clipped sums all-reduced, noise added by rank 0 only, divided by
        # the global expected batch (training/distributed.py)
        dp_optimizer = WorldDPOptimizer if world is not None and world.distributed else DPOptimizer
        self.optimizer = dp_optimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=noise_generator,
        )
        self.last_per_example_norms: Optional[torch.Tensor] = None

    # -- per-example gradients -------------------------------------------------------------
    def _backward_chunk(self, x0, labels, generator, rows=None) -> torch.Tensor:
        loss = per_example_loss(
            self.gsm,
            self.denoiser,
            x0,
            labels,
            self.k,
            generator=generator,
            label_dropout=self.label_dropout,
            pixel_reduction=self.pixel_reduction,
            rows=rows,
        )
        with warnings.catch_warnings():
            # Inputs never require grad; Opacus' full backward hooks still fire on outputs.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.sum().backward()
        collapse_grad_samples(self.params, x0.shape[0], self.k)
        return loss.detach()

    def per_example_grads(self, x0: torch.Tensor, labels: Optional[torch.Tensor] = None,
                          generator: Optional[torch.Generator] = None,
                          rows: Optional[Rows] = None) -> Dict[str, torch.Tensor]:
        """Unclipped per-example gradients of the K-averaged losses: name -> (B, *param.shape)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._backward_chunk(x0, labels, generator, rows=rows)
        out = {n: p.grad_sample.detach().clone() for n, p in self.denoiser.named_parameters()
               if p.requires_grad}
        self.optimizer.zero_grad(set_to_none=True)
        return out

    # -- one logical DP step ---------------------------------------------------------------
    def step(self, x0: torch.Tensor, labels: Optional[torch.Tensor],
             generator: Optional[torch.Generator] = None) -> float:
        """One DP-SGD step on a (Poisson-sampled) logical batch; returns its mean loss.

        An empty batch is a valid Poisson draw: the update is then noise only.
        """
        b = x0.shape[0]
        self.optimizer.zero_grad(set_to_none=True)
        self.denoiser.train()
        losses = []
        norms = []
        chunks = list(range(0, b, self.max_physical_batch)) or [0]
        for ci, start in enumerate(chunks):
            last = ci == len(chunks) - 1
            if b == 0:
                for p in self.params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            else:
                xs = x0[start:start + self.max_physical_batch]
                ls = None if labels is None else labels[start:start + self.max_physical_batch]
                losses.append(self._backward_chunk(xs, ls, generator))
                norms.append(self._norms())
            if not last:
                self.optimizer.signal_skip_step(do_skip=True)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            else:
                self.optimizer.step()
        self.last_per_example_norms = torch.cat(norms) if norms else torch.zeros(0)
        return float(torch.cat(losses).mean()) if losses else float("nan")

    def _norms(self) -> torch.Tensor:
        sq = None
        for p in self.params:
            g = p.grad_sample.reshape(p.grad_sample.shape[0], -1).pow(2).sum(1)
            sq = g if sq is None else sq + g
        return sq.sqrt().detach()

    @property
    def noise_multiplier(self) -> float:
        return self.optimizer.noise_multiplier

    def detach(self) -> None:
        """Remove Opacus' and our hooks from the model (e.g. before sampling / export)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.gsm.remove_hooks()
