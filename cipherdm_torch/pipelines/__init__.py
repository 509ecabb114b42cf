"""Layer 2, applications of the secure model.

* :mod:`.secure` — DDPM / DDIM / EDM pipelines on secret shares and their plaintext twins.
* :mod:`.job` — the sampling job behind ``cipherdm sample`` / ``demo``: load and check a model,
  start the three parties, write the images and the cost report.
"""
