"""Data-parallel DP-SGD on torchrun (2 gloo processes on CPU): update, noise scale, ledger.

Workers are module-level functions run in two processes with torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); they save what they measured and the test
checks it in the parent. The last test runs the real ``torchrun ... -m cipherdm_torch train``.
"""

import copy
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from opacus.optimizers import DPOptimizer
from synthetic import synthetic_images

from cipherdm_torch.diffusion.backbones import DDPMppUNet
from cipherdm_torch.diffusion.denoiser import Denoiser, EDMPrecond
from cipherdm_torch.training.accounting import epsilon_spent, noise_multiplier_for
from cipherdm_torch.training.distributed import (WorldDPOptimizer, check_ranks_agree, close_world,
                                                 init_world, rank_slice)
from cipherdm_torch.training.dpsgd import DPSGDEngine
from cipherdm_torch.training.loss import rows_for

torch.set_num_threads(1)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore:In CPU autocast"),
]

WORLD = 2
SIGMA, CLIP, EXPECTED, K, LABEL_DROP = 1.3, 0.5, 4.0, 2, 0.1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, fn, out, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = init_world("cpu")  # from the environment, as under torchrun
    assert world.size == WORLD and world.rank == rank
    try:
        torch.save(fn(world, *args), os.path.join(out, f"rank{rank}.pt"))
    finally:
        close_world()


def _spawn(fn, out, *args):
    mp.spawn(_worker, args=(_free_port(), fn, str(out), args), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False)
            for r in range(WORLD)]


def _tiny():
    torch.manual_seed(0)
    bb = DDPMppUNet(img_resolution=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                    attn_resolutions=(4,), dropout=0.0)
    return Denoiser(bb, EDMPrecond(), num_classes=10)


def _flat(den):
    return torch.cat([p.detach().flatten() for p in den.parameters()]).clone()


def _engine(den, gen, world, physical=2):
    return DPSGDEngine(den, torch.optim.SGD(den.parameters(), lr=1.0), noise_multiplier=SIGMA,
                       max_grad_norm=CLIP, expected_batch_size=EXPECTED, k=K,
                       max_physical_batch=physical, label_dropout=LABEL_DROP,
                       noise_generator=gen, world=world)


class _EveryRankAddsNoise(WorldDPOptimizer):
    """The mistake the design avoids: every rank noises its own partial sum."""

    def add_noise(self):
        DPOptimizer.add_noise(self)


