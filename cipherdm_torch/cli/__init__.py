"""The ``cipherdm`` command: one subcommand per job, each implemented in its own module."""

from __future__ import annotations

import importlib
import sys

from cipherdm_torch.errors import DEBUG_FLAG, run_main

# subcommand -> (module with a ``main(argv)``, arguments put before the user's, one-line help)
COMMANDS = {
    "demo": ("cipherdm_torch.cli.demo", [],
             "end-to-end demo: three parties securely sample digits from the embedded DP model"),
    "sample": ("cipherdm_torch.pipelines.job", [],
               "securely sample images from a model with three parties"),
    "train": ("cipherdm_torch.cli.train", ["train"],
              "train a diffusion model with DP-SGD (DPDM)"),
    "eval": ("cipherdm_torch.cli.eval", [],
             "evaluate a trained model: downstream accuracy, FID"),
    "keys": ("cipherdm_torch.mpc.identity", [],
             "create the parties' TLS identities (one key and pinned certificate per party)"),
    "account": ("cipherdm_torch.cli.train", ["account"],
                "noise multiplier for (epsilon, delta), or epsilon for a noise multiplier"),
    "bench": ("cipherdm_torch.cli.train", ["bench"],
              "DP-SGD step vs non-private step: time and peak memory for several K"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if DEBUG_FLAG in argv[:1]:  # `cipherdm --debug sample ...` as well as `... sample --debug`
        argv = argv[1:] + [DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: cipherdm <command> [options]   (cipherdm <command> --help for its options)"
              "\n\ncommands:")
        for name, (_, _, help_text) in COMMANDS.items():
            print(f"  {name:<8} {help_text}")
        print(f"\n{DEBUG_FLAG} (any command): show the traceback of an error")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}: use one of {', '.join(COMMANDS)}",
                  file=sys.stderr)
            return 2
        return 0
    module_name, prefix, _ = COMMANDS[argv[0]]

    def command(args):
        return importlib.import_module(module_name).main(prefix + args)

    return run_main(command, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
