"""ATen op -> secret-share implementation registry.

The encrypted module (:mod:`cipherdm_torch.compiler.encrypted_module`) interprets a model's ATen graph node by
node. A node whose inputs are all public runs in plaintext torch; a node with at least one
secret (CrypTen) input runs the implementation registered here for its ATen op. Each entry
carries a ``kind`` (the cost-meter region its communication is attributed to) and an optional
``check(node)`` that rejects argument combinations we do not support, so that
:func:`cipherdm_torch.compiler.graph.unsupported_ops` can list every problem before any secret
computation starts.

Why the shape ops are cheap: CrypTen's arithmetic shares are plain int64 tensors, and every
shape / indexing op is linear and acts element-wise on positions, so applying the op to each
party's share gives a valid sharing of the result (no communication). Linear layers cost one
multiplication round; the nonlinear ops are routed to :mod:`cipherdm_torch.protocols`
(baseline or optimised, chosen by ``protocols.config``), with CrypTen-direct fallbacks used
only while that package does not provide a function.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch.utils._pytree import tree_leaves

from cipherdm_torch.mpc.crypten_compat import crypten

__all__ = ["OpImpl", "register", "lookup", "supported_ops", "is_secret", "lift", "local",
           "nonlinear", "wrap"]

aten = torch.ops.aten


@dataclass(frozen=True)
class OpImpl:
    """How one ATen op runs when at least one input is secret."""

    fn: Callable[..., Any]
    kind: str  # cost-meter region (op type) its communication is attributed to
    check: Optional[Callable[[torch.fx.Node], Optional[str]]] = None  # reason if unsupported


REGISTRY: Dict[Any, OpImpl] = {}


def register(*targets, kind: str, check=None):
    """Decorator: register ``fn`` for every ATen op overload (or python callable) in ``targets``."""
    def deco(fn):
        for t in targets:
            REGISTRY[t] = OpImpl(fn, kind, check)
        return fn
    return deco


def lookup(target) -> Optional[OpImpl]:
    return REGISTRY.get(target)


def supported_ops() -> list:
    """Names of every registered op (for documentation and reports)."""
    return sorted(str(t) for t in REGISTRY)


# ------------------------------------------------------------------ share helpers

def is_secret(x) -> bool:
    return isinstance(x, crypten.CrypTensor)


def any_secret(*args, **kwargs) -> bool:
    return any(is_secret(v) for v in tree_leaves((args, kwargs)))


def lift(x):
    """A public tensor as a (trivial) sharing: pseudo-random zero shares, no communication."""
    if is_secret(x):
        return x
    return crypten.cryptensor(torch.as_tensor(x, dtype=torch.float32), src=0)


def local(x, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Apply a share-wise linear op (view, permute, index, ...) to every share locally."""
    share = fn(x.share)
    _carry_replica([x.share], share, lambda reps: fn(reps[0]))
    return wrap(x, share)


def _carry_replica(sources, result, fn) -> None:
    """Under the replicated backend, apply the same local op to the cached replica shares.

    (Otherwise the next multiplication would re-share a tensor each party could derive.)
    """
    try:
        from cipherdm_torch.protocols.replicated import arith as rss_arith  # type: ignore
    except ImportError:
        return
    reps = [rss_arith.cached_next(s) for s in sources]
    if reps and all(r is not None for r in reps):
        rep = fn(reps)
        if rep.shape == result.shape:
            rss_arith.remember(result, rep)


def wrap(template, share: torch.Tensor):
    """A new secret tensor with ``template``'s encoding holding ``share`` (no copy of template).

    (CrypTen's ``shallow_copy`` shares the inner share object, so assigning to it would
    overwrite the template too.)
    """
    out = template.shallow_copy()
    out._tensor = template._tensor.shallow_copy()
    out._tensor.share = share
    return out


def _shape_op(aten_op):
    def run(x, *args, **kwargs):
        return local(x, lambda s: aten_op(s, *args, **kwargs))
    return run


def _fp_dtype_only(node) -> Optional[str]:
    return None


# ------------------------------------------------------------------ nonlinear functions

