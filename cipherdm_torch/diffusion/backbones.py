"""Denoiser backbones: the project's DDPM++ UNet (:class:`DDPMppUNet`) and an adapter for diffusers'
UNet2DModel.

Both backbones share one call signature, ``backbone(x, noise_labels, class_labels) -> tensor``:

* ``x``: (N, C, H, W) input (already scaled by the preconditioning's ``c_in``),
* ``noise_labels``: (N,) float noise conditioning (the preconditioning's ``c_noise``),
* ``class_labels``: (N,) long, in ``[0, num_classes]``; the index ``num_classes`` is the *null*
  label used for classifier-free guidance (``None`` means "null label" for every row).

Design notes (DP-SGD with Opacus and, later, secure evaluation on secret shares):

* no in-place operations on module outputs (Opacus uses full backward hooks);
* every tensor handed to a parameterised layer is contiguous NCHW (Opacus' hooks-mode conv
  per-sample gradient silently goes wrong on channels-last-strided inputs);
* only Conv2d, Linear, GroupNorm and Embedding carry parameters (all have Opacus grad samplers);
* the nonlinearities are SiLU, GroupNorm and a softmax attention, the ops the MPC side provides.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config

__all__ = [
    "DDPMppUNet",
    "DiffusersBackbone",
    "make_diffusers_unet",
    "image_shape",
    "sinusoidal_embedding",
    "count_parameters",
    "group_count",
]


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def group_count(channels: int) -> int:
    """GroupNorm groups as in DPDM: min(C/4, 32), at least 1, and dividing C."""
    g = max(1, min(channels // 4, 32))
    while channels % g:
        g -= 1
    return g


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a (N,) float tensor into (N, dim): [cos(t f_i), sin(t f_i)]."""
    if dim % 2:
        raise ValueError(f"embedding dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, skip_scale: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(group_count(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(group_count(cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.skip_scale = skip_scale

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)).contiguous())
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))).contiguous())
        s = self.skip(x.contiguous()) if self.skip is not None else x
        return (s + h) * self.skip_scale


