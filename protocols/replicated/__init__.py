"""The dealer-free three-party replicated secret sharing backend for CrypTen (``"rss"``).

* :mod:`.arith` — replicated shares, products, exact truncation, the replica rule.
* :mod:`.binary` — boolean shares and adders for comparisons.
* :mod:`.compare` — less-than / ReLU / max on replicated shares.
* :mod:`.backend` — the only place that patches CrypTen: :func:`~.backend.install`
  (with a CrypTen version check) and :func:`~.backend.uninstall`, plus the switches.
"""

from .backend import disable, enable, install, is_active, replicated_backend, uninstall

__all__ = ["install", "uninstall", "enable", "disable", "is_active", "replicated_backend"]
