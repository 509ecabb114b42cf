"""One error path for every ``cipherdm`` command.

A known user error (:class:`UserError`, a bad argument, a missing file or data set, a ledger that
refuses, a failed party) is printed as ``error: <what, and what to do>`` on one line of stderr and
the command exits with status 2; the traceback is shown only with ``--debug`` (or
``CIPHERDM_DEBUG=1``). Anything else is a bug and keeps its traceback (exit 1).

The argument helpers here check numbers before anything runs: finite, in range, and a folder
argument that is not a file.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from typing import Callable, List, Optional

__all__ = ["UserError", "ArgumentParser", "finite_float", "positive_float", "nonnegative_float",
           "positive_int", "nonnegative_int", "open_unit_float", "check_out_dir", "run_main",
           "DEBUG_FLAG"]

DEBUG_FLAG = "--debug"


class UserError(ValueError):
    """A mistake in the user's input; the message says what is wrong and what to do."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one :class:`UserError` line (exit 2)."""

    def error(self, message: str) -> None:  # argparse's own: usage + message on two lines
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _number(kind: Callable, text: str, ok: Callable[[float], bool], what: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def finite_float(text: str) -> float:
    return _number(float, text, lambda v: True, "a finite number")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0, "a finite number > 0")


def nonnegative_float(text: str) -> float:
    return _number(float, text, lambda v: v >= 0, "a finite number >= 0")


def open_unit_float(text: str) -> float:
    return _number(float, text, lambda v: 0 < v < 1, "a number strictly between 0 and 1")


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v > 0, "an integer >= 1")


def nonnegative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def check_out_dir(path: str, option: str = "--out") -> str:
    """An output folder argument: refuse a path that exists and is not a folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{option} {path!r} is a file, not a folder: pass a folder path")
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise UserError(f"{option} {path!r}: {parent!r} is a file, not a folder")
    return path


def _known_errors() -> tuple:
    """Exception types that are the user's to fix (imported lazily: the CLI starts fast)."""
    known: List[type] = [UserError, FileNotFoundError, FileExistsError, NotADirectoryError,
                         IsADirectoryError, PermissionError]
    for module, names in (("cipherdm_torch.training.ledger", ("LedgerError", "BudgetExceeded")),
                          ("cipherdm_torch.mpc.runtime", ("PartyError",))):
        mod = sys.modules.get(module)  # only what the command actually imported can be raised
        if mod is not None:
            known += [getattr(mod, n) for n in names]
    return tuple(known)


def _one_line(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "PartyError":  # first line only: the parties' tracebacks are for --debug
        text = str(exc).splitlines()[0] if str(exc) else name
        text += " (rerun with --debug for the parties' tracebacks)"
    else:
        text = str(exc) or name
        if isinstance(exc, OSError) and exc.filename and exc.strerror:
            text = f"{exc.filename}: {exc.strerror}"
    return " ".join(text.split())


def run_main(main: Callable[[List[str]], Optional[int]], argv: List[str]) -> int:
    """Run a command's ``main(argv)`` behind the one error path; returns the exit status."""
    argv = list(argv)
    debug = DEBUG_FLAG in argv or os.environ.get("CIPHERDM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return main(argv) or 0
    except SystemExit as exc:  # argparse --help (0), or `raise SystemExit("message")`
        if isinstance(exc.code, str):
            if debug:
                traceback.print_exc()
            print(f"error: {' '.join(exc.code.split())}", file=sys.stderr)
            return 2
        return exc.code or 0
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, _known_errors()):
            raise
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
