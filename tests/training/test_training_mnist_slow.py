"""End to end on real MNIST (slow): train, checkpoint, resume with the same ledger, stop at budget."""

import pytest
import torch

from cipherdm_torch.data import load_dataset
from cipherdm_torch.training import DPDMTrainer, PrivacyLedger, TrainConfig

pytestmark = pytest.mark.slow


def test_mnist_short_run_resume_and_budget(tmp_path):
    torch.set_num_threads(1)
    ds = load_dataset("mnist").subset(3000, seed=0)
    out = tmp_path / "mnist"
    cfg = TrainConfig(output_dir=str(out), model_channels=8, channel_mult=(1, 2, 2),
                      num_res_blocks=1, attn_resolutions=(7,), dropout=0.0, batch_size=32,
                      noise_multiplicity=2, steps=8, epsilon=10.0, checkpoint_every=4,
                      sample_steps=4, lr=1e-3, dp_seed=0)
    tr = DPDMTrainer(cfg, dataset=ds)
    led = tr.train(progress=False, max_steps=4)
    assert led.steps == 4 and led.checkpoint == "checkpoint-0000004"
    assert (out / "checkpoint-0000004" / "samples.png").exists()
    tr2 = DPDMTrainer.resume(str(out), dataset=ds, steps=100)  # asks for more than the budget
    led2 = tr2.train(progress=False)
    assert led2.notes["stopped_by_budget"] is True
    assert led2.steps == 8  # sigma was set for 8 steps at epsilon 10: the budget ends there
    assert 9.9 < led2.epsilon_spent <= 10.0
    on_disk = PrivacyLedger.load(str(out / "ledger.json"))
    assert on_disk.steps == 8 and on_disk.checkpoint == "checkpoint-0000008"
    assert on_disk.dataset_fingerprint == ds.fingerprint()
