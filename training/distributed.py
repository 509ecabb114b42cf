"""Data-parallel DP-SGD on torchrun: the process group, the shared Poisson batch, one noise draw.

Under ``torchrun --nproc-per-node=N`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT`` in the environment) the trainer runs one process per GPU (or per CPU slot), each
computing the per-example gradients of its part of the logical batch. With ``WORLD_SIZE`` 1, or
outside torchrun, nothing here is used and training is the single-process code path.

One logical step, world of W processes:

1. **Sampling**: rank 0 draws the Poisson mask over the *whole* data set from its DP generator, the
   same draw a single process makes with that generator, and sends the sampled indices to every
   rank (one broadcast of at most a few thousand integers). Rank r keeps the r-th of W contiguous,
   near-equal slices (:func:`rank_slice`). Every example joins the global batch exactly once, with
   probability q, so the mechanism, and the accounting for (q, sigma, steps), is that of one
   process; the world size is not a privacy parameter and a run may resume with a different one.
2. **Per-example gradients**: each rank clips its examples' gradients to C (noise multiplicity K
   collapsed first, :mod:`.dpsgd`) and sums them, over its micro-batches.
3. **Noise, once**: rank 0 alone adds N(0, sigma^2 C^2 I) to its partial sum (the noise generator
   exists on rank 0 only); one all-reduce (SUM) of the flattened sums; every rank divides by the
   *global* expected batch qN. Every rank then holds the same gradient
   ``(sum_i clip(g_i) + N(0, sigma^2 C^2 I)) / qN``, the single-process update, and the same
   weights after the optimiser step (Opacus' ``DistributedDPOptimizer``, with one all-reduce and the
   global batch: :class:`WorldDPOptimizer`). Noise added by every rank (a plain DP optimizer per
   rank, then averaging) would be sqrt(W) times sigma C / qN: more noise than the accounting
   charges for, a worse model at the same epsilon.
4. **Ledger, config, checkpoints**: rank 0 writes them (the ledger records the step before rank 0
   joins the all-reduce, so before any noised gradient exists); every rank keeps the same ledger in
   memory, so the budget stop and the step count agree on all ranks.

Backends: gloo for CPU training, NCCL for CUDA (``torch.cuda.set_device(LOCAL_RANK)`` first).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from opacus.optimizers import DistributedDPOptimizer
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from cipherdm_torch.errors import UserError

__all__ = ["World", "SINGLE", "torchrun_world_size", "init_world", "close_world", "resolve_device",
           "rank_slice", "broadcast_object", "check_ranks_agree", "barrier", "all_reduce_mean",
           "broadcast_module", "WorldDPOptimizer"]

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes (``SINGLE``: one process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()
_OWNED = {"group": False}  # True when init_world created the default process group


def torchrun_world_size() -> int:
    """``WORLD_SIZE`` under torchrun (``RANK`` set), else 1."""
    if "RANK" not in os.environ:
        return 1
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def init_world(device_type: str = "cpu") -> World:
    """The data-parallel world of this process, the default process group set up once.

    An initialised process group (the caller's) is used as it is. Otherwise, under torchrun with
    ``WORLD_SIZE`` > 1, the group is initialised from torchrun's environment (``env://``): NCCL for
    ``device_type`` "cuda" (after ``torch.cuda.set_device(LOCAL_RANK)``), gloo for "cpu". Outside
    torchrun, or with one process, :data:`SINGLE` (no process group).
    """
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if dist.is_available() and dist.is_initialized():
        world = World(dist.get_rank(), dist.get_world_size(), local)
        backend = str(dist.get_backend()).lower()
        if world.distributed and device_type == "cpu" and backend == "nccl":
            raise UserError("the process group uses NCCL, which cannot reduce CPU tensors: train "
                            "with --device cuda, or initialise the group with gloo")
        return world
    size = torchrun_world_size()
    if size <= 1:
        return SINGLE
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: start data-parallel "
                        "training with torchrun (torchrun --nproc-per-node=N -m cipherdm_torch "
                        "train ...)")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda, but CUDA is not available")
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA "
                            "device(s): use --nproc-per-node <= the number of GPUs")
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://")
    _OWNED["group"] = True
    return World(dist.get_rank(), dist.get_world_size(), local)


def close_world() -> None:
    """Destroy the default process group if :func:`init_world` created it."""
    if _OWNED["group"] and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED["group"] = False


def resolve_device(spec: str, world: World = SINGLE) -> torch.device:
    """``"cpu"``, ``"cuda"`` (this rank's GPU under torchrun) or ``"auto"`` (CUDA if available)."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda, but CUDA is not available (torch.cuda.is_available() "
                            "is False)")
        return torch.device("cuda", world.local_rank if world.distributed
                            else torch.cuda.current_device())
    raise UserError(f"device must be cpu, cuda or auto, got {spec!r}")


def rank_slice(idx: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's part of the global batch ``idx``: the rank-th of W contiguous slices whose sizes
    differ by at most one (every sampled example goes to exactly one rank)."""
    if not world.distributed:
        return idx
    return torch.tensor_split(idx, world.size)[world.rank]


def broadcast_object(world: World, obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects; identity in one process)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_ranks_agree(world: World, facts: Dict[str, Any], what: str = "the run") -> None:
    """Raise on every rank if any rank's ``facts`` differ from rank 0's (a collective)."""
    if not world.distributed:
        return
    gathered: List[Optional[Dict[str, Any]]] = [None] * world.size
    dist.all_gather_object(gathered, facts)
    ref = gathered[0]
    bad = sorted({k for g in gathered[1:] for k in set(ref) | set(g) if g.get(k) != ref.get(k)})
    if bad:
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} {g.get(k)!r}"
                                                 for r, g in enumerate(gathered))
                           for k in bad[:4])
        raise RuntimeError(f"the {world.size} processes disagree on {what} ({detail}): every rank "
                           "must see the same data, run folder and code")


def barrier(world: World) -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written the ledger)."""
    if world.distributed:
        dist.barrier()


def all_reduce_mean(world: World, value_sum: float, count: int, device: torch.device) -> float:
    """Sum of ``value_sum`` over ranks divided by the sum of ``count`` (NaN if that is 0)."""
    t = torch.tensor([float(value_sum), float(count)], dtype=torch.float64, device=device)
    if world.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t[0] / t[1]) if float(t[1]) > 0 else float("nan")


@torch.no_grad()
def broadcast_module(world: World, module: torch.nn.Module, src: int = 0) -> None:
    """Overwrite ``module``'s parameters and buffers with rank ``src``'s (one flat broadcast)."""
    if not world.distributed:
        return
    tensors = [t for t in list(module.parameters()) + list(module.buffers())]
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = _flatten_dense_tensors([t.detach() for t in group])
        dist.broadcast(flat, src=src)
        for t, v in zip(group, _unflatten_dense_tensors(flat, group)):
            t.copy_(v)


class WorldDPOptimizer(DistributedDPOptimizer):
    """Opacus' ``DistributedDPOptimizer`` given the *global* expected batch, one all-reduce.

    Each rank clips and sums its per-example gradients (``clip_and_accumulate``); rank 0 alone adds
    N(0, sigma^2 C^2 I) (``DistributedDPOptimizer.add_noise``); each rank divides by the global
    expected batch (``scale_grad``); the sums are all-reduced once, flattened (SUM, no division by
    the world size, unlike Opacus' per-tensor reduce with a per-rank expected batch: same result).
    The result on every rank: ``(sum of all ranks' clipped gradients + noise) / expected batch``.
    """

    def reduce_gradients(self):
        grads = [p.grad for p in self.params if p.requires_grad]
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for g, v in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(v)
