"""Which variant of each nonlinear protocol runs, its accuracy knobs, and the MPC backend.

One switch per function selects ``"baseline"`` (CrypTen's direct method) or
``"optimised"`` (this package's protocols); knobs trade accuracy for cost; ``backend``
selects the protocol every ``MPCTensor`` operation runs on (``"rss"``: the dealer-free
replicated backend, ``"crypten"``: CrypTen's default Beaver-triple protocol), so a caller
sets one thing instead of both this module and ``crypten.cfg``.
Settings live in a per-process stack (each party is its own process), so a
``with use(...)`` block changes them for the code inside it only::

    with use("baseline"):                   # every function on CrypTen's methods
        ...
    with use(silu="baseline", exp_squarings=6):
        ...
    with use("optimised", backend="rss"):   # our protocols on the replicated backend
        ...

Backends are plug-ins, looked up by name when a block asks for one (:data:`BACKENDS`):
``"rss"`` imports :mod:`cipherdm_torch.protocols.replicated.backend` with :mod:`importlib`
and enters its ``replicated_backend()`` context (which installs the backend's CrypTen
patches on first use); ``"crypten"`` sets ``crypten.cfg.mpc.protocol`` to ``"beaver"`` with
``crypten.cfg.temp_override``. So importing this module imports neither CrypTen nor a
backend, and the backend-independent protocols that read these settings never depend on one.
"""

from __future__ import annotations

import dataclasses
import contextvars
import importlib
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, Iterator, Optional

__all__ = ["Settings", "FUNCTIONS", "VARIANTS", "TRUNCATIONS", "BACKENDS", "use", "current",
           "bounded_comparisons", "coarse_comparisons", "truncation_is_exact",
           "snapshot_stack", "adopt_stack"]

VARIANTS = ("baseline", "optimised")
TRUNCATIONS = ("exact", "probabilistic")
FUNCTIONS = ("silu", "mish", "gelu", "exp", "softmax", "reciprocal", "rsqrt",
             "group_norm", "layer_norm")


def _rss() -> ContextManager:
    # a plug-in looked up by name: the replicated backend (and CrypTen) load only when asked for
    backend = importlib.import_module("cipherdm_torch.protocols.replicated.backend")
    return backend.replicated_backend()


def _crypten() -> ContextManager:
    crypten = importlib.import_module("crypten")  # CrypTen loads only when a backend is switched
    return crypten.cfg.temp_override({"mpc.protocol": "beaver"})


# backend name -> the context manager factory that selects it for a block
BACKENDS: Dict[str, Callable[[], ContextManager]] = {"rss": _rss, "crypten": _crypten}


