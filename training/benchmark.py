"""Benchmark: time and peak memory of one DP-SGD step vs one non-private step, for several K.

Each measurement runs in a fresh child process, so the CPU peak (resident set size growth during the
steps, from ``getrusage``) is not polluted by earlier runs; on CUDA the peak is
``torch.cuda.max_memory_allocated``. ``cipherdm bench`` is the command line.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
from dataclasses import replace
from typing import Dict, List, Sequence

import torch

from cipherdm_torch.diffusion.backbones import count_parameters
from cipherdm_torch.training.dpsgd import DPSGDEngine
from cipherdm_torch.training.loss import per_example_loss
from cipherdm_torch.training.trainer import TrainConfig, build_denoiser

__all__ = ["bench_one", "run_bench", "format_table", "default_bench_config"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def bench_one(cfg: TrainConfig, k: int, private: bool, batch: int, repeats: int = 2,
              threads: int = 1, device: str = "cpu") -> Dict[str, float]:
    """Seconds per step and peak memory (MB) of one step on a batch of ``batch`` examples."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    den = build_denoiser(cfg, (1, 28, 28), 10).to(device)
    x0 = torch.randn(batch, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.Adam(den.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    if private:
        eng = DPSGDEngine(den, opt, noise_multiplier=1.0, max_grad_norm=1.0,
                          expected_batch_size=batch, k=k, max_physical_batch=cfg.max_physical_batch,
                          grad_sample_mode=cfg.grad_sample_mode, noise_generator=gen)

        def step():
            eng.step(x0, labels, generator=gen)
    else:
        def step():
            opt.zero_grad(set_to_none=True)
            for s in range(0, batch, cfg.max_physical_batch):
                xs, ls = x0[s:s + cfg.max_physical_batch], labels[s:s + cfg.max_physical_batch]
                per_example_loss(den, den, xs, ls, k, generator=gen).sum().backward()
            opt.step()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_mb()
    step()  # warm-up (also allocates)
    t = time.perf_counter()
    for _ in range(repeats):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / repeats
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mb() - rss0
    return {"k": k, "private": private, "seconds": dt, "peak_mb": peak,
            "params": count_parameters(den), "batch": batch}


def _child(q, args) -> None:
    q.put(bench_one(*args))


def run_bench(cfg: TrainConfig, ks: Sequence[int] = (1, 4, 16), batch: int = 64,
              repeats: int = 2, threads: int = 1, device: str = "cpu") -> List[Dict[str, float]]:
    """:func:`bench_one` for every K, non-private then DP-SGD, each in a fresh child process."""
    ctx = mp.get_context("spawn")
    rows = []
    for k in ks:
        for private in (False, True):
            q = ctx.Queue()
            p = ctx.Process(target=_child, args=(q, (cfg, k, private, batch, repeats, threads, device)))
            p.start()
            rows.append(q.get())
            p.join()
    return rows


def format_table(rows: Sequence[Dict[str, float]]) -> str:
    """The rows as a text table, then DP-SGD / non-private ratios of time and memory per K."""
    lines = [f"{'K':>3} {'mode':>11} {'s/step':>8} {'ex/s':>8} {'peak MB':>8}"]
    for r in rows:
        lines.append(f"{r['k']:>3} {'DP-SGD' if r['private'] else 'non-private':>11} "
                     f"{r['seconds']:>8.3f} {r['batch'] / r['seconds']:>8.1f} {r['peak_mb']:>8.0f}")
    base = {r["k"]: r for r in rows if not r["private"]}
    for r in rows:
        if r["private"] and r["k"] in base:
            b = base[r["k"]]
            lines.append(f"K={r['k']}: DP/non-private time x{r['seconds'] / b['seconds']:.2f}, "
                         f"memory x{r['peak_mb'] / max(b['peak_mb'], 1.0):.2f}")
    return "\n".join(lines)


def default_bench_config(**kw) -> TrainConfig:
    """A small MNIST-sized model (16 channels, one res block per level); ``kw`` overrides it."""
    base = TrainConfig(model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                       attn_resolutions=(7,), dropout=0.0, max_physical_batch=64)
    return replace(base, **kw)
