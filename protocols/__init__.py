"""MPC protocols for diffusion UNets (imported as ``cipherdm_torch.protocols``)."""
