"""Layer 3, the compiler: a PyTorch model -> an encrypted module that runs on secret shares.

* :mod:`.graph` — ``torch.export`` of the model into an ATen graph; unsupported ops listed by
  name.
* :mod:`.ops` — the ATen op -> secret-share implementation registry, one module per kind of op.
* :mod:`.encrypted_module` — :func:`encrypt` / :class:`EncryptedModule` / :func:`reveal`.
"""

from .encrypted_module import EncryptedModule, FixedPointRangeWarning, encrypt, reveal
from .graph import UnsupportedOpsError

__all__ = ["encrypt", "EncryptedModule", "reveal", "UnsupportedOpsError", "FixedPointRangeWarning"]
