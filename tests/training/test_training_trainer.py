"""Trainer: ledger (atomic, resumable, never undercounting), budget stop, checkpoints, EMA."""

import json
import os

import pytest
import torch
from synthetic import synthetic_images

from cipherdm_torch import files as files_mod
from cipherdm_torch.diffusion import DDPMppUNet, Denoiser, is_checkpoint_dir, load_denoiser
from cipherdm_torch.training import (
    BudgetExceeded,
    DPDMTrainer,
    LedgerError,
    PrivacyLedger,
    TrainConfig,
    latest_checkpoint,
    read_ledger,
    resolve_checkpoint,
)

torch.set_num_threads(1)


def _data(n=96, seed=0):
    return synthetic_images(n, seed)


def _cfg(out, **kw):
    base = dict(output_dir=str(out), model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(4,), dropout=0.0, batch_size=8, noise_multiplicity=2,
                steps=4, epsilon=8.0, checkpoint_every=2, sample_steps=2, dp_seed=1, lr=1e-3,
                ema_decay=0.5)
    base.update(kw)
    return TrainConfig(**base)


def test_train_checkpoint_resume_same_ledger(tmp_path):
    ds = _data()
    out = tmp_path / "run"
    tr = DPDMTrainer(_cfg(out, steps=6), dataset=ds)
    assert tr.config.noise_multiplier > 0
    led = tr.train(progress=False, max_steps=3)  # a run stopped early (resumed below)
    assert led.steps == 3 and led.checkpoint == "checkpoint-0000003"
    on_disk = json.loads((out / "ledger.json").read_text())
    assert on_disk["steps"] == 3 and on_disk["history"][0][2] == 3
    assert on_disk["dataset_fingerprint"] == ds.fingerprint()
    ck = out / "checkpoint-0000003"
    for f in ("backbone/config.json", "backbone/diffusion_pytorch_model.safetensors",
              "backbone_ema/diffusion_pytorch_model.safetensors", "denoiser.json",
              "trainer_state.pt", "ledger.json", "samples.png"):
        assert (ck / f).exists(), f
    eps3 = led.epsilon_spent
    w3 = {k: v.clone() for k, v in tr.denoiser.state_dict().items()}

    # a new run into the same folder must refuse: a ledger is never overwritten
    with pytest.raises(LedgerError):
        DPDMTrainer(_cfg(out, steps=6), dataset=ds)
    # resuming with other data must refuse
    with pytest.raises(LedgerError):
        DPDMTrainer.resume(str(out), dataset=_data(seed=5))

    tr2 = DPDMTrainer.resume(str(out), dataset=ds)
    assert tr2.step_count == 3 and tr2.ledger.steps == 3
    assert tr2.config.noise_multiplier == tr.config.noise_multiplier
    for k, v in tr2.denoiser.state_dict().items():
        assert torch.equal(v, w3[k]), k
    led2 = tr2.train(progress=False)
    assert led2.steps == 6 and led2.epsilon_spent > eps3
    assert led2.epsilon_spent <= 8.0
    assert led2.history == [[tr.config.noise_multiplier, tr.sample_rate, 6]]
    assert latest_checkpoint(str(out)).endswith("checkpoint-0000006")
    # a run folder names its latest checkpoint; a checkpoint (or any other folder) names itself
    ck6 = latest_checkpoint(str(out))
    assert is_checkpoint_dir(ck6) and not is_checkpoint_dir(str(out))
    assert resolve_checkpoint(str(out)) == ck6 and resolve_checkpoint(ck6) == ck6
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path)
    assert read_ledger(str(out)).steps == 6 and read_ledger(ck6).checkpoint_step == 6
    # the architecture alone, from the configs (what the parties without the weights build)
    bare = Denoiser.from_pretrained(ck6, with_weights=False)
    shapes = {k: v.shape for k, v in bare.state_dict().items()}
    assert shapes == {k: v.shape for k, v in tr2.ema.state_dict().items()}
    assert not all(torch.equal(a, b) for a, b in zip(bare.state_dict().values(),
                                                      tr2.ema.state_dict().values()))

    # EMA kept and saved, differs from the raw weights, and loads through from_pretrained
    ema = load_denoiser(latest_checkpoint(str(out)), ema=True)
    raw = load_denoiser(latest_checkpoint(str(out)), ema=False)
    assert isinstance(ema.backbone, DDPMppUNet)
    diff = sum(float((a - b).detach().abs().sum()) for a, b in
               zip(ema.parameters(), raw.parameters()))
    assert diff > 0
    for a, b in zip(raw.state_dict().values(), tr2.denoiser.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.state_dict().values(), tr2.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_run_stops_at_budget(tmp_path):
    ds = _data()
    cfg = _cfg(tmp_path / "b", steps=1000, noise_multiplier=0.8, epsilon=5.0, checkpoint_every=0,
               sample_grid=False)
    tr = DPDMTrainer(cfg, dataset=ds)
    allowed = tr.steps_left_in_budget()
    assert 0 < allowed < 30
    led = tr.train(progress=False)
    assert led.steps == allowed
    assert led.epsilon_spent <= 5.0
    assert led.compute_epsilon(1, 0.8, tr.sample_rate) > 5.0  # one more would pass the budget
    assert led.notes["stopped_by_budget"] is True
    with pytest.raises(BudgetExceeded):
        tr.train_step()
    assert PrivacyLedger.load(str(tmp_path / "b" / "ledger.json")).steps == allowed


def test_killed_run_keeps_ledger_and_never_undercounts(tmp_path):
    ds = _data()
    out = tmp_path / "k"
    tr = DPDMTrainer(_cfg(out, steps=10, checkpoint_every=2, sample_grid=False), dataset=ds)
    tr.train(progress=False, max_steps=2)
    tr.train_step()  # steps after the last checkpoint ...
    tr.train_step()  # ... then the process "dies" (no checkpoint)
    on_disk = PrivacyLedger.load(str(out / "ledger.json"))
    assert on_disk.steps == 4 and on_disk.checkpoint_step == 2
    tr2 = DPDMTrainer.resume(str(out), dataset=ds)
    assert tr2.step_count == 2  # weights from the checkpoint
    assert tr2.ledger.steps == 4  # but all 4 data accesses stay counted
    tr2.train(progress=False, max_steps=1)
    assert PrivacyLedger.load(str(out / "ledger.json")).steps == 5


def test_ledger_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ledger.json")
    led = PrivacyLedger(accountant="rdp", delta=1e-5, epsilon_budget=5.0, max_grad_norm=1.0,
                        noise_multiplicity=4, expected_batch_size=10, dataset_size=100,
                        dataset_fingerprint="sha256:x")
    led.record_steps(1.0, 0.1, 3)
    led.save(path)
    before = open(path).read()

    def boom(*a, **k):
        raise KeyboardInterrupt("killed while writing")

    led.record_steps(1.0, 0.1, 3)
    monkeypatch.setattr(files_mod.os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        led.save(path)
    monkeypatch.undo()
    assert open(path).read() == before
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []
    back = PrivacyLedger.load(path)
    assert back.steps == 3
    assert back.epsilon_spent == pytest.approx(back.compute_epsilon())
    # a tampered epsilon is recomputed from the history on load
    d = json.loads(before)
    d["epsilon_spent"] = 0.0
    with open(path, "w") as f:
        json.dump(d, f)
    assert PrivacyLedger.load(path).epsilon_spent > 0.1
    with open(path, "w") as f:
        f.write("{ torn")
    with pytest.raises(LedgerError):
        PrivacyLedger.load(path)


def test_diffusers_backbone_and_v_precond_train(tmp_path):
    from diffusers import UNet2DModel

    ds = _data(48)
    cfg = _cfg(tmp_path / "d", backbone="diffusers", precond="v", steps=2, checkpoint_every=0,
               sample_grid=True)
    tr = DPDMTrainer(cfg, dataset=ds)
    led = tr.train(progress=False)
    assert led.steps == 2 and torch.isfinite(torch.tensor(tr.last_loss))
    ck = latest_checkpoint(str(tmp_path / "d"))
    unet = UNet2DModel.from_pretrained(os.path.join(ck, "backbone_ema"), low_cpu_mem_usage=False)
    assert unet.config.num_class_embeds == 4
    den = load_denoiser(ck)
    assert den.precond.kind == "v"
    x = tr.sample(labels=[0, 1, 2], num_steps=2)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
