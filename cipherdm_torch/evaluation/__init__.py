"""Layer 2, evaluation of generated images: downstream classifiers, FID, reports.

* :mod:`.classifiers` — LogReg / MLP / CNN trained on synthetic images, tested on real ones.
* :mod:`.feature_net` — the project's MNIST feature network (classifier-FID).
* :mod:`.inception` — the FID-standard InceptionV3 features.
* :mod:`.fid` — Fréchet distance and reference statistics.
* :mod:`.evaluate` — one report for a checkpoint or a file of images.
"""
