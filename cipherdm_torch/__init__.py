"""cipherdm-torch: private diffusion models (DP training + three-party secure sampling).

Importing this package applies the CrypTen compatibility layer
(:mod:`cipherdm_torch.crypten_compat`) so that ``import crypten`` works on
current PyTorch.
"""

from . import crypten_compat  # noqa: F401  (must run before anything imports crypten)
from .cost import Cost, CostMeter, region
from .runtime import PartyError, PartyInfo, PartyPool, Roles, launch, party
from .graph import UnsupportedOpsError
from .encrypt import EncryptedModule, FixedPointRangeWarning, encrypt, reveal  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Cost", "CostMeter", "region", "PartyError", "PartyInfo", "PartyPool", "Roles",
           "launch", "party", "__version__",
           "encrypt", "EncryptedModule", "reveal", "UnsupportedOpsError", "FixedPointRangeWarning"]
