"""cipherdm-torch: private diffusion models (DP training + three-party secure sampling).

The package is layered; imports only point down this list (``tests/test_layers.py`` checks it):

1. :mod:`.cli` — the ``cipherdm`` command, one module per subcommand.
2. :mod:`.pipelines` (secure sampling pipelines, their plaintext twins, the sampling job) and
   :mod:`.evaluation` (FID, classifiers, reports).
3. :mod:`.compiler` (``torch.export`` graph -> encrypted module) and :mod:`.training` (DP-SGD;
   never imports CrypTen).
4. :mod:`.protocols` (MPC approximations; :mod:`.protocols.replicated` is the three-party
   replicated backend) and :mod:`.diffusion` (denoiser, backbones, samplers, checkpoints).
5. :mod:`.mpc` (parties, secure links, keyed randomness, cost meter, CrypTen compatibility),
   :mod:`.data`, :mod:`.files`, :mod:`.errors`.

Importing the package imports nothing heavy: the names below load on first use, and CrypTen
(with the compatibility fixes of :mod:`.mpc.crypten_compat`) only when MPC is first used.
"""

from __future__ import annotations

import importlib

from .mpc.crypten_compat import install_import_hook

install_import_hook()  # a user's own later ``import crypten`` gets the fixes too

__version__ = "0.1.0"

_EXPORTS = {
    "Cost": ".mpc.cost", "CostMeter": ".mpc.cost", "region": ".mpc.cost",
    "PartyError": ".mpc.runtime", "PartyInfo": ".mpc.runtime", "PartyPool": ".mpc.runtime",
    "Roles": ".mpc.runtime", "launch": ".mpc.runtime", "party": ".mpc.runtime",
    "UnsupportedOpsError": ".compiler.graph",
    "EncryptedModule": ".compiler.encrypted_module",
    "FixedPointRangeWarning": ".compiler.encrypted_module",
    "encrypt": ".compiler.encrypted_module", "reveal": ".compiler.encrypted_module",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
