"""Old name of :mod:`cipherdm_torch.diffusion.edm` (the loops are in :mod:`.sampling`).

Kept only for importers outside the diffusion room that have not switched yet
(``pipelines/secure.SecureEDMPipeline``, ``tools/record_activation_ranges.py``); remove it once
they import from ``cipherdm_torch.diffusion.edm``.
"""

from cipherdm_torch.diffusion.edm import *  # noqa: F401,F403
from cipherdm_torch.diffusion.edm import __all__  # noqa: F401