@dataclass(frozen=True)
class Settings:
    """Active settings. Function fields hold a variant name; the rest are knobs."""

    silu: str = "optimised"
    mish: str = "optimised"
    gelu: str = "optimised"
    exp: str = "optimised"
    softmax: str = "optimised"
    reciprocal: str = "optimised"
    rsqrt: str = "optimised"
    group_norm: str = "optimised"
    layer_norm: str = "optimised"
    # activations: name of the coefficient set in coefficients.py ("<fn>" default)
    activation_fit: str = "default"
    # exp(x), x <= 0: exp(x) = b(x / 2^n)^(2^n), b(z) = 1 + z + z^2/2, n = exp_squarings
    exp_squarings: int = 6
    exp_clip: float = 32.0  # inputs below -exp_clip give exactly 0 when exp_clip_compare
    exp_clip_compare: bool = True  # one comparison per element; off: correct only down to -2^(n+1)
    # calibrated lowest input of exp (softmax: x - rowmax), or None (unknown: clip as above).
    # When it is at or above -exp_safe_bound(n) = -1.75 * 2^n (-112 for n = 6), where the
    # unclipped approximation is within 6e-5 of exp, the clip comparison is skipped. Inputs
    # below the bound are then NOT zeroed: from -1.75 * 2^n to -2^(n+1) the result rises back
    # towards 1 and below it grows without bound (a wrong softmax row), so only set this from
    # a recorded range with margin (recorded_ranges.calibrated_settings)
    exp_input_min: Optional[float] = None
    # reciprocal / rsqrt: magnitude guess from comparisons with 2^(j / steps) in [2^lo, 2^hi]
    # (one batched comparison: the same rounds for any step count, bytes grow with it), then
    # Newton. rsqrt (norms: one element per group or row) takes eight steps per octave: the
    # mantissa lies in a bucket [2^(r/8), 2^((r+1)/8)) where the bucket's minimax linear guess
    # is within 0.035% relative, and NO Newton step follows (with ``times``, the norm's centred
    # values, two products after the comparison instead of four; GroupNorm's error on the
    # recorded ranges is unchanged, 2.9e-3 against 2.9e-3 with 4 buckets and one step).
    # 4 buckets and one step (0.14%, then 3e-6) cost 3-4 rounds more per call; 4 buckets and
    # no step are 4x less accurate (GroupNorm 1.2e-2). reciprocal (softmax: one element per
    # row, many rows) takes 4 steps per octave (linear guess within 0.45%) and ONE Newton step
    # (2e-5): 4 rounds fewer per softmax than 1 step per octave and 2 Newton steps, for 4x the
    # comparisons of the row sums (bench UNet: +0.2 MB per forward, the same error 0.0140;
    # these comparisons are bounded and cheap since stop 18)
    magnitude_lo: int = -16
    magnitude_hi: int = 24
    reciprocal_steps: int = 4
    reciprocal_iters: int = 1
    rsqrt_steps: int = 8
    rsqrt_iters: int = 0
    # softmax row max: "tree" (pairwise, n - 1 comparisons per row, ceil(log2 n) levels),
    # "tree3" (by thirds: ceil(log3 n) levels, ~40% fewer rounds, ~1.5 n comparisons per row)
    # or CrypTen's max
    softmax_max_method: str = "tree3"
    # rss backend fixed-point truncation: "exact" (P2-assisted, error <= 1 unit for |x| < 2^62,
    # 2 rounds, 16 B per element from two parties and 20 B from the helper for a divisor 2^16
    # (32 B for other divisors), the helper rotating per call: 17.3 B per party on average) or
    # "probabilistic" (ABY3's two-share
    # truncation, 1 round, 8 B per party, wrong by ~2^64/y with probability ~|x|/2^64;
    # for benchmarks only)
    truncation: str = "exact"
    # rss backend comparisons (sign bit of x < 0): read in the ring of compare_bits bits. 64:
    # exact for every encoded value (the default for any caller); 32: exact for encoded values
    # in [-2^31, 2^31), i.e. |x| < 2^(31-f) = 32768 with f = 16 fractional bits, one round and
    # ~16 B per element less. The protocols whose compared values are bounded by design (the
    # softmax row max: differences of logits; exp's clip; the SiLU / Mish / GELU window, as
    # x - T, x + T) run their comparisons with bounded_compare_bits (64: off). CrypTen's own
    # backends always compare at full width.
    compare_bits: int = 64
    bounded_compare_bits: int = 32
    # rss comparisons whose answer may be off near zero (the softmax row max: a max that
    # picks an entry up to 2^(s+1-f) below the largest is as good for exp(x - max), softmax
    # being shift-invariant): each share drops its low ``coarse_compare_shift`` bits locally
    # and the sign is read mod 2^16: exact for encoded values outside [0, 2^(s+1)) inside
    # [-2^(15+s) + 2^(s+1), 2^(15+s)), i.e. differences of logits below 2^(15+s-f) = 512 at
    # s = 10, f = 16 (zone 2^-5); one carry-tree level (one round) less than 32 bits and
    # half the words. None: such blocks take bounded_compare_bits. compare_shift is the
    # active shift (0 outside such blocks)
    coarse_compare_shift: Optional[int] = 10
    compare_shift: int = 0
    # where the rss backend's local ring products (matmul, convolutions: float64 limbs) run:
    # None (with the shares, in host memory) or a torch device string ("cuda", "cuda:1"). The
    # shares, the channel and the PRG streams stay on the host; results are bit for bit the
    # same (protocols/replicated/ring.py)
    product_device: Optional[str] = None
    # MPC backend selected by the innermost use(backend=...): a key of BACKENDS, or None (not
    # chosen here: crypten.cfg.mpc.protocol as it is)
    backend: Optional[str] = None

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


_STACK = [Settings()]
# a lockstep branch's own stack (see adopt_stack); a context variable, so each branch (a
# coroutine in the caller's thread) sees its own
_BRANCH_STACK: contextvars.ContextVar = contextvars.ContextVar("protocol_settings_stack",
                                                                default=None)


def _stack() -> list:
    own = _BRANCH_STACK.get()
    return _STACK if own is None else own


