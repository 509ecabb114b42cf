"""The sampling job behind ``cipherdm sample`` / ``demo``: three parties sample from a model.

The model owner's rank loads the weights; the other ranks build the same architecture from its
public config only (no weights) and receive the weights as secret shares. The user's rank draws
the noise from the seed and shares it together with the class labels; only the user gets the
images. Writes a PNG grid and a JSON cost report (per party: totals, per op type, per step), and
with ``check`` the fidelity against plaintext sampling of the same model with the same noise.

Process boundaries: the seed and labels are sent only to the user's party process and the
weights are read only by the owner's. ``check`` is the owner's debugging tool: it also gives
the owner's process the seed and labels and computes the plaintext twin there.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from typing import List, Optional, Tuple

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from cipherdm_torch.diffusion.backbones import image_shape
from cipherdm_torch.diffusion.checkpoints import backbone_dir, is_checkpoint_dir
from cipherdm_torch.diffusion.denoiser import load_denoiser
from cipherdm_torch.diffusion.images import save_image_grid
from cipherdm_torch.compiler import encrypt
from cipherdm_torch.diffusion.sampling import fidelity
from cipherdm_torch.errors import UserError
from cipherdm_torch.files import atomic_write_json
from cipherdm_torch.mpc import netsim
from cipherdm_torch.mpc.runtime import Roles, launch, party
from cipherdm_torch.pipelines.secure import (SecureDDIMPipeline, SecureDDPMPipeline,
                                             SecureEDMPipeline, plaintext_edm_sample,
                                             plaintext_scheduler_sample)
from cipherdm_torch.protocols import config as pconfig

__all__ = ["SampleSpec", "EMBEDDED_MODEL", "SAMPLERS", "DEVICES", "check_device", "party_device", "embedded_model_dir", "load_model",
           "check_weights", "run_job", "summary", "plaintext_twin", "write_samples"]

EMBEDDED_MODEL = "dpdm-mnist"
SAMPLERS = ("edm", "euler", "ddim", "ddpm")


def embedded_model_dir() -> str:
    return str(resources.files("cipherdm_torch") / "assets" / EMBEDDED_MODEL)


@dataclass
class SampleSpec:
    """Everything the parties need to agree on (all public except seed and labels)."""

    model: str
    sampler: str = "euler"
    steps: int = 10
    labels: List[int] = field(default_factory=list)
    seed: int = 0
    guidance: float = 1.0
    protocols: str = "optimised"
    backend: str = "rss"
    link: str = "loopback"
    ema: bool = True
    device: str = "cpu"  # where the ring products run: cpu, cuda or auto (see party_device)


DEVICES = ("cpu", "cuda", "auto")


def check_device(spec: str) -> str:
    """``--device`` before the parties start: cpu, cuda (CUDA must be present) or auto."""
    if spec not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}, got {spec!r}")
    if spec == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but CUDA is not available on this machine "
                        "(torch.cuda.is_available() is False): use --device cpu or auto")
    return spec


def party_device(spec: str, rank: int) -> Optional[str]:
    """The ``product_device`` of party ``rank``: None on the CPU; with CUDA, party k uses GPU
    k mod (GPUs here), so three local parties spread over the GPUs of one machine."""
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return None
    check_device("cuda")
    return f"cuda:{rank % torch.cuda.device_count()}"


def load_model(folder: str, with_weights: bool, ema: bool = True) -> Tuple[torch.nn.Module, str]:
    """(model, kind): a DPDM ``Denoiser`` ("dpdm") or a diffusers ``UNet2DModel`` ("unet2d").

    ``with_weights=False`` builds the architecture from the config files only.
    """
    if not os.path.isdir(folder):
        raise UserError(f"model folder {folder!r} does not exist (pass a DPDM checkpoint folder "
                        f"or a diffusers UNet2DModel folder with --model)")
    if is_checkpoint_dir(folder):
        return load_denoiser(folder, ema=ema, with_weights=with_weights), "dpdm"
    sub = _weights_folder(folder, "unet2d", ema)
    if not os.path.exists(os.path.join(sub, "config.json")):
        raise UserError(f"{folder!r} is neither a DPDM checkpoint (denoiser.json) nor a "
                        f"diffusers UNet2DModel folder (config.json): pass a model folder with "
                        f"--model")
    if with_weights:
        return UNet2DModel.from_pretrained(sub, low_cpu_mem_usage=False).eval(), "unet2d"
    return UNet2DModel.from_config(UNet2DModel.load_config(sub)).eval(), "unet2d"


def _weights_folder(folder: str, kind: str, ema: bool) -> str:
    if kind == "dpdm":
        return backbone_dir(folder, ema)
    return os.path.join(folder, "unet") if os.path.isdir(os.path.join(folder, "unet")) else folder


def _safetensors_header(path: str) -> dict:
    """name -> shape from a safetensors file's header; refuses a truncated or garbage file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 1 or n > min(size - 8, 100 << 20):
            raise UserError(f"{path} is not a safetensors file (bad header): re-save or re-copy "
                            f"the weights")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{path} is not a safetensors file (unreadable header): re-save or "
                            f"re-copy the weights") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a safetensors file (bad header)")
    data, shapes = size - 8 - n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            shapes[name] = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: entry {name!r} of the header is malformed") from None
        if not 0 <= start <= end <= data:
            raise UserError(f"{path} is truncated or corrupt ({name!r} lies past the end of the "
                            f"file, {size:,} bytes): re-copy the weights")
    return shapes


