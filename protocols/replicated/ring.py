"""Exact products in the ring of 64-bit integers (mod 2^64) for matmul and convolutions.

Why: shares are int64 and their products must wrap mod 2^64. torch has no int64 GEMM or
convolution on CUDA, and on the CPU its int64 kernels are plain loops. Here each factor
is split into four 16-bit limbs held as float64; a limb product summed over K terms stays
below 2^32 K, exact in float64's 53-bit mantissa while K <= 2^21 (K: the inner dimension of a
matmul, in-channels per group times the kernel size of a convolution). Only the limb pairs
with i + j <= 3 reach the low 64 bits, and the pairs sharing a left limb are ONE float64
GEMM / convolution (the right limbs concatenated along the output dimension): four BLAS
calls instead of ten, recombined with wrapping int64 shifts and adds. Bit for bit equal to
torch's int64 result on the CPU (tested), about 2x faster there on large products and slower
on small ones (below :data:`CPU_LIMB_MIN_MACS` the CPU keeps the int64 kernel), and the only
way the same code runs on a GPU.

Elementwise ``mul`` needs none of this (int64 multiplication wraps on every device).

Where the products run (issue 17): ``protocols.config`` field ``product_device`` (``None``:
where the operands are; ``"cuda"``, ``"cuda:1"``: on that GPU). The shares stay in host
memory, with the channel, the PRG streams and the replica cache exactly as on the CPU (so
nothing that decides whether a party sends can differ); only the operands of each product
travel to the device, as int64, and the int64 result comes back. Float64 sums of integers
below 2^53 are exact on any IEEE device (no TF32 for float64), so the result is the same bit
for bit on the GPU as on the CPU.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from cipherdm_torch.protocols import config

__all__ = ["ring_product", "product_device", "LIMB_BITS", "MAX_TERMS", "CPU_LIMB_MIN_MACS"]

LIMB_BITS = 16
_LIMBS = 64 // LIMB_BITS
_MASK = (1 << LIMB_BITS) - 1
MAX_TERMS = 1 << (53 - 2 * LIMB_BITS)  # terms per output that float64 sums exactly


def _limbs(x: torch.Tensor) -> list:
    return [((x >> (LIMB_BITS * i)) & _MASK).to(torch.float64) for i in range(_LIMBS)]


# A layout maps (x, y, options) to (the right factor's dimension that indexes outputs, the
# result's dimension it extends or None when the right limbs cannot be concatenated (grouped
# convolutions: one product per limb pair), an upper bound on the terms per output), or None
# when the limbs cannot take the case
Layout = Callable[[torch.Tensor, torch.Tensor, dict],
                  Optional[Tuple[int, Optional[int], int]]]


def _matmul_layout(x, y, kw) -> Optional[Tuple[int, Optional[int], int]]:
    if x.dim() < 1 or y.dim() < 2:
        return None
    return -1, -1, x.shape[-1]


def _conv_layout(out_dim: int) -> Layout:
    """Convolutions whose weight holds the output channels in ``out_dim`` (0; 1 when
    transposed): every output sums over at most the weight's other channels times its
    kernel (fewer when grouped)."""
    def layout(x, w, kw):
        grouped = kw.get("groups", 1) != 1
        return out_dim, (None if grouped else 1), w.numel() // w.shape[out_dim]
    return layout


# torch.nn.functional's convolutions are these same functions
_LAYOUT: Dict[Callable, Layout] = {
    torch.matmul: _matmul_layout,
    torch.conv1d: _conv_layout(0), torch.conv2d: _conv_layout(0),
    torch.conv_transpose1d: _conv_layout(1), torch.conv_transpose2d: _conv_layout(1),
}


# below this many multiply-adds a CPU product runs torch's int64 kernel (measured on the 2-core
# machine: a 1x4x28x28 convolution by 4x4x3x3, 113k MACs, 0.33 ms int64 vs 1.29 ms in limbs;
# 10x32x28x28 by 32x32x3x3, 72M MACs, 214 ms vs 97 ms; 10x196x64 @ 64x64, 8M, even)
CPU_LIMB_MIN_MACS = 1 << 22


def _macs(x: torch.Tensor, y: torch.Tensor, out_dim: int) -> float:
    """Multiply-adds of a matmul / stride-1 convolution: x's elements times the right factor's
    outputs per input (its elements over its input dimension)."""
    in_dim = {-1: -2, 0: 1, 1: 0}[out_dim]
    return x.numel() * (y.numel() / max(1, y.shape[in_dim]))


def product_device() -> Optional[torch.device]:
    """The device the protocol settings choose for ring products (None: the operands')."""
    spec = config.current().product_device
    return None if spec is None else torch.device(spec)


def ring_product(op: Callable, x: torch.Tensor, y: torch.Tensor, *args,
                 device: Optional[torch.device] = None, **kwargs) -> torch.Tensor:
    """``op(x, y, ...)`` mod 2^64 for int64 ``x`` and ``y`` (``op``: a torch bilinear function).

    matmul and (transposed, grouped) convolutions go through float64 limbs; every other case
    (elementwise products, a bias, positional options, more than :data:`MAX_TERMS` terms per
    output, and a product computed on the CPU where its operands are with fewer than
    :data:`CPU_LIMB_MIN_MACS` multiply-adds) runs torch's int64 kernel where the operands are. ``device`` (default:
    :func:`product_device`, else the operands' device) is where the limb products run; the
    result is returned on the operands' device. On CUDA operands a case the limbs cannot
    take is an error, since torch would refuse the int64 kernel anyway.
    """
    layout = _LAYOUT.get(op)
    info = None
    if (layout is not None and not args and kwargs.get("bias") is None
            and x.dtype == torch.long and y.dtype == torch.long):
        info = layout(x, y, kwargs)
    if info is None or info[2] > MAX_TERMS:
        if x.is_cuda and layout is not None:
            raise NotImplementedError(
                f"{getattr(op, '__name__', op)} of int64 shares on CUDA needs keyword options, "
                f"no bias and at most {MAX_TERMS} terms per output; got {kwargs}")
        return op(x, y, *args, **kwargs)
    home = x.device
    target = device if device is not None else product_device()
    travels = target is not None and torch.device(target) != home
    if not travels and home.type == "cpu" and _macs(x, y, info[0]) < CPU_LIMB_MIN_MACS:
        return op(x, y, *args, **kwargs)  # small product: torch's int64 loop is faster here
    if travels:
        x, y = x.to(target, non_blocking=True), y.to(target, non_blocking=True)
    weight_dim, result_dim, _ = info
    xs, ys = _limbs(x), _limbs(y)
    out = None
    for i in range(_LIMBS):
        width = _LIMBS - i  # right limbs j = 0 .. 3 - i reach the low 64 bits
        if result_dim is None:
            pieces = [op(xs[i], ys[j], **kwargs) for j in range(width)]
        else:
            right = torch.cat(ys[:width], dim=weight_dim) if width > 1 else ys[0]
            pieces = op(xs[i], right, **kwargs).chunk(width, dim=result_dim)
        for j, piece in enumerate(pieces):
            term = piece.to(torch.long) << (LIMB_BITS * (i + j))
            out = term if out is None else out + term
    return out if out.device == home else out.to(home)
