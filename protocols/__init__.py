"""MPC protocols for diffusion UNets (imported as ``cipherdm_torch.protocols``).

Two rooms of layer 4:

* the backend-independent approximations, written on CrypTen ``MPCTensor`` ops:
  :mod:`.functions` (the entry points, dispatching on :mod:`.config`), :mod:`.baseline`
  (CrypTen's methods), :mod:`.activations` / :mod:`.piecewise` / :mod:`.coefficients`,
  :mod:`.exp_softmax`, :mod:`.max_tree`, :mod:`.reciprocal`, :mod:`.normalization`,
  :mod:`.recorded_ranges`, and :mod:`.sharewise` (observers a backend registers for the
  compiler's share-wise ops). None of them imports a backend.
* :mod:`.replicated`: the three-party replicated backend, which plugs into CrypTen's
  dispatch (``crypten.cfg.mpc.protocol = "rss"``; selected with ``config.use(backend="rss")``).
"""
