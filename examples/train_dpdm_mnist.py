"""Train a class-conditional MNIST diffusion model with DP-SGD (DPDM recipe, CPU-sized).

    python examples/train_dpdm_mnist.py --out runs/dpdm-mnist --epsilon 10 --steps 300

The privacy ledger (epsilon spent, delta, sigma, q, steps, K, C) is written next to the
checkpoints; run it again with the same --out to resume the same ledger.
"""

import argparse

from cipherdm_torch.training import DPDMTrainer, TrainConfig

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--out", default="runs/dpdm-mnist")
ap.add_argument("--epsilon", type=float, default=10.0)
ap.add_argument("--steps", type=int, default=300)
args = ap.parse_args()

config = TrainConfig(data="mnist", output_dir=args.out, epsilon=args.epsilon, delta=1e-5,
                     steps=args.steps, batch_size=256, noise_multiplicity=4, model_channels=16,
                     channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,),
                     max_physical_batch=256, dropout=0.0, checkpoint_every=100)
trainer = DPDMTrainer(config)
ledger = trainer.train()
print(f"epsilon spent {ledger.epsilon_spent:.3f} (delta {config.delta}); checkpoints in {args.out}")
