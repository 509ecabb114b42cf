"""The DPDM trainer: configuration, training loop, EMA, checkpoints, resume and the ledger.

Script use::

    from cipherdm_torch.training import DPDMTrainer, TrainConfig
    cfg = TrainConfig(data="mnist", output_dir="runs/mnist-eps10", epsilon=10.0, epochs=10,
                      batch_size=256, noise_multiplicity=4, model_channels=16)
    trainer = DPDMTrainer(cfg)
    ledger = trainer.train()           # stops at its step count or its privacy budget
    images = trainer.sample(labels=range(10))

Output folder layout::

    <output_dir>/train_config.json          resolved config (noise multiplier included)
    <output_dir>/ledger.json                privacy ledger, rewritten atomically at every step
    <output_dir>/checkpoint-0000500/        a denoiser checkpoint (backbone/, backbone_ema/,
                                            denoiser.json: cipherdm_torch.diffusion.checkpoints),
                                            trainer_state.pt, ledger.json (snapshot), samples.png

Data-parallel training: under ``torchrun --nproc-per-node=N`` (WORLD_SIZE > 1) each process takes
its part of every Poisson batch; rank 0 alone samples, adds the noise and writes the ledger, the
config and the checkpoints (:mod:`cipherdm_torch.training.distributed`). Outside torchrun (or with
one process) nothing changes.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import secrets
import shutil
from dataclasses import asdict, dataclass, fields
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from cipherdm_torch.data import ImageDataset, load_dataset
from cipherdm_torch.diffusion.backbones import DDPMppUNet, count_parameters, make_diffusers_unet
from cipherdm_torch.diffusion.checkpoints import is_checkpoint_dir
from cipherdm_torch.diffusion.denoiser import Denoiser, load_denoiser, make_precond
from cipherdm_torch.diffusion.images import save_image_grid
from cipherdm_torch.diffusion.sampling import sample as sample_images
from cipherdm_torch.errors import UserError
from cipherdm_torch.files import atomic_write_json, read_json
from cipherdm_torch.training.accounting import noise_multiplier_for
from cipherdm_torch.training.distributed import (World, all_reduce_mean, barrier,
                                                 broadcast_module, broadcast_object,
                                                 check_ranks_agree, close_world, init_world,
                                                 rank_slice, resolve_device)
from cipherdm_torch.training.dpsgd import DPSGDEngine, poisson_sample
from cipherdm_torch.training.ledger import LEDGER_FILE, BudgetExceeded, LedgerError, PrivacyLedger

__all__ = [
    "TrainConfig",
    "DPDMTrainer",
    "build_denoiser",
    "latest_checkpoint",
    "resolve_checkpoint",
    "validate_config",
    "derive_dp_seed",
    "FIXED_ON_RESUME",
]


@dataclass
class TrainConfig:
    """Everything a DPDM run needs. Defaults are DPDM's MNIST epsilon-10 recipe (GPU-sized)."""

    # data and output
    data: str = "mnist"
    output_dir: str = "runs/dpdm"
    max_train_examples: Optional[int] = None  # use a random subset (quick runs / tests)
    # model
    backbone: str = "own"  # "own" (DDPMppUNet) or "diffusers" (UNet2DModel)
    model_channels: int = 32
    channel_mult: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (7,)  # DDPMppUNet; diffusers: attention on the last level
    num_heads: int = 1
    dropout: float = 0.1
    class_conditional: bool = True
    # preconditioning
    precond: str = "edm"  # "edm" or "v"
    sigma_data: Optional[float] = None  # default: sqrt(1/3) for edm, 1.0 for v
    p_mean: float = -1.2
    p_std: float = 1.2
    label_dropout: float = 0.1
    pixel_reduction: str = "sum"
    # privacy
    epsilon: float = 10.0
    delta: float = 1e-5
    accountant: str = "rdp"
    noise_multiplier: Optional[float] = None  # None: computed from (epsilon, delta, q, steps)
    max_grad_norm: float = 1.0
    batch_size: int = 4000  # expected logical batch (Poisson sampling, q = batch_size / N)
    noise_multiplicity: int = 32
    epochs: Optional[float] = 300.0
    steps: Optional[int] = None  # overrides epochs
    max_physical_batch: int = 64
    grad_sample_mode: str = "hooks"
    # optimiser
    lr: float = 3e-4
    ema_decay: float = 0.999
    # checkpoints, samples, logging
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_grid: bool = True
    sample_steps: int = 18
    guidance: float = 1.0
    log_every: int = 10
    seed: int = 0  # model init and diffusion noise draws
    dp_seed: Optional[int] = None  # Poisson sampling and DP noise; None: fresh OS randomness
    threads: Optional[int] = None
    device: str = "cpu"  # "cpu", "cuda" (under torchrun: GPU LOCAL_RANK) or "auto"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Options a resumed run cannot change: the ledger's privacy parameters and data set, and the