def current() -> Settings:
    """The settings in force in this process (in this branch, for a lockstep branch)."""
    return _stack()[-1]


def snapshot_stack() -> list:
    """A copy of the current settings stack, for :func:`adopt_stack` in a lockstep branch."""
    return list(_stack())


def adopt_stack(stack: list) -> None:
    """Give the current context its own settings stack (a lockstep branch of
    :mod:`cipherdm_torch.protocols.replicated.lockstep`: its ``use`` blocks must not push onto
    the stack of a sibling branch running between its rounds)."""
    _BRANCH_STACK.set(list(stack))


@contextmanager
def use(variant: Optional[str] = None, *, backend: Optional[str] = None,
        **knobs: Any) -> Iterator[Settings]:
    """Run a block with ``variant`` for every function and/or individual overrides.

    ``variant`` is "baseline" or "optimised" (None keeps the current choices);
    keyword arguments name a function (value: a variant) or a knob. ``backend`` ("rss" or
    "crypten", a key of :data:`BACKENDS`) also switches CrypTen's protocol for the block and
    puts the previous one back after it (None keeps the backend in force).
    """
    changes: Dict[str, Any] = {}
    if variant is not None:
        _check_variant("variant", variant)
        changes.update({f: variant for f in FUNCTIONS})
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {backend!r}")
        changes["backend"] = backend
    fields = {f.name for f in dataclasses.fields(Settings)}
    for key, value in knobs.items():
        if key not in fields:
            raise TypeError(f"unknown protocol setting {key!r}; known: {sorted(fields)}")
        if key in FUNCTIONS:
            _check_variant(key, value)
        if key == "truncation" and value not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {value!r}")
        if key == "compare_bits" and value not in (16, 32, 64):
            raise ValueError(f"{key} must be 16, 32 or 64, got {value!r}")
        if key == "bounded_compare_bits" and value not in (32, 64):
            raise ValueError(f"{key} must be 32 or 64, got {value!r}")
        if key in ("compare_shift", "coarse_compare_shift") and value is not None and (
                not isinstance(value, int) or not 0 <= value <= 48):
            raise ValueError(f"{key} must be an int in [0, 48], got {value!r}")
        if key == "product_device" and value is not None:
            value = _check_device(value)
        changes[key] = value
    with ExitStack() as stack:
        if backend is not None:
            stack.enter_context(BACKENDS[backend]())
        stack = _stack()
        stack.append(current().replace(**changes))
        try:
            yield current()
        finally:
            stack.pop()


def truncation_is_exact() -> bool:
    """Whether the active protocol divides shares by a public integer without a probability of
    a large error that grows with |x|: only the "rss" backend in its default exact mode (knob
    ``truncation``; exact for |x| < 2^62). CrypTen's own protocols are not: its ``replicated``
    mode truncates two-share style and its ``beaver`` mode divides the shares locally with a
    wrap correction that is itself wrong with probability ~|x| / 2^64 (a slow test caught it
    at 2^53: 2^-11 per element)."""
    crypten = importlib.import_module("crypten")  # CrypTen loads only when this is asked
    return crypten.cfg.mpc.protocol == "rss" and current().truncation == "exact"


@contextmanager
def bounded_comparisons() -> Iterator[Settings]:
    """A block whose comparisons take values bounded by design (see ``compare_bits``)."""
    with use(compare_bits=current().bounded_compare_bits, compare_shift=0) as settings:
        yield settings


@contextmanager
def coarse_comparisons() -> Iterator[Settings]:
    """A block whose comparisons may err just above zero (see ``coarse_compare_shift``):
    16-bit comparisons after a local shift, or the bounded ones where the knob is None."""
    shift = current().coarse_compare_shift
    if shift is None:
        with bounded_comparisons() as settings:
            yield settings
        return
    with use(compare_bits=16, compare_shift=shift) as settings:
        yield settings


def _check_device(spec: Any) -> str:
    """A usable torch device string for ``product_device`` (CUDA must be present)."""
    torch = importlib.import_module("torch")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"product_device must be a torch device such as 'cpu' or 'cuda', "
                         f"got {spec!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"product_device {spec!r}: CUDA is not available on this machine "
                             f"(torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"product_device {spec!r}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"product_device must be a CPU or CUDA device, got {spec!r}")
    return str(device)


def _check_variant(name: str, value: str) -> None:
    if value not in VARIANTS:
        raise ValueError(f"{name}: variant must be one of {VARIANTS}, got {value!r}")
