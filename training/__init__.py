"""Differentially private diffusion training, DPDM recipe (imported as ``cipherdm_torch.training``)."""
