"""Layer 1, the ``cipherdm`` command: one argparse tree, one module per subcommand.

Each subcommand module ``cipherdm_torch.cli.<name>`` defines ``HELP`` (one line), ``configure(parser)``
(its options) and ``run(args, argv) -> int``. Only the module of the command being run is
imported (``cipherdm train`` never loads CrypTen, ``cipherdm keys`` never loads diffusers); ``cipherdm
--help`` imports them all. Every command goes through :func:`cipherdm_torch.errors.run_main`: a
user error prints one ``error: ...`` line and exits 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional, Sequence

from cipherdm_torch.errors import DEBUG_FLAG, ArgumentParser, UserError, run_main

COMMANDS = ("demo", "sample", "train", "account", "eval", "bench", "keys")
__all__ = ["COMMANDS", "build_parser", "main"]


def build_parser(commands: Sequence[str] = COMMANDS) -> argparse.ArgumentParser:
    """The ``cipherdm`` parser with a subparser for each of ``commands``."""
    parser = ArgumentParser(prog="cipherdm", allow_abbrev=False,
                            description="Private diffusion models: DP-SGD training and "
                                        "three-party secure sampling.",
                            epilog=f"{DEBUG_FLAG} (any command): show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>",
                                parser_class=ArgumentParser)
    for name in commands:
        # the subcommand's own imports (CrypTen, diffusers, Opacus) load only when it is used
        module = importlib.import_module(f"{__name__}.{name}")
        cmd = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             allow_abbrev=False)
        module.configure(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def _dispatch(argv: List[str]) -> int:
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        raise UserError(f"unknown command {argv[0]!r}: use one of {', '.join(COMMANDS)} "
                        f"(cipherdm --help)")
    chosen = [argv[0]] if argv and argv[0] in COMMANDS else COMMANDS
    args = build_parser(chosen).parse_args(argv)
    return args._run(args, argv[1:])


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``cipherdm`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        build_parser().print_help()
        return 0
    return run_main(_dispatch, argv)

