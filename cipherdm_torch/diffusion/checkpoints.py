"""The denoiser's folder format: what a checkpoint folder holds, how it is written and read.

::

    <folder>/backbone/        the backbone: diffusers ``save_pretrained`` (config.json + safetensors)
    <folder>/backbone_ema/    the EMA backbone, same format (optional; readers fall back to backbone/)
    <folder>/denoiser.json    {"backbone": "own" | "diffusers", "num_classes": n, "precond": {...}}

``denoiser.json`` is written last, so a folder that has it is a complete checkpoint
(:func:`is_checkpoint_dir`). ``"backbone": "own"`` is the project's
:class:`~cipherdm_torch.diffusion.backbones.DDPMppUNet`, ``"diffusers"`` a diffusers
``UNet2DModel`` in a :class:`~cipherdm_torch.diffusion.backbones.DiffusersBackbone`. A training run
adds its own files beside these (``cipherdm_torch.training.trainer``).

This module writes and reads the format in parts (:func:`write_checkpoint`, :func:`read_meta`,
:func:`load_backbone`); :mod:`.denoiser` turns them into the denoiser API
(``Denoiser.save_pretrained`` / ``from_pretrained``, ``save_denoiser`` / ``load_denoiser``). The
denoiser module sits above this one: it uses the format, the format does not need the class.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch.nn as nn
from diffusers import UNet2DModel

from cipherdm_torch.diffusion.backbones import DDPMppUNet, DiffusersBackbone
from cipherdm_torch.files import atomic_write_json, read_json

__all__ = ["META_FILE", "BACKBONE", "BACKBONE_EMA", "is_checkpoint_dir", "read_meta",
           "backbone_dir", "load_backbone", "write_checkpoint"]

META_FILE = "denoiser.json"
BACKBONE = "backbone"
BACKBONE_EMA = "backbone_ema"


def is_checkpoint_dir(folder: str) -> bool:
    """Whether ``folder`` is a (complete) denoiser checkpoint: it has ``denoiser.json``."""
    return os.path.isfile(os.path.join(folder, META_FILE))


def read_meta(folder: str) -> Dict[str, Any]:
    """The checkpoint's ``denoiser.json``; ``FileNotFoundError`` if ``folder`` is not a checkpoint."""
    path = os.path.join(folder, META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} is not a denoiser checkpoint (no {META_FILE})")
    return read_json(path)


def backbone_dir(folder: str, ema: bool = True) -> str:
    """The backbone's sub-folder: the EMA weights if asked for and present, else ``backbone/``."""
    sub = os.path.join(folder, BACKBONE_EMA if ema else BACKBONE)
    return sub if os.path.isdir(sub) else os.path.join(folder, BACKBONE)


def load_backbone(folder: str, ema: bool = True,
                  with_weights: bool = True) -> Tuple[nn.Module, Dict[str, Any]]:
    """(backbone, meta) of a checkpoint; ``with_weights=False`` builds the backbone from its config
    file only (randomly initialised: the parties without the weights build the architecture)."""
    meta = read_meta(folder)
    sub = backbone_dir(folder, ema)
    if meta["backbone"] == "own":
        if with_weights:
            return DDPMppUNet.from_pretrained(sub, low_cpu_mem_usage=False), meta
        return DDPMppUNet.from_config(DDPMppUNet.load_config(sub)), meta
    if meta["backbone"] == "diffusers":
        unet = (UNet2DModel.from_pretrained(sub, low_cpu_mem_usage=False) if with_weights
                else UNet2DModel.from_config(UNet2DModel.load_config(sub)))
        return DiffusersBackbone(unet, meta["num_classes"]), meta
    raise ValueError(f"{folder}/{META_FILE}: unknown backbone {meta['backbone']!r} "
                     f"(expected 'own' or 'diffusers')")


def write_checkpoint(folder: str, backbone: nn.Module, num_classes: int, precond: Dict[str, Any],
                     ema_backbone: Optional[nn.Module] = None) -> None:
    """Write a checkpoint folder from its parts (``precond``: the preconditioning's ``to_dict()``);
    ``ema_backbone`` goes to ``backbone_ema/``. ``denoiser.json`` is written last."""
    backbone.save_pretrained(os.path.join(folder, BACKBONE), safe_serialization=True)
    if ema_backbone is not None:
        ema_backbone.save_pretrained(os.path.join(folder, BACKBONE_EMA), safe_serialization=True)
    atomic_write_json(os.path.join(folder, META_FILE), {
        "backbone": "diffusers" if isinstance(backbone, DiffusersBackbone) else "own",
        "num_classes": num_classes,
        "precond": precond,
    })