class _CryptenDirect:
    """CrypTen's own methods: the fallback when ``cipherdm_torch.protocols`` lacks a function."""

    @staticmethod
    def silu(x):
        return x * x.sigmoid()

    @staticmethod
    def mish(x):
        return x * (x.exp() + 1).log().tanh()

    @staticmethod
    def gelu(x, approximate="tanh"):
        # tanh form for both modes (|error| vs exact GELU < 5e-4); CrypTen's erf diverges past ~2.5.
        inner = (x + x * x * x * 0.044715) * math.sqrt(2.0 / math.pi)
        return x * (inner.tanh() + 1) * 0.5

    @staticmethod
    def softmax(x, dim):
        return x.softmax(dim)

    @staticmethod
    def exp(x):
        return x.exp()

    @staticmethod
    def reciprocal(x):
        return x.reciprocal()

    @staticmethod
    def rsqrt(x):
        return x.inv_sqrt()

    @staticmethod
    def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
        shape = x.size()
        n, c = shape[0], shape[1]
        xg = x.reshape(n, num_groups, -1)
        centred = xg - xg.mean(-1, keepdim=True)
        var = (centred * centred).mean(-1, keepdim=True)
        y = (centred * nonlinear("rsqrt")(var + eps)).reshape(*shape)
        return _affine(y, weight, bias, [1, c] + [1] * (len(shape) - 2))

    @staticmethod
    def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        dims = tuple(range(-len(normalized_shape), 0))
        mean = x.mean(dims, keepdim=True) if len(dims) > 1 else x.mean(-1, keepdim=True)
        centred = x - mean
        sq = centred * centred
        var = sq.mean(dims, keepdim=True) if len(dims) > 1 else sq.mean(-1, keepdim=True)
        y = centred * nonlinear("rsqrt")(var + eps)
        return _affine(y, weight, bias, list(normalized_shape))


def _affine(y, weight, bias, shape):
    if weight is not None:
        y = y * weight.reshape(*shape)
    if bias is not None:
        y = y + bias.reshape(*shape)
    return y


def _protocols():
    try:
        from cipherdm_torch.protocols import functions as proto  # type: ignore
    except ImportError:
        return None
    return proto


def self_metered(kind: str) -> bool:
    """True when the protocol function behind ``kind`` opens its own cost region."""
    proto = _protocols()
    return proto is not None and getattr(proto, kind, None) is not None


def nonlinear(name: str) -> Callable:
    """The configured implementation of nonlinear function ``name``.

    ``cipherdm_torch.protocols.functions`` (which follows ``protocols.config.use(...)``) when it
    provides ``name``; CrypTen's direct method otherwise.
    """
    proto = _protocols()
    fn = getattr(proto, name, None) if proto is not None else None
    return fn if fn is not None else getattr(_CryptenDirect, name)


# ------------------------------------------------------------------ linear algebra

def _mm(a, b):
    """a @ b where at least one side is secret."""
    if is_secret(a):
        return a.matmul(b)
    # public @ secret = (secret^T @ public^T)^T
    return b.transpose(-1, -2).matmul(a.transpose(-1, -2)).transpose(-1, -2)


@register(aten.matmul.default, aten.mm.default, aten.bmm.default, kind="matmul")
def _matmul(a, b):
    return _mm(a, b)


@register(aten.linear.default, kind="linear")
def _linear(x, weight, bias=None):
    out = _mm(x, weight.transpose(-1, -2) if is_secret(weight) else weight.t())
    return out if bias is None else out + bias


@register(aten.addmm.default, kind="linear")
def _addmm(bias, a, b, beta=1, alpha=1):
    out = _mm(a, b)
    if alpha != 1:
        out = out * alpha
    return out + (bias if beta == 1 else bias * beta)


def _conv_check(node):
    if len(node.args) > 5 and node.args[5] not in (None, 1, [1, 1], (1, 1)):
        return "dilation other than 1"
    return None


@register(aten.conv2d.default, kind="conv2d", check=_conv_check)
def _conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    x = lift(x)
    out = x.conv2d(weight, stride=stride, padding=padding, groups=groups)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out