# ------------------------------------------------------------------------ engine: one step
def _engine_worker(world):
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(7, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.tensor([1, 5, 10, 3, 7, 2, 0])  # 10 = null label
    den = _tiny()
    ref_den = copy.deepcopy(den)
    before = _flat(den)
    mine = rank_slice(torch.arange(7), world)  # rank 0: 0..3, rank 1: 4..6
    # the diffusion draws a single process makes for these examples: it draws micro-batch by
    # micro-batch (2 examples each), so rank 1 starts where rank 0's micro-batches end
    diff_gen = torch.Generator().manual_seed(3)
    if world.rank == 1:
        for s in (0, 2):
            rows_for(den, x0[s:s + 2], labels[s:s + 2], K, generator=diff_gen,
                     label_dropout=LABEL_DROP)
    noise_gen = torch.Generator().manual_seed(7) if world.is_main else None
    eng = _engine(den, noise_gen, world)
    eng.step(x0[mine], labels[mine], generator=diff_gen)
    out = {"before": before, "after": _flat(den), "local": len(mine),
           "norms": eng.last_per_example_norms}
    if world.is_main:  # the single-process step on the whole batch, same draws and noise
        ref = _engine(ref_den, torch.Generator().manual_seed(7), None)
        ref.step(x0, labels, generator=torch.Generator().manual_seed(3))
        out["ref_after"] = _flat(ref_den)
        out["ref_norms"] = ref.last_per_example_norms

    # noise only (empty batches on every rank: the clipped sum is zero), several draws
    empty_x, empty_y = x0[:0], labels[:0]
    deltas, naive = [], []
    for d in range(3):
        for sink, cls in ((deltas, None), (naive, _EveryRankAddsNoise)):
            den = _tiny()
            eng = _engine(den, torch.Generator().manual_seed(100 * d + 10 * world.rank + 1),
                          world)
            if cls is not None:
                eng.optimizer.__class__ = cls
            b = _flat(den)
            eng.step(empty_x, empty_y)
            sink.append(_flat(den) - b)
    out["noise"] = torch.cat(deltas)
    out["naive_noise"] = torch.cat(naive)
    try:  # ranks that see different data refuse to train, all of them
        check_ranks_agree(world, {"dataset": f"sha256:{world.rank}", "steps": 3})
    except RuntimeError as e:
        out["disagree"] = str(e)
    return out


def test_two_process_step_equals_single_process_step_and_noise_added_once(tmp_path):
    r0, r1 = _spawn(_engine_worker, tmp_path)
    assert (r0["local"], r1["local"]) == (4, 3)
    # both ranks hold the same weights, equal to the single-process step's
    assert torch.equal(r0["after"], r1["after"])
    update = r0["ref_after"] - r0["before"]
    err = float((r0["after"] - r0["ref_after"]).abs().max())
    rel = err / float(update.abs().max())
    print(f"max |w_2proc - w_1proc| = {err:.3e} (relative to the largest update {rel:.3e})")
    assert float(update.abs().max()) > 1e-3 and rel < 1e-5
    # the clipping saw the same per-example gradients (and clipping was active: norms > C)
    norms = torch.cat([r0["norms"], r1["norms"]])
    assert torch.allclose(norms, r0["ref_norms"], rtol=1e-4)
    assert float(norms.min()) > CLIP

    # noise std of the update: sigma C / expected batch, not sqrt(world) times it
    target = SIGMA * CLIP / EXPECTED
    assert torch.equal(r0["noise"], r1["noise"])
    ratio = float(r0["noise"].std()) / target
    naive = float(r0["naive_noise"].std()) / target
    print(f"noise std / (sigma C / qN) = {ratio:.4f} over {r0['noise'].numel()} draws; "
          f"every rank adding noise: {naive:.4f} (sqrt 2 = 1.4142)")
    assert abs(ratio - 1) < 0.02
    assert abs(naive - np.sqrt(2)) < 0.03
    assert abs(float(r0["noise"].mean())) < 0.02 * target
    assert "dataset" in r0.get("disagree", "") and r0["disagree"] == r1.get("disagree")


# ------------------------------------------------------------------------ trainer: ledger
def _cfg(out, **kw):
    from cipherdm_torch.training import TrainConfig

    base = dict(output_dir=str(out), model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(4,), dropout=0.0, batch_size=8, noise_multiplicity=2,
                steps=4, epsilon=8.0, checkpoint_every=2, sample_steps=2, dp_seed=1, lr=1e-3,
                ema_decay=0.5)
    base.update(kw)
    return TrainConfig(**base)


def _trainer_worker(world, root):
    from cipherdm_torch.diffusion import denoiser as den_mod
    from cipherdm_torch.training import DPDMTrainer, ledger as ledger_mod, trainer as tr_mod

    writes = []

    def counting(owner, name):
        orig = getattr(owner, name)

        def wrapped(*a, **k):
            writes.append(name)
            return orig(*a, **k)
        setattr(owner, name, wrapped)

    counting(tr_mod, "atomic_write_json")
    counting(ledger_mod.PrivacyLedger, "save")
    counting(den_mod.Denoiser, "save_pretrained")
    counting(tr_mod, "save_image_grid")
    counting(tr_mod.torch, "save")
    counting(tr_mod.os, "makedirs")
    counting(tr_mod.os, "replace")
    counting(tr_mod.shutil, "rmtree")

    ds = synthetic_images(96)
    run = os.path.join(root, "run")
    t = DPDMTrainer(_cfg(run), dataset=ds)
    t.train(progress=False, max_steps=3)
    first = (t.step_count, t.ledger.steps, t.last_loss)
    t = DPDMTrainer.resume(run, dataset=ds)  # continues from checkpoint-0000003 (the last one)
    resumed_at = t.step_count
    led = t.train(progress=False)
    second = (t.step_count, led.steps, led.checkpoint)
    weights = torch.cat([p.detach().flatten() for p in t.denoiser.parameters()])
    # the budget stop: sigma given, the budget allows fewer steps than planned
    b = DPDMTrainer(_cfg(os.path.join(root, "budget"), noise_multiplier=0.9, epsilon=3.0,
                         steps=10_000, checkpoint_every=0, sample_grid=False), dataset=ds)
    bled = b.train(progress=False)
    return {"writes": writes, "first": first, "resumed_at": resumed_at, "second": second,
            "weights": weights,
            "budget": (b.step_count, bled.steps, bled.notes["stopped_by_budget"]),
            "q": t.sample_rate, "sigma": t.config.noise_multiplier}


def test_rank0_alone_writes_ledger_and_checkpoints_resume_and_budget_stop(tmp_path):
    from cipherdm_torch.training import PrivacyLedger

    r0, r1 = _spawn(_trainer_worker, tmp_path, str(tmp_path))
    assert r1["writes"] == []
    assert {"save", "save_pretrained", "atomic_write_json", "save_image_grid"} <= set(r0["writes"])
    assert r0["first"][:2] == r1["first"][:2] == (3, 3)
    assert r0["first"][2] == r1["first"][2]  # the loss is the global batch's mean on every rank
    assert r0["resumed_at"] == r1["resumed_at"] == 3
    assert r0["second"] == r1["second"] == (4, 4, "checkpoint-0000004")
    assert torch.equal(r0["weights"], r1["weights"])
    steps, ledger_steps, stopped = r0["budget"]
    assert r1["budget"] == r0["budget"] and stopped and steps == ledger_steps
    assert 1 <= steps < 10_000

    led = PrivacyLedger.load(str(tmp_path / "run" / "ledger.json"))
    assert led.steps == 4 and led.checkpoint == "checkpoint-0000004"
    assert led.notes["world_size"] == 2
    assert led.epsilon_spent == pytest.approx(
        epsilon_spent([(r0["sigma"], r0["q"], 4)], led.delta), rel=1e-12)
    assert r0["sigma"] == pytest.approx(noise_multiplier_for(8.0, 1e-5, r0["q"], 4), rel=1e-12)
    bud = PrivacyLedger.load(str(tmp_path / "budget" / "ledger.json"))
    assert bud.steps == steps and bud.epsilon_spent <= 3.0
    assert epsilon_spent([(0.9, r0["q"], steps + 1)], bud.delta) > 3.0
    left = sorted(os.listdir(tmp_path / "run"))
    assert not [d for d in left if d.startswith(".tmp")]


# ------------------------------------------------------------------------ torchrun CLI
def _idx_dir(folder, n=48, res=8):
    import struct

    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for name, arr in (("train-images-idx3-ubyte", rng.integers(0, 256, (n, res, res))),
                      ("train-labels-idx1-ubyte", rng.integers(0, 4, n))):
        arr = np.ascontiguousarray(arr, dtype=np.uint8)
        head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(
            ">" + "I" * arr.ndim, *arr.shape)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(head + arr.tobytes())


@pytest.mark.slow  # a real torchrun of the CLI: the same code paths as the two spawned tests above
def test_torchrun_two_processes_cli(tmp_path):
    from cipherdm_torch.training import PrivacyLedger

    _idx_dir(str(tmp_path / "data"))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "cipherdm_torch", "train", "--data", str(tmp_path / "data"), "--out", str(out),
           "--steps", "3", "--epsilon", "6", "--checkpoint-every", "2", "--channels", "8",
           "--mults", "1,2", "--res-blocks", "1", "--attn", "4", "--dropout", "0",
           "--batch-size", "8", "-K", "2", "--sample-steps", "2", "--dp-seed", "1",
           "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, p.stdout  # rank 0 alone reports
    res = json.loads(lines[0])
    assert res["steps"] == 3 and res["checkpoint"] == "checkpoint-0000003"
    assert "2 processes on cpu" in p.stderr
    led = PrivacyLedger.load(str(out / "ledger.json"))
    q = 8 / 48
    sigma = noise_multiplier_for(6.0, 1e-5, q, 3)
    assert led.history == [[sigma, q, 3]] and led.notes["world_size"] == 2
    single = epsilon_spent([(sigma, q, 3)], 1e-5)
    print(f"torchrun ledger epsilon {led.epsilon_spent:.6f}, "
          f"single-process accounting {single:.6f}")
    assert led.epsilon_spent == pytest.approx(single, rel=1e-12) and led.epsilon_spent <= 6
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == [
        "checkpoint-0000002", "checkpoint-0000003"]