# checkpoint's architecture. (Step counts, learning rate, checkpoint / sampling options may change.)
FIXED_ON_RESUME = (
    "data", "max_train_examples", "epsilon", "delta", "accountant", "noise_multiplier",
    "max_grad_norm", "batch_size", "noise_multiplicity", "dp_seed", "seed", "label_dropout",
    "pixel_reduction", "backbone", "model_channels", "channel_mult", "num_res_blocks",
    "attn_resolutions", "num_heads", "dropout", "class_conditional", "precond", "sigma_data",
    "p_mean", "p_std",
)


def validate_config(cfg: TrainConfig) -> None:
    """Refuse a config that cannot describe a valid DP run (before anything is written)."""
    def finite(name, ok, what):
        v = getattr(cfg, name)
        if v is None:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
            raise UserError(f"{name} must be {what}, got {v!r}")

    finite("epsilon", lambda v: v > 0, "a finite number > 0")
    finite("delta", lambda v: 0 < v < 1, "strictly between 0 and 1")
    finite("noise_multiplier", lambda v: v > 0, "a finite number > 0")
    finite("max_grad_norm", lambda v: v > 0, "a finite number > 0")
    finite("batch_size", lambda v: v >= 1, "at least 1")
    finite("noise_multiplicity", lambda v: v >= 1, "at least 1")
    finite("epochs", lambda v: v > 0, "a finite number > 0")
    finite("steps", lambda v: v >= 1, "at least 1")
    finite("max_physical_batch", lambda v: v >= 1, "at least 1")
    finite("lr", lambda v: v > 0, "a finite number > 0")
    finite("ema_decay", lambda v: 0 <= v <= 1, "between 0 and 1")
    finite("dropout", lambda v: 0 <= v < 1, "in [0, 1)")
    finite("label_dropout", lambda v: 0 <= v < 1, "in [0, 1)")
    finite("guidance", lambda v: True, "a finite number")
    if cfg.accountant not in ("rdp", "prv"):
        raise UserError(f"accountant must be rdp or prv, got {cfg.accountant!r}")
    if cfg.device not in ("cpu", "cuda", "auto"):
        raise UserError(f"device must be cpu, cuda or auto, got {cfg.device!r}")


