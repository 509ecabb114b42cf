"""The backend-independent layers import no backend: the approximations in ``protocols`` and
the compiler's op registry load without ``protocols.replicated`` (a backend hooks in through
CrypTen's dispatch and :mod:`cipherdm_torch.protocols.sharewise`, never the other way round)."""

import subprocess
import sys

APPROXIMATIONS = ["activations", "baseline", "coefficients", "config", "exp_softmax", "functions",
                  "max_tree", "normalization", "piecewise", "reciprocal", "recorded_ranges",
                  "sharewise", "side_by_side"]
MODULES = [f"cipherdm_torch.protocols.{m}" for m in APPROXIMATIONS] + [
    "cipherdm_torch.compiler.ops", "cipherdm_torch.compiler"]


def test_approximations_and_compiler_import_no_backend():
    # one fresh interpreter for all: if their union loads no backend module, none of them does
    code = ("import importlib, sys\n"
            f"for name in {MODULES!r}:\n"
            "    importlib.import_module(name)\n"
            "    loaded = [m for m in sys.modules\n"
            "              if m.startswith('cipherdm_torch.protocols.replicated')]\n"
            "    assert not loaded, (name, loaded)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