def check_weights(folder: str, kind: str, model: torch.nn.Module, ema: bool = True) -> None:
    """Before any party starts: the owner's weights file is whole and its tensors have the names
    and shapes of the architecture that the other parties build from the config."""
    sub = _weights_folder(folder, kind, ema)
    path = os.path.join(sub, "diffusion_pytorch_model.safetensors")
    if not os.path.exists(path):
        if any(f.endswith(".bin") for f in os.listdir(sub)):
            return  # pickle weights: checked when the owner loads them
        raise UserError(f"no weights in {sub} (diffusion_pytorch_model.safetensors is missing)")
    stored = _safetensors_header(path)
    net = model.backbone if kind == "dpdm" else model
    net = getattr(net, "unet", net)  # DiffusersBackbone saves its UNet2DModel
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    problems = []
    if wrong:
        problems.append("shape differs for " + ", ".join(
            f"{k} (weights {list(stored[k])}, config {list(expected[k])})" for k in wrong[:3])
            + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""))
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}")
    if problems:
        raise UserError(f"the weights in {path} do not match the config in {sub}: "
                        + "; ".join(problems) + " (use the config the weights were saved with)")


def _scheduler(folder: str, sampler: str):
    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    for sub in ("scheduler", "."):
        path = os.path.join(folder, sub, "scheduler_config.json")
        if os.path.exists(path):
            return cls.from_config(cls.load_config(os.path.dirname(path)))
    return cls(num_train_timesteps=1000)


def _party(spec: SampleSpec, n_images: int, seed=None, labels=None, check: bool = False):
    """One party's part: load (owner) or build (others), encrypt, run the secure pipeline.

    ``spec`` is public (its seed and labels are blanked); ``seed`` and ``labels`` reach only
    the user's process (and, with ``check``, the owner's, which then computes the plaintext
    twin where the weights are).
    """
    p = party()
    if spec.link not in ("", "loopback"):
        netsim.activate(spec.link)
    model, kind = load_model(spec.model, with_weights=p.is_owner, ema=spec.ema)
    shape = image_shape(model)
    n = n_images
    user = dict(seed=seed if p.is_user else None, class_labels=labels if p.is_user else None)
    t0 = time.perf_counter()
    with pconfig.use(spec.protocols, backend=spec.backend,
                     product_device=party_device(spec.device, p.rank)):
        if kind == "dpdm":
            guided = model.num_classes > 0 and spec.guidance != 1.0
            rows = 2 * n if guided else n
            example = {"x": torch.zeros(rows, *shape), "noise_labels": torch.zeros(rows)}
            if model.num_classes > 0:
                example["class_labels"] = torch.zeros(rows, dtype=torch.long)
            enc = encrypt(model.backbone, example)
            setup = time.perf_counter() - t0
            pipe = SecureEDMPipeline(enc, model.precond, num_classes=model.num_classes)
            out = pipe(batch_size=n, num_inference_steps=spec.steps, image_shape=shape,
                       guidance_scale=spec.guidance, heun=spec.sampler == "edm", **user)
        else:
            example = {"sample": torch.zeros(n, *shape), "timestep": 999}
            if model.config.get("num_class_embeds"):
                example["class_labels"] = torch.zeros(n, dtype=torch.long)
            else:
                user["class_labels"] = None
            enc = encrypt(model, example)
            setup = time.perf_counter() - t0
            cls = SecureDDIMPipeline if spec.sampler == "ddim" else SecureDDPMPipeline
            out = cls(enc, _scheduler(spec.model, spec.sampler))(
                batch_size=n, num_inference_steps=spec.steps, image_shape=shape, **user)
    reference = None
    if check and p.is_owner:
        reference = plaintext_twin(replace(spec, seed=seed, labels=list(labels)))
    return {"rank": p.rank, "images": out.images, "report": out.report(),
            "setup_seconds": setup, "seconds": time.perf_counter() - t0, "reference": reference}


