"""The ``cipherdm`` command: one subcommand per job, each implemented in its own module."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with a ``main(argv)``, one-line help)
COMMANDS = {
    "demo": ("cipherdm_torch.demo", "three-party demo: share a tensor, compute, reveal, show costs"),
    "sample": ("cipherdm_torch.secure_sample", "securely sample images from a model with three parties"),
    "train": ("cipherdm_torch.training.cli", "train a diffusion model with DP-SGD (DPDM)"),
    "eval": ("cipherdm_torch.training.eval_cli", "evaluate a trained model: downstream accuracy, FID"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: cipherdm <command> [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<8} {help_text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command: {argv[0]}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