class _AttnBlock(nn.Module):
    """Single-head-per-group softmax self-attention over the H*W positions."""

    def __init__(self, channels: int, num_heads: int, skip_scale: float):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels not divisible by {num_heads} heads")
        self.norm = nn.GroupNorm(group_count(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.num_heads = num_heads
        self.skip_scale = skip_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        nh, d = self.num_heads, c // self.num_heads
        qkv = self.qkv(self.norm(x).contiguous()).reshape(n * nh, 3, d, h * w)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (n*nh, d, hw)
        attn = torch.softmax(torch.bmm(q.transpose(1, 2), k) / math.sqrt(d), dim=-1)  # (.., hw, hw)
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(n, c, h, w).contiguous()
        return (x + self.proj(out)) * self.skip_scale


class DDPMppUNet(ModelMixin, ConfigMixin):
    """DDPM++ class-conditional UNet (Song et al. 2021, as used by DPDM), sized by config
    (DPDM MNIST: 32 channels, multipliers (1, 2, 2), about 1.75M parameters).

    ``save_pretrained`` / ``from_pretrained`` (diffusers) write ``config.json`` +
    ``diffusion_pytorch_model.safetensors``. Checkpoints name it ``"backbone": "own"``; configs
    saved before the rename carry ``"_class_name": "DPUNet"``, which diffusers ignores on load.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        img_resolution: int = 28,
        in_channels: int = 1,
        out_channels: int = 1,
        num_classes: int = 10,
        model_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (7,),
        num_heads: int = 1,
        dropout: float = 0.1,
        noise_emb_dim: int = 32,
        emb_dim: Optional[int] = None,
    ):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        if img_resolution % (2 ** (len(channel_mult) - 1)):
            raise ValueError(
                f"img_resolution {img_resolution} not divisible by 2^{len(channel_mult) - 1}"
            )
        emb_dim = emb_dim or 4 * model_channels
        skip = 1.0 / math.sqrt(2.0)
        self.noise_emb_dim = noise_emb_dim
        self.num_classes = num_classes
        self.emb_in = nn.Linear(noise_emb_dim, emb_dim)
        self.emb_out = nn.Linear(emb_dim, emb_dim)
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_ch = [model_channels]
        ch = model_channels
        res = img_resolution
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                cout = model_channels * mult
                blocks = nn.ModuleList([_ResBlock(ch, cout, emb_dim, dropout, skip)])
                if res in attn_resolutions:
                    blocks.append(_AttnBlock(cout, num_heads, skip))
                self.down.append(blocks)
                ch = cout
                skip_ch.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skip_ch.append(ch)
                res //= 2
        self.mid = nn.ModuleList(
            [
                _ResBlock(ch, ch, emb_dim, dropout, skip),
                _AttnBlock(ch, num_heads, skip),
                _ResBlock(ch, ch, emb_dim, dropout, skip),
            ]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                cout = model_channels * mult
                blocks = nn.ModuleList(
                    [_ResBlock(ch + skip_ch.pop(), cout, emb_dim, dropout, skip)]
                )
                if res in attn_resolutions:
                    blocks.append(_AttnBlock(cout, num_heads, skip))
                self.up.append(blocks)
                ch = cout
            if level != 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(ch, ch, 3, padding=1)]))
                res *= 2
        self.norm_out = nn.GroupNorm(group_count(ch), ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        emb = sinusoidal_embedding(noise_labels.reshape(-1), self.noise_emb_dim)
        emb = self.emb_out(F.silu(self.emb_in(emb)))
        if self.label_emb is not None:
            if class_labels is None:
                class_labels = torch.full(
                    (x.shape[0],), self.num_classes, dtype=torch.long, device=x.device
                )
            emb = emb + self.label_emb(class_labels.long())
        emb = F.silu(emb)

        h = self.conv_in(x.contiguous())
        skips = [h]
        for blocks in self.down:
            if isinstance(blocks[0], _ResBlock):
                h = blocks[0](h, emb)
                for b in blocks[1:]:
                    h = b(h)
            else:
                h = blocks[0](h)
            skips.append(h)
        h = self.mid[0](h, emb)
        h = self.mid[1](h)
        h = self.mid[2](h, emb)
        for blocks in self.up:
            if isinstance(blocks[0], _ResBlock):
                h = blocks[0](torch.cat([h, skips.pop()], dim=1), emb)
                for b in blocks[1:]:
                    h = b(h)
            else:
                h = blocks[1](blocks[0](h).contiguous())
        return self.conv_out(F.silu(self.norm_out(h)).contiguous())


class DiffusersBackbone(nn.Module):
    """Adapter giving a diffusers ``UNet2DModel`` the backbone signature.

    The noise label is fed as the (float) timestep; the class label through the model's
    ``num_class_embeds`` embedding (which must have ``num_classes + 1`` rows, the last one null).
    """

    def __init__(self, unet: UNet2DModel, num_classes: int):
        super().__init__()
        self.unet = unet
        self.num_classes = num_classes
        n_emb = unet.config.num_class_embeds
        if num_classes > 0 and n_emb != num_classes + 1:
            raise ValueError(
                f"UNet2DModel has num_class_embeds={n_emb}, need num_classes+1={num_classes + 1}"
            )

    @property
    def config(self) -> dict:
        return self.unet.config

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.num_classes > 0 and class_labels is None:
            class_labels = torch.full(
                (x.shape[0],), self.num_classes, dtype=torch.long, device=x.device
            )
        t = noise_labels.reshape(-1)
        fourier = self.unet.config.get("time_embedding_type") == "fourier"
        if fourier:
            # diffusers' Fourier embedding takes log(timestep) and divides the output by the
            # timestep (NCSN++ feeds sigma). Feed exp(c_noise): the embedding sees c_noise itself
            # (finite for every noise level, where ln(sigma)/4 <= 0 gave NaN), and undo the division.
            t = t.clamp(-20.0, 20.0).exp()
        out = self.unet(
            x.contiguous(),
            t,
            class_labels=class_labels if self.num_classes > 0 else None,
        ).sample
        if fourier:
            out = out * t.reshape(-1, *([1] * (out.ndim - 1)))
        return out.contiguous()

    def save_pretrained(self, path: str, **kw) -> None:
        self.unet.save_pretrained(path, **kw)


def make_diffusers_unet(
    img_resolution: int = 28,
    in_channels: int = 1,
    out_channels: int = 1,
    num_classes: int = 10,
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 2,
    attention_levels: Sequence[bool] = (False, False, True),
    attention_head_dim: int = 8,
    norm_num_groups: Optional[int] = None,
    dropout: float = 0.0,
    down_block_types: Optional[Sequence[str]] = None,
    up_block_types: Optional[Sequence[str]] = None,
) -> DiffusersBackbone:
    """A class-conditional diffusers ``UNet2DModel`` wrapped as a backbone.

    Block types default to ``DownBlock2D`` / ``UpBlock2D``, with the ``Attn`` variants on the levels
    marked in ``attention_levels``; ``down_block_types`` / ``up_block_types`` (one per level, up
    blocks from the lowest resolution up) override them, e.g. with diffusers' ``SkipDownBlock2D``,
    ``AttnSkipDownBlock2D``, ``SkipUpBlock2D``, ``AttnSkipUpBlock2D`` (NCSN++-style output skips;
    DP-SGD trains them through ``training/opacus_compat.py``). diffusers' Skip blocks hard-code 3
    image channels and a chain of skip samples (:func:`_check_skip_blocks` says so before building);
    AttnSkip blocks hard-code 32 norm groups (channels a multiple of 32, diffusers checks that).
    """
    block_out_channels = tuple(int(c) for c in block_out_channels)
    attention_levels = tuple(bool(a) for a in attention_levels)
    if len(attention_levels) != len(block_out_channels):
        raise ValueError("attention_levels must have one entry per level")
    groups = norm_num_groups or min(group_count(c) for c in block_out_channels)
    down = tuple(down_block_types) if down_block_types is not None else tuple(
        "AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
    up = tuple(up_block_types) if up_block_types is not None else tuple(
        "AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
    for name, types in (("down_block_types", down), ("up_block_types", up)):
        if len(types) != len(block_out_channels):
            raise ValueError(f"{name} must have one entry per level ({len(block_out_channels)}), "
                             f"got {len(types)}")
    _check_skip_blocks(down, up, in_channels, out_channels)
    unet = UNet2DModel(
        sample_size=img_resolution,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=attention_head_dim,
        norm_num_groups=groups,
        dropout=dropout,
        num_class_embeds=(num_classes + 1) if num_classes > 0 else None,
    )
    return DiffusersBackbone(unet, num_classes)


def _check_skip_blocks(down: Sequence[str], up: Sequence[str], in_channels: int,
                       out_channels: int) -> None:
    """Refuse block layouts that diffusers builds but cannot run (a shape error at the first call).

    Skip down blocks carry a downsampled copy of the input image (their ``skip_conv`` takes 3
    channels), so every downsampling level up to the last Skip down block must be a Skip block;
    Skip up blocks build a 3-channel skip image that is added to the output at the end, so every up
    block after the first Skip one must be a Skip block too (they upsample the skip image).
    """
    # the last block of each path neither resamples nor (up) adds a skip image of its own
    skip_down = [i for i, t in enumerate(down[:-1]) if "Skip" in t]
    skip_up = [i for i, t in enumerate(up[:-1]) if "Skip" in t]
    if skip_down:
        if in_channels != 3:
            raise ValueError(
                f"diffusers' Skip down blocks need 3 input channels, got {in_channels}")
        if skip_down != list(range(skip_down[-1] + 1)):
            raise ValueError(f"down_block_types {tuple(down)}: every level before a downsampling "
                             "Skip down block must be a Skip block too (diffusers downsamples the "
                             "skip image only in Skip blocks)")
    if skip_up:
        if out_channels != 3:
            raise ValueError(
                f"diffusers' Skip up blocks need 3 output channels, got {out_channels}")
        if not all("Skip" in t for t in up[skip_up[0]:]):
            raise ValueError(f"up_block_types {tuple(up)}: every up block after the first Skip up "
                             "block must be a Skip block too (diffusers upsamples the skip image "
                             "only in Skip blocks)")


def image_shape(model: nn.Module) -> Optional[Tuple[int, int, int]]:
    """(channels, height, width) of a model's samples, read from its config; None if it does not say.

    ``model``: a :class:`~cipherdm_torch.diffusion.denoiser.Denoiser` (read through its backbone),
    the project's UNet (``in_channels``, ``img_resolution``), a :class:`DiffusersBackbone` or a
    diffusers ``UNet2DModel`` (``in_channels``, ``sample_size``: an int or (height, width)).
    """
    model = getattr(model, "backbone", model)
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    get = cfg.get if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    channels, size = get("in_channels"), get("img_resolution") or get("sample_size")
    if channels is None or size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(channels), int(h), int(w)