def plaintext_twin(spec: SampleSpec) -> torch.Tensor:
    """The same sampling in plaintext (same model, noise and labels)."""
    model, kind = load_model(spec.model, with_weights=True, ema=spec.ema)
    shape = image_shape(model)
    n = len(spec.labels)
    if kind == "dpdm":
        return plaintext_edm_sample(model, n, spec.steps, shape, spec.seed, spec.labels,
                                    guidance_scale=spec.guidance, heun=spec.sampler == "edm")
    labels = spec.labels if model.config.get("num_class_embeds") else None
    return plaintext_scheduler_sample(model, _scheduler(spec.model, spec.sampler), n, spec.steps,
                                      shape, spec.seed, labels, ddpm=spec.sampler == "ddpm")


def write_samples(images: torch.Tensor, labels: List[int], out_dir: str) -> dict:
    """``samples.png`` (grid) and ``samples.pt`` (images in [-1, 1] + labels) in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, "samples.png")
    save_image_grid(images, png, nrow=min(10, len(labels)))
    pt = os.path.join(out_dir, "samples.pt")
    torch.save({"images": images, "labels": torch.tensor(labels)}, pt)
    return {"png": png, "pt": pt}


def run_job(spec: SampleSpec, out_dir: str, check: bool = False) -> dict:
    """Launch the three parties, write the grid and the report; return the report."""
    os.makedirs(out_dir, exist_ok=True)
    roles = Roles()
    secret = {"seed": spec.seed, "labels": list(spec.labels)}
    private = {roles.user: secret}
    if check:  # the owner's debugging tool: the owner gets the user's seed and labels too
        private[roles.owner] = secret
    public = replace(spec, seed=None, labels=[])
    t0 = time.perf_counter()
    results = launch(_party, public, len(spec.labels), check=check, roles=roles, private=private)
    wall = time.perf_counter() - t0
    user = next(r for r in results if r["images"] is not None)
    png = write_samples(user["images"], spec.labels, out_dir)["png"]
    report = {"spec": asdict(spec), "wall_seconds": wall, "png": png,
              "parties": [{"rank": r["rank"], "setup_seconds": r["setup_seconds"],
                           "seconds": r["seconds"], **r["report"]} for r in results]}
    report["spec"].pop("seed")  # the user's secret
    if check:
        reference = next(r["reference"] for r in results if r["reference"] is not None)
        report["fidelity"] = fidelity(user["images"], reference)
    path = os.path.join(out_dir, "cost_report.json")
    atomic_write_json(path, report, indent=1, sort_keys=False, allow_nan=True)  # PSNR may be inf
    report["report_path"] = path
    return report


def summary(report: dict) -> str:
    lines = [f"samples:     {report['png']}", f"cost report: {report['report_path']}",
             f"wall time:   {report['wall_seconds']:.1f} s"]
    for p in report["parties"]:
        t = p["total"]
        steps = max(len(p["steps"]), 1)
        lines.append(f"  P{p['rank']}: sent {t['bytes_sent'] / 1e6:,.1f} MB, received "
                     f"{t['bytes_received'] / 1e6:,.1f} MB, {t['rounds']:,} rounds, "
                     f"{t['bytes_sent'] / 1e6 / steps:,.1f} MB sent per step")
    if "fidelity" in report:
        f = report["fidelity"]
        lines.append(f"fidelity vs plaintext sampling: max |diff| {f['max_abs']:.4f}, mean |diff| "
                     f"{f['mean_abs']:.4f}, PSNR {f['psnr_db']:.1f} dB")
    return "\n".join(lines)
