"""Shape ops on secret shares: views, joins and splits, padding, gathers, nearest upsampling,
and the no-ops (dtype casts, copies, eval-mode dropout). All are local (no communication):
see :func:`.registry.local`."""

from __future__ import annotations

import math
import operator
from typing import Optional, Sequence, Union

import torch

from cipherdm_torch.protocols import sharewise

from .registry import Secret, lift, local, register, wrap

aten = torch.ops.aten


def _shape_op(aten_op):
    def run(x, *args, **kwargs):
        return local(x, lambda s: aten_op(s, *args, **kwargs))
    return run


for _op in (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
            aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default,
            aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints,
            aten.unflatten.int, aten.expand.default, aten.slice.Tensor, aten.select.int,
            aten.narrow.default, aten.repeat.default, aten.flip.default, aten.roll.default,
            aten.movedim.int, aten.unfold.default, aten.pixel_shuffle.default,
            aten.pixel_unshuffle.default):
    register(_op, kind="shape")(_shape_op(_op))


@register(aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
          aten.lift_fresh_copy.default, kind="shape")
def _identity(x, *args, **kwargs):
    return x


@register(aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
          aten.to.device, kind="shape")
def _to(x, *args, **kwargs):
    # Shares are fixed-point ring elements: a float dtype change is a no-op; a cast to an
    # integer type is only meaningful for integer-valued secrets (one-hot labels).
    return x


def _dropout_check(node):
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False)
    return "dropout in training mode (call model.eval())" if train else None


@register(aten.dropout.default, kind="shape", check=_dropout_check)
def _dropout(x, p=0.5, train=False):
    return x


@register(aten._assert_tensor_metadata.default, kind="shape")
def _assert_metadata(*args, **kwargs):
    return None


@register(operator.getitem, kind="shape")
def _getitem(seq, i):
    return seq[i]


def _split_op(aten_op):
    def run(x, *args, **kwargs):
        # apply to the share once, then wrap each piece
        pieces = aten_op(x.share, *args, **kwargs)
        for k, p in enumerate(pieces):
            sharewise.notify_local_op([x.share], p,
                                      lambda shares, k=k: aten_op(shares[0], *args, **kwargs)[k])
        return [wrap(x, p) for p in pieces]
    return run


for _op in (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default,
            aten.unbind.int, aten.tensor_split.sections):
    register(_op, kind="shape")(_split_op(_op))


def _join_op(aten_op):
    def run(tensors, *args, **kwargs):
        tensors = [lift(t) for t in tensors]
        template = tensors[0]
        # every piece has the encoder in force (lift encodes public ones with it): join shares
        share = aten_op([t.share for t in tensors], *args, **kwargs)
        sharewise.notify_local_op([t.share for t in tensors], share,
                                  lambda shares: aten_op(shares, *args, **kwargs))
        return wrap(template, share)
    return run


register(aten.cat.default, kind="shape")(_join_op(aten.cat.default))
register(aten.stack.default, kind="shape")(_join_op(aten.stack.default))


def _pad_check(node):
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    if node.target is aten.pad.default and mode not in ("constant", "reflect", "replicate",
                                                         "circular"):
        return f"padding mode {mode!r}"
    return None


def _pad_value_mask(x, pad, value):
    """Public tensor: ``value`` on the positions that padding adds, 0 elsewhere."""
    ones = torch.ones(tuple(x.size()))
    return (1.0 - aten.constant_pad_nd(ones, list(pad), 0.0)) * float(value)


@register(aten.constant_pad_nd.default, kind="shape", check=_pad_check)
def constant_pad(x: Union[Secret, torch.Tensor], pad: Sequence[int], value: float = 0) -> Secret:
    """``x`` (secret or public) padded with the public constant ``value`` (local)."""
    x = lift(x)
    out = local(x, lambda s: aten.constant_pad_nd(s, list(pad), 0))
    return out if not value else out + _pad_value_mask(x, pad, value)


@register(aten.pad.default, kind="shape", check=_pad_check)
def _pad(x, pad, mode="constant", value=None):
    if mode == "constant":
        return constant_pad(x, pad, value or 0)
    # reflect / replicate / circular: gather positions; the index map comes from padding a
    # float tensor of positions (exact below 2^53), since torch pads no int64 in those modes.
    x = lift(x)
    shape = tuple(x.size())
    pos = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    batch = pos.dim() - len(pad) // 2
    if batch < 1:  # torch's reflect / replicate pads want a leading batch or channel dim
        pos = pos.unsqueeze(0)
    index = aten.pad(pos, list(pad), mode).round().long()
    if batch < 1:
        index = index.squeeze(0)
    return local(x, lambda s: s.reshape(-1)[index.reshape(-1)].reshape(index.shape))


@register(aten.index_select.default, kind="shape")
def _index_select(x, dim, index):
    return local(x, lambda s: s.index_select(dim, index))


def _nearest_index(n_in: int, n_out: int, scale: Optional[float]) -> torch.Tensor:
    ratio = (1.0 / scale) if scale else n_in / n_out
    return (torch.arange(n_out, dtype=torch.float64) * ratio).floor().long().clamp(max=n_in - 1)


@register(aten.upsample_nearest2d.vec, kind="shape")
def _upsample_nearest2d_vec(x, output_size=None, scale_factors=None):
    h, w = x.size(-2), x.size(-1)
    sh, sw = (scale_factors or (None, None))
    oh, ow = output_size or (int(math.floor(h * sh)), int(math.floor(w * sw)))
    ih, iw = _nearest_index(h, oh, sh), _nearest_index(w, ow, sw)
    return local(x, lambda s: s.index_select(-2, ih).index_select(-1, iw))


@register(aten.upsample_nearest2d.default, kind="shape")
def _upsample_nearest2d(x, output_size, scales_h=None, scales_w=None):
    return _upsample_nearest2d_vec(x, output_size, [scales_h, scales_w] if scales_h else None)