def derive_dp_seed(dp_seed: int, ledger_steps: int) -> int:
    """The DP generator's seed for a session that starts after ``ledger_steps`` recorded steps.

    Every released step is recorded in the ledger before its noise, so each session that releases
    noise starts at a different step count and gets an independent stream: a resumed run never
    replays the Poisson batches or the noise of an earlier session (a fresh session of a new run,
    at 0 steps, uses ``dp_seed`` itself).
    """
    if ledger_steps == 0:
        return int(dp_seed)
    digest = hashlib.sha256(f"cipherdm-dp-seed:{int(dp_seed)}:{int(ledger_steps)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def _stream_seed(*parts) -> int:
    """A 62-bit seed derived from ``parts`` (independent streams from one seed)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def _weights_digest(*modules: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- model I/O
def _precond_from_config(cfg: TrainConfig):
    kw = {}
    if cfg.precond == "edm":
        kw = dict(p_mean=cfg.p_mean, p_std=cfg.p_std)
    if cfg.sigma_data is not None:
        kw["sigma_data"] = cfg.sigma_data
    return make_precond(cfg.precond, **kw)


def build_denoiser(cfg: TrainConfig, image_shape: Sequence[int], num_classes: int) -> Denoiser:
    """A fresh ``Denoiser`` for images of shape (C, H, W) as the config describes."""
    c, h, w = image_shape
    if h != w:
        raise ValueError("only square images are supported")
    nc = num_classes if cfg.class_conditional else 0
    if cfg.backbone == "own":
        bb = DDPMppUNet(img_resolution=h, in_channels=c, out_channels=c, num_classes=nc,
                    model_channels=cfg.model_channels, channel_mult=tuple(cfg.channel_mult),
                    num_res_blocks=cfg.num_res_blocks, attn_resolutions=tuple(cfg.attn_resolutions),
                    num_heads=cfg.num_heads, dropout=cfg.dropout)
    elif cfg.backbone == "diffusers":
        mults = tuple(cfg.channel_mult)
        bb = make_diffusers_unet(
            img_resolution=h, in_channels=c, out_channels=c, num_classes=nc,
            block_out_channels=tuple(cfg.model_channels * m for m in mults),
            layers_per_block=cfg.num_res_blocks,
            attention_levels=tuple(i == len(mults) - 1 for i in range(len(mults))),
            dropout=cfg.dropout,
        )
    else:
        raise ValueError(f"backbone must be 'own' or 'diffusers', got {cfg.backbone!r}")
    return Denoiser(bb, _precond_from_config(cfg), nc)


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The checkpoint folder the run's ledger points to (None if none was written yet)."""
    led = PrivacyLedger.load(os.path.join(run_dir, LEDGER_FILE))
    return os.path.join(run_dir, led.checkpoint) if led.checkpoint else None


def resolve_checkpoint(folder: str) -> str:
    """The checkpoint a folder names: a run folder's latest checkpoint, else ``folder`` itself.

    A run folder (a ``ledger.json`` and no ``denoiser.json``) without a checkpoint yet is a
    ``FileNotFoundError``; any other folder is returned unchanged, for the caller to load or refuse.
    """
    if is_checkpoint_dir(folder) or not os.path.isfile(os.path.join(folder, LEDGER_FILE)):
        return folder
    ck = latest_checkpoint(folder)
    if ck is None:
        raise FileNotFoundError(f"{folder}: the run has no checkpoint yet")
    return ck


def _differs(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(a or []) != list(b or [])
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) != float(b)
    return a != b


# ---------------------------------------------------------------------------- trainer
class DPDMTrainer:
    """DP-SGD trainer of a class-conditional diffusion denoiser with noise multiplicity K.

    ``DPDMTrainer(cfg)`` starts a new run in ``cfg.output_dir`` (an existing ledger there is an
    error unless ``resume=True``); ``DPDMTrainer.resume(output_dir)`` continues a run from its
    latest checkpoint and the same ledger. ``dataset`` (an ``ImageDataset``) overrides ``cfg.data``.
    """

    def __init__(self, config: TrainConfig, dataset: Optional[ImageDataset] = None,
                 denoiser: Optional[Denoiser] = None, resume: bool = False,
                 world: Optional[World] = None):
        cfg = copy.deepcopy(config)
        validate_config(cfg)
        self.config = cfg
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        # torchrun's world (process group from its environment), or one process
        self.world = world if world is not None else init_world("cuda" if cuda else "cpu")
        self.device = resolve_device(cfg.device, self.world)
        main = self.world.is_main
        self.dataset = dataset if dataset is not None else load_dataset(cfg.data)
        if cfg.max_train_examples and cfg.max_train_examples < len(self.dataset):
            self.dataset = self.dataset.subset(cfg.max_train_examples, seed=cfg.seed)
        n = len(self.dataset)
        if n == 0:
            raise ValueError("empty training set")
        self.sample_rate = min(1.0, cfg.batch_size / n)
        if cfg.steps is None and cfg.epochs is None:
            raise ValueError("give epochs or steps")
        self.total_steps = int(cfg.steps) if cfg.steps is not None else max(
            1, int(round(cfg.epochs / self.sample_rate)))
        ledger_path = os.path.join(cfg.output_dir, LEDGER_FILE)
        self.ledger_path = ledger_path
        self.fingerprint = self.dataset.fingerprint()

        if resume:
            if not os.path.exists(ledger_path):
                raise LedgerError(f"cannot resume: no ledger at {ledger_path}")
            self.ledger = PrivacyLedger.load(ledger_path)
            self.ledger.check_matches(dataset_fingerprint=self.fingerprint,
                                      accountant=cfg.accountant, delta=cfg.delta,
                                      max_grad_norm=cfg.max_grad_norm,
                                      noise_multiplicity=cfg.noise_multiplicity)
            if cfg.noise_multiplier is None:
                raise LedgerError("resumed config lacks its noise multiplier")
        else:
            if os.path.exists(ledger_path):
                raise LedgerError(
                    f"{ledger_path} exists: resume that run (--resume / DPDMTrainer.resume) or "
                    "choose a new output folder; a privacy ledger is never overwritten")
            if cfg.noise_multiplier is None:
                cfg.noise_multiplier = noise_multiplier_for(
                    cfg.epsilon, cfg.delta, self.sample_rate, self.total_steps, cfg.accountant)
            self.ledger = PrivacyLedger(
                accountant=cfg.accountant, delta=cfg.delta, epsilon_budget=cfg.epsilon,
                max_grad_norm=cfg.max_grad_norm, noise_multiplicity=cfg.noise_multiplicity,
                expected_batch_size=cfg.batch_size, dataset_size=n,
                dataset_fingerprint=self.fingerprint, dataset_name=self.dataset.name,
            )

        torch.manual_seed(cfg.seed)
        self.denoiser = denoiser if denoiser is not None else build_denoiser(
            cfg, self.dataset.shape, self.dataset.num_classes)
        self.denoiser.to(self.device)
        self.ema = copy.deepcopy(self.denoiser).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        # diffusion noise, label dropout
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        # Poisson sampling and DP noise: rank 0 only (the other ranks receive the sampled indices
        # and never hold the noise seed)
        self.dp_gen = noise_gen = None
        if main:
            dp_seed = (derive_dp_seed(cfg.dp_seed, self.ledger.steps) if cfg.dp_seed is not None
                       else secrets.randbits(62))
            self.dp_gen = torch.Generator().manual_seed(dp_seed)
            noise_gen = self.dp_gen if self.device.type == "cpu" else torch.Generator(
                device=self.device).manual_seed(_stream_seed("cipherdm-dp-noise", dp_seed))
        base_opt = torch.optim.Adam(self.denoiser.parameters(), lr=cfg.lr)
        self.step_count = 0  # optimiser steps contained in the current weights
        if resume and self.ledger.checkpoint:
            self._load_checkpoint(os.path.join(cfg.output_dir, self.ledger.checkpoint), base_opt)
        if self.world.distributed:
            # same weights on every rank (rank 0's); each rank its own diffusion-noise stream
            broadcast_module(self.world, self.denoiser)
            broadcast_module(self.world, self.ema)
            if self.world.rank > 0:
                self.gen.manual_seed(_stream_seed("cipherdm-diffusion-noise", cfg.seed,
                                                  self.world.rank, self.step_count))
        self.engine = DPSGDEngine(
            self.denoiser, base_opt, noise_multiplier=cfg.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm, expected_batch_size=self.sample_rate * n,
            k=cfg.noise_multiplicity, max_physical_batch=cfg.max_physical_batch,
            grad_sample_mode=cfg.grad_sample_mode, label_dropout=cfg.label_dropout,
            pixel_reduction=cfg.pixel_reduction, noise_generator=noise_gen, world=self.world,
        )
        self._steps_left = None
        if self.world.distributed:
            # before rank 0 writes anything: every rank has passed its checks, and all agree
            check_ranks_agree(self.world, {
                "dataset": self.fingerprint, "sample_rate": self.sample_rate,
                "total_steps": self.total_steps, "noise_multiplier": cfg.noise_multiplier,
                "ledger_steps": self.ledger.steps, "ledger_history": self.ledger.history,
                "checkpoint": self.ledger.checkpoint, "step_count": self.step_count,
                "steps_left": self.steps_left_in_budget(), "device_type": self.device.type,
            }, "the run's state")
        self.ledger.notes.update({
            "noise_multiplier": cfg.noise_multiplier, "sample_rate": self.sample_rate,
            "planned_steps": self.total_steps, "parameters": count_parameters(self.denoiser),
            "backbone": cfg.backbone, "precond": cfg.precond,
        })
        if self.world.distributed:
            self.ledger.notes["world_size"] = self.world.size
        else:
            self.ledger.notes.pop("world_size", None)
        if main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            atomic_write_json(os.path.join(cfg.output_dir, "train_config.json"), cfg.to_dict())
            self.ledger.save(ledger_path)
        self.last_loss = float("nan")

    @classmethod
    def resume(cls, output_dir: str, dataset: Optional[ImageDataset] = None,
               world: Optional[World] = None, **overrides) -> "DPDMTrainer":
        """Continue the run in ``output_dir`` (config from its train_config.json)."""
        path = os.path.join(output_dir, "train_config.json")
        if not os.path.exists(path):
            raise LedgerError(f"cannot resume: no train_config.json in {output_dir}")
        d = read_json(path)
        fixed = {k: v for k, v in overrides.items()
                 if k in FIXED_ON_RESUME and _differs(v, d.get(k, getattr(TrainConfig, k, None)))}
        if fixed:
            raise LedgerError(
                f"cannot resume {output_dir} with a different "
                + ", ".join(f"{k} ({fixed[k]!r}, the run has {d.get(k)!r})" for k in fixed)
                + ": the ledger and the checkpoint fix these; leave them out, or start a new run "
                  "in a new folder")
        d.update(overrides)
        d["output_dir"] = output_dir
        return cls(TrainConfig.from_dict(d), dataset=dataset, resume=True, world=world)

    def close(self) -> None:
        """End data-parallel training: destroy the process group if this process created it."""
        close_world()

    # -- state ------------------------------------------------------------------------------
    @property
    def epsilon_spent(self) -> float:
        return self.ledger.epsilon_spent

    def steps_left_in_budget(self) -> int:
        """Steps at this run's (sigma, q) that still fit in the budget (cached; exact)."""
        if self._steps_left is None:
            self._steps_left = self.ledger.steps_left(self.config.noise_multiplier, self.sample_rate)
        return self._steps_left

    def _update_ema(self):
        # warm-up (1 + t) / (10 + t): short CPU runs are not dominated by the initial weights
        t = self.step_count
        d = min(self.config.ema_decay, (1.0 + t) / (10.0 + t))
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.denoiser.parameters()):
                pe.lerp_(p.detach(), 1.0 - d)

    # -- one step ---------------------------------------------------------------------------
    def train_step(self) -> float:
        """One DP step. The ledger records the step (atomically) *before* noise is released."""
        cfg = self.config
        if self.steps_left_in_budget() < 1:
            raise BudgetExceeded(
                f"one more step would exceed epsilon {cfg.epsilon} (spent {self.epsilon_spent:.4f})")
        main = self.world.is_main
        # every rank keeps the same ledger in memory; rank 0 writes it before any noise exists
        self.ledger.record_steps(cfg.noise_multiplier, self.sample_rate, 1, update_epsilon=main)
        if main:
            self.ledger.save(self.ledger_path)
        self._steps_left -= 1
        idx = None
        if main:
            idx = poisson_sample(len(self.dataset), self.sample_rate, generator=self.dp_gen)
        if self.world.distributed:  # the global batch from rank 0; this rank's slice of it
            idx = rank_slice(broadcast_object(self.world, idx), self.world)
        x0 = self.dataset.float_images(idx).to(self.device)
        labels = (self.dataset.labels[idx].to(self.device) if self.denoiser.num_classes > 0
                  else None)
        loss = self.engine.step(x0, labels, generator=self.gen)
        if self.world.distributed:  # mean over the global batch
            b = int(idx.numel())
            loss = all_reduce_mean(self.world, loss * b if b else 0.0, b, self.device)
        self._update_ema()
        self.step_count += 1
        self.last_loss = loss
        return loss

    def train(self, progress: bool = True, max_steps: Optional[int] = None) -> PrivacyLedger:
        """Train until the planned step count, ``max_steps`` more steps, or the budget; returns the ledger."""
        cfg = self.config
        todo = self.total_steps - self.step_count
        if max_steps is not None:
            todo = min(todo, max_steps)
        allowed = self.steps_left_in_budget()
        stopped_by_budget = allowed < todo
        todo = max(0, min(todo, allowed))
        bar = None
        if progress and self.world.is_main:
            bar = tqdm(total=self.total_steps, initial=self.step_count, desc="DP-SGD", unit="step")
        loss_avg = None
        for _ in range(todo):
            loss = self.train_step()
            if math.isfinite(loss):
                loss_avg = loss if loss_avg is None else 0.9 * loss_avg + 0.1 * loss
            if bar is not None:
                bar.update(1)
                if self.step_count % max(1, min(cfg.log_every, 10)) == 0 or self.step_count == 1:
                    bar.set_postfix(loss=f"{loss_avg:.3f}" if loss_avg else "-",
                                    eps=f"{self.epsilon_spent:.3f}")
            if cfg.checkpoint_every and self.step_count % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        if self.ledger.checkpoint_step != self.step_count or not self.ledger.checkpoint:
            self.save_checkpoint()
        self.ledger.epsilon_spent = self.ledger.compute_epsilon()
        self.ledger.notes["stopped_by_budget"] = bool(stopped_by_budget)
        if self.world.is_main:
            self.ledger.save(self.ledger_path)
        barrier(self.world)  # no rank returns before rank 0's ledger and checkpoint are written
        if bar is not None:
            bar.set_postfix(loss=f"{loss_avg:.3f}" if loss_avg else "-", eps=f"{self.epsilon_spent:.3f}")
            bar.close()
        return self.ledger

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        """Write a checkpoint (rank 0; every rank must call it at the same step)."""
        cfg = self.config
        name = f"checkpoint-{self.step_count:07d}"
        final = os.path.join(cfg.output_dir, name)
        if self.world.distributed:
            check_ranks_agree(self.world, {"step": self.step_count,
                                           "weights": _weights_digest(self.denoiser, self.ema)},
                              "the weights")
        if self.world.is_main:
            self._write_checkpoint(name, final)
        else:
            self.ledger.epsilon_spent = self.ledger.compute_epsilon()
            self.ledger.checkpoint, self.ledger.checkpoint_step = name, self.step_count
        barrier(self.world)
        return final

    def _write_checkpoint(self, name: str, final: str) -> None:
        cfg = self.config
        tmp = os.path.join(cfg.output_dir, f".tmp-{name}-{os.getpid()}")
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        cpu = self.device.type == "cpu"
        den = self.denoiser if cpu else copy.deepcopy(self.denoiser).cpu()
        ema = self.ema if cpu else copy.deepcopy(self.ema).cpu()
        den.save_pretrained(tmp, ema=ema)
        state = {
            "step": self.step_count,
            "optimizer": self.engine.optimizer.original_optimizer.state_dict(),
            "gen_state": self.gen.get_state(),
        }
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        self.ledger.epsilon_spent = self.ledger.compute_epsilon()
        if cfg.sample_grid:
            try:
                labels = torch.arange(100) % max(1, self.denoiser.num_classes) \
                    if self.denoiser.num_classes > 0 else None
                imgs = sample_images(ema, labels=labels, num_samples=100,
                                     num_steps=cfg.sample_steps, guidance=cfg.guidance,
                                     generator=torch.Generator().manual_seed(1234))
                save_image_grid(imgs, os.path.join(tmp, "samples.png"))
            except Exception as e:  # a sample grid must never cost a checkpoint
                self.ledger.notes["sample_grid_error"] = repr(e)
        snap = copy.deepcopy(self.ledger)
        snap.checkpoint, snap.checkpoint_step = name, self.step_count
        snap.save(os.path.join(tmp, LEDGER_FILE))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        self.ledger.checkpoint, self.ledger.checkpoint_step = name, self.step_count
        self.ledger.save(self.ledger_path)
        self._prune_checkpoints()

    def _prune_checkpoints(self):
        keep = max(1, self.config.keep_checkpoints)
        cks = sorted(d for d in os.listdir(self.config.output_dir) if d.startswith("checkpoint-"))
        for d in cks[:-keep]:
            if d != self.ledger.checkpoint:
                shutil.rmtree(os.path.join(self.config.output_dir, d), ignore_errors=True)

    def _load_checkpoint(self, folder: str, optimizer: torch.optim.Optimizer) -> None:
        if not os.path.isdir(folder):
            raise LedgerError(f"ledger points to missing checkpoint {folder}")
        self.denoiser.load_state_dict(load_denoiser(folder, ema=False).state_dict())
        self.ema.load_state_dict(load_denoiser(folder, ema=True).state_dict())
        state = torch.load(os.path.join(folder, "trainer_state.pt"), map_location="cpu",
                           weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        try:
            self.gen.set_state(state["gen_state"])
        except (RuntimeError, TypeError, ValueError):  # saved from a generator on another device
            self.gen.manual_seed(_stream_seed("cipherdm-diffusion-noise", self.config.seed, 0,
                                              self.step_count))

    # -- sampling ---------------------------------------------------------------------------
    def sample(self, labels: Optional[Sequence[int]] = None, num_samples: int = 16,
               method: str = "edm", num_steps: int = 18, guidance: Optional[float] = None,
               use_ema: bool = True, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images in [-1, 1] from the EMA (or raw) weights; guidance defaults to the config's."""
        den = self.ema if use_ema else self.denoiser
        if self.device.type != "cpu":  # the samplers' noise and labels live on the CPU
            den = copy.deepcopy(den).cpu()
        return sample_images(den, labels=labels, num_samples=num_samples, method=method,
                             num_steps=num_steps,
                             guidance=self.config.guidance if guidance is None else guidance,
                             generator=generator)
