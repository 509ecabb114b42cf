"""Layer 2, applications of the secure model.

* :mod:`.secure` — DDPM / DDIM / EDM pipelines on secret shares and their plaintext twins.
* :mod:`.job` — the sampling job behind ``cipherdm sample`` / ``demo``: load and check a model,
  start the three parties, write the images and the cost report.
"""

from .secure import (SecureDDIMPipeline, SecureDDPMPipeline, SecureEDMPipeline, SecureSampleOutput,
                     model_output, plaintext_edm_sample, plaintext_scheduler_sample)

__all__ = ["SecureDDPMPipeline", "SecureDDIMPipeline", "SecureEDMPipeline", "SecureSampleOutput",
           "model_output", "plaintext_scheduler_sample", "plaintext_edm_sample"]