@register(aten.conv_transpose2d.input, kind="conv2d", check=_conv_check)
def _conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                      dilation=1):
    x = lift(x)
    out = x.conv_transpose2d(weight, stride=stride, padding=padding,
                             output_padding=output_padding, groups=groups)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out


@register(aten.embedding.default, kind="embedding")
def _embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    if not is_secret(indices):  # public labels: a local row lookup on the shares
        idx = indices.long()
        return local(weight, lambda s: s[idx])
    # secret labels arrive one-hot encoded (..., num_embeddings): a matrix product
    if indices.size(-1) != weight.size(0):
        raise ValueError(f"secret embedding indices must be one-hot with {weight.size(0)} "
                         f"entries in the last dim, got shape {tuple(indices.size())}")
    return _mm(indices, weight)


def _sdpa_check(node):
    kw = dict(node.kwargs)
    names = ["attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    for name, value in zip(names, node.args[3:]):
        kw[name] = value
    if kw.get("attn_mask") is not None:
        return "attn_mask"
    if kw.get("dropout_p", 0.0):
        return "attention dropout"
    if kw.get("is_causal", False):
        return "is_causal"
    return None


@register(aten.scaled_dot_product_attention.default, kind="attention", check=_sdpa_check)
def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    d = q.size(-1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = _mm(q, k.transpose(-1, -2)) * scale
    if self_metered("softmax"):
        probs = nonlinear("softmax")(scores, -1)
    else:
        with _region("softmax"):
            probs = nonlinear("softmax")(scores, -1)
    return _mm(probs, v)


def _region(name):
    from cipherdm_torch.mpc.cost import region
    return region(name)


# ------------------------------------------------------------------ element-wise arithmetic

def _scaled(x, alpha):
    return x if alpha == 1 else x * alpha


def _size(x):
    if is_secret(x):
        return tuple(x.size())
    return tuple(x.shape) if torch.is_tensor(x) else ()


def _broadcast(a, b):
    """Expand both operands to their broadcast shape (CrypTen adds shares in place)."""
    shape = torch.broadcast_shapes(_size(a), _size(b))

    def grow(x):
        if _size(x) == shape:
            return x
        if is_secret(x):
            return local(x, lambda s: s.expand(shape).contiguous())
        return torch.as_tensor(x).expand(shape).contiguous() if torch.is_tensor(x) else x
    return grow(a), grow(b)


@register(aten.add.Tensor, aten.add.Scalar, kind="add")
def _add(a, b, alpha=1):
    a, b = _broadcast(a, _scaled(b, alpha))
    return a + b if is_secret(a) else b + a


@register(aten.sub.Tensor, aten.sub.Scalar, kind="add")
def _sub(a, b, alpha=1):
    a, b = _broadcast(a, _scaled(b, alpha))
    return a - b if is_secret(a) else (-b) + a


@register(aten.rsub.Scalar, aten.rsub.Tensor, kind="add")
def _rsub(a, b, alpha=1):
    return _sub(b, a, alpha) if is_secret(b) else (-_scaled(a, alpha)) + b


@register(aten.neg.default, kind="add")
def _neg(x):
    return -x


@register(aten.mul.Tensor, aten.mul.Scalar, kind="mul")
def _mul(a, b):
    if is_secret(a) and is_secret(b):
        a, b = _broadcast(a, b)
    elif _size(a) != _size(b) and torch.is_tensor(a if not is_secret(a) else b):
        a, b = _broadcast(a, b)
    return a * b if is_secret(a) else b * a


@register(aten.div.Tensor, aten.div.Scalar, kind="div")
def _div(a, b):
    if is_secret(b):
        return _mul(a, nonlinear("reciprocal")(b))
    if torch.is_tensor(b) and b.numel() > 1:
        return a * (1.0 / b.float())
    return a / float(b)


@register(aten.square.default, kind="mul")
def _square(x):
    return x.square()


def _pow_check(node):
    e = node.args[1]
    return None if isinstance(e, (int, float)) and float(e).is_integer() and 0 < e <= 8 \
        else f"exponent {e!r} (only small positive integers)"


@register(aten.pow.Tensor_Scalar, kind="mul", check=_pow_check)
def _pow(x, e):
    return x.pow(int(e))


@register(aten.sum.dim_IntList, kind="shape")
def _sum(x, dim=None, keepdim=False, dtype=None):
    if dim is None or dim == []:
        return x.sum()
    return local(x, lambda s: s.sum(dim=dim, keepdim=keepdim))


@register(aten.sum.default, kind="shape")
def _sum_all(x, dtype=None):
    return x.sum()


@register(aten.mean.dim, kind="shape")
def _mean(x, dim=None, keepdim=False, dtype=None):
    dims = list(range(x.dim())) if dim is None or dim == [] else list(dim)
    count = 1
    for d in dims:
        count *= x.size(d)
    return local(x, lambda s: s.sum(dim=dims, keepdim=keepdim)) / count


@register(aten.mean.default, kind="shape")
def _mean_all(x, dtype=None):
    return x.mean()


# ------------------------------------------------------------------ nonlinear ops

def _unary(name):
    def run(x, *args, **kwargs):
        return nonlinear(name)(x)
    return run


register(aten.silu.default, kind="silu")(_unary("silu"))
register(aten.mish.default, kind="mish")(_unary("mish"))
register(aten.exp.default, kind="exp")(_unary("exp"))
register(aten.reciprocal.default, kind="reciprocal")(_unary("reciprocal"))
register(aten.rsqrt.default, kind="rsqrt")(_unary("rsqrt"))


@register(aten.sigmoid.default, kind="sigmoid")
def _sigmoid(x):
    return x.sigmoid()


@register(aten.tanh.default, kind="tanh")
def _tanh(x):
    return x.tanh()


@register(aten.relu.default, kind="relu")
def _relu(x):
    return x.relu()


@register(aten.gelu.default, kind="gelu")
def _gelu(x, approximate="none"):
    return nonlinear("gelu")(x, approximate=approximate)


@register(aten.softmax.int, aten._softmax.default, kind="softmax")
def _softmax(x, dim, *rest):
    return nonlinear("softmax")(x, dim)


@register(aten.group_norm.default, kind="group_norm")
def _group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    return nonlinear("group_norm")(lift(x), num_groups, weight, bias, eps)


@register(aten.layer_norm.default, kind="layer_norm")
def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return nonlinear("layer_norm")(lift(x), list(normalized_shape), weight, bias, eps)


# ------------------------------------------------------------------ shape ops (local)

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
            _carry_replica([x.share], p, lambda reps, k=k: aten_op(reps[0], *args, **kwargs)[k])
        return [wrap(x, p) for p in pieces]
    return run


for _op in (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default,
            aten.unbind.int, aten.tensor_split.sections):
    register(_op, kind="shape")(_split_op(_op))


def _join_op(aten_op):
    def run(tensors, *args, **kwargs):
        tensors = [lift(t) for t in tensors]
        template = tensors[0]
        # rescale public pieces lifted with a different encoder (never the case with defaults)
        share = aten_op([t.share for t in tensors], *args, **kwargs)
        _carry_replica([t.share for t in tensors], share, lambda reps: aten_op(reps, *args, **kwargs))
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
def _constant_pad(x, pad, value=0):
    x = lift(x)
    out = local(x, lambda s: aten.constant_pad_nd(s, list(pad), 0))
    return out if not value else out + _pad_value_mask(x, pad, value)


@register(aten.pad.default, kind="shape", check=_pad_check)
def _pad(x, pad, mode="constant", value=None):
    if mode == "constant":
        return _constant_pad(x, pad, value or 0)
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


@register(aten.avg_pool2d.default, kind="pool")
def _avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False,
                count_include_pad=True, divisor_override=None):
    stride = stride or kernel_size
    return x.avg_pool2d(kernel_size, stride=stride, padding=padding)


@register(aten.adaptive_avg_pool2d.default, kind="pool")
def _adaptive_avg_pool2d(x, output_size):
    return x.adaptive_avg_pool2d(output_size)


# ------------------------------------------------------------------ comparisons (relu based)
#
# Each runs on the active backend's comparison (CrypTen's or the replicated one): clamp and
# hardtanh as relus of shifted copies, evaluated in one batched comparison; leaky_relu as a
# public blend of x and relu(x); max pooling as a tournament of max(a, b) = a + relu(b - a).

def _relus(*xs):
    """relu of several equally shaped secrets in one batched comparison."""
    if len(xs) == 1:
        return [xs[0].relu()]
    stacked = crypten.stack(list(xs))
    out = stacked.relu()
    return [out[i] for i in range(len(xs))]


def _bounds_check(node):
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    if lo is None and hi is None:
        return "clamp without bounds"
    for b in (lo, hi):
        if b is not None and not isinstance(b, (int, float)):
            return "a secret or tensor bound (only public scalar bounds)"
    return None


def _clamp_secret(x, lo=None, hi=None):
    if lo is not None and hi is not None:
        if hi < lo:
            return x * 0.0 + float(hi)  # torch: min(max(x, lo), hi) = hi everywhere
        a, b = _relus(x - float(lo), x - float(hi))
        return a - b + float(lo)   # lo + relu(x - lo) - relu(x - hi)
    if lo is not None:
        return _relus(x - float(lo))[0] + float(lo)
    return -_relus(-x + float(hi))[0] + float(hi)  # hi - relu(hi - x)


@register(aten.clamp.default, kind="relu", check=_bounds_check)
def _clamp(x, min=None, max=None):
    return _clamp_secret(x, min, max)


@register(aten.clamp_min.default, kind="relu")
def _clamp_min(x, min):
    return _clamp_secret(x, float(min), None)


@register(aten.clamp_max.default, kind="relu")
def _clamp_max(x, max):
    return _clamp_secret(x, None, float(max))


@register(aten.hardtanh.default, kind="relu")
def _hardtanh(x, min_val=-1.0, max_val=1.0):
    return _clamp_secret(x, float(min_val), float(max_val))


@register(aten.relu6.default, kind="relu")
def _relu6(x):
    return _clamp_secret(x, 0.0, 6.0)


@register(aten.leaky_relu.default, kind="relu")
def _leaky_relu(x, negative_slope=0.01):
    a = float(negative_slope)
    r = x.relu()
    return r if a == 0 else x * a + r * (1.0 - a)   # a*x + (1-a)*relu(x)


def _max_pool_check(node):
    args = list(node.args) + [None] * 6
    dilation = args[4] if args[4] is not None else node.kwargs.get("dilation", 1)
    ceil_mode = args[5] if args[5] is not None else node.kwargs.get("ceil_mode", False)
    if dilation not in (1, [1, 1], (1, 1)):
        return "dilation other than 1"
    if ceil_mode:
        return "ceil_mode=True"
    return None


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


_POOL_PAD = -(2.0 ** 12)  # stands in for -inf on padded positions (far below activations)


def _max_tree(x, dim):
    """Maximum along ``dim`` by halves: ceil(log2 n) batched comparisons."""
    while x.size(dim) > 1:
        n = x.size(dim)
        half = n // 2
        a, b = x.narrow(dim, 0, half), x.narrow(dim, half, half)
        best = a + (b - a).relu()
        if n % 2:
            best = crypten.cat([best, x.narrow(dim, n - 1, 1)], dim=dim)
        x = best
    return x.squeeze(dim)


@register(aten.max_pool2d.default, kind="pool", check=_max_pool_check)
def _max_pool2d(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride) if stride not in (None, (), []) else (kh, kw)
    ph, pw = _pair(padding)
    x = lift(x)
    if ph or pw:
        x = _constant_pad(x, [pw, pw, ph, ph], _POOL_PAD)
    win = local(x, lambda s: s.unfold(-2, kh, sh).unfold(-2, kw, sw).contiguous())
    win = win.reshape(*win.size()[:-2], kh * kw)
    return _max_tree(win, -1)
