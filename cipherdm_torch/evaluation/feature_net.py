"""An MNIST classifier trained by the project, whose 128-d penultimate layer is an FID feature space.

The FID-standard InceptionV3 needs an optional 81 MB package and costs about a second per image on
a small CPU. A small CNN trained on the real training set (``classifiers.SmallCNN``, ~210k
parameters, ~98-99% test accuracy) gives an always-available, fast feature space in which FID still
ranks image sets by realism (tests: real test images score near 0, blurred / shuffled ones far
higher). Its numbers are not comparable with published Inception FIDs.

The MNIST network ships as ``cipherdm_torch/assets/mnist_feature_net.safetensors``; reproduce it
with::

    python -m cipherdm_torch.evaluation.feature_net --data mnist \\
        --out cipherdm_torch/assets/mnist_feature_net.safetensors

For any other data set, ``load_feature_net(name, train_set)`` trains one (same recipe) and caches it
under ``fid.cache_dir()``'s parent keyed by the data set fingerprint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import List, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from cipherdm_torch.data import ImageDataset, load_dataset
from cipherdm_torch.evaluation.classifiers import SmallCNN, accuracy, train_classifier
from cipherdm_torch.evaluation.fid import cache_dir
from cipherdm_torch.files import atomic_write_bytes

__all__ = ["FeatureNet", "train_feature_net", "save_feature_net", "read_feature_net",
           "load_feature_net", "main"]

RECIPE = {"epochs": 3, "batch_size": 128, "lr": 1e-3, "seed": 0}


def _asset_path() -> str:
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # cipherdm_torch/
    return os.path.join(package, "assets", "mnist_feature_net.safetensors")


class FeatureNet(torch.nn.Module):
    """Images in [-1, 1] -> (B, 128) penultimate features of a trained ``SmallCNN``."""

    def __init__(self, cnn: SmallCNN, meta: Optional[dict] = None):
        super().__init__()
        self.cnn = cnn.eval()
        self.meta = dict(meta or {})
        h = hashlib.sha256()
        for k, v in sorted(cnn.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        self.extractor_id = f"cnnfeat-{h.hexdigest()[:12]}"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cnn.features(x.float())


def train_feature_net(train_set: ImageDataset, test_set: Optional[ImageDataset] = None,
                      epochs: int = RECIPE["epochs"], batch_size: int = RECIPE["batch_size"],
                      lr: float = RECIPE["lr"], seed: int = RECIPE["seed"],
                      progress: bool = True) -> FeatureNet:
    """Train ``SmallCNN`` on a real training ``ImageDataset`` (Adam, cross-entropy)."""
    torch.manual_seed(seed)
    cnn = SmallCNN(train_set.shape, train_set.num_classes)
    t0 = time.perf_counter()
    train_classifier(cnn, train_set.images, train_set.labels, epochs=epochs, batch_size=batch_size,
                     lr=lr, seed=seed, progress="train feature net" if progress else None)
    meta = {
        "dataset": train_set.name,
        "dataset_fingerprint": train_set.fingerprint(),
        "shape": list(train_set.shape),
        "num_classes": train_set.num_classes,
        "recipe": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed},
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    if test_set is not None:
        meta["test_accuracy"] = accuracy(cnn, test_set.images, test_set.labels)
    return FeatureNet(cnn, meta)


def save_feature_net(net: FeatureNet, path: str) -> None:
    """Write the network's weights and its ``meta`` as one safetensors file (atomically)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in net.cnn.state_dict().items()}
    data = safetensors_bytes(sd, metadata={"meta": json.dumps(net.meta, sort_keys=True)})
    atomic_write_bytes(path, data, mode=0o644)  # package data: readable by every user


def read_feature_net(path: str) -> FeatureNet:
    """The feature net saved in ``path`` by :func:`save_feature_net`."""
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    if "shape" not in meta:
        raise ValueError(f"{path}: not a feature-net file (no shape in its metadata)")
    cnn = SmallCNN(meta["shape"], meta["num_classes"])
    cnn.load_state_dict(load_file(path))
    return FeatureNet(cnn, meta)


def load_feature_net(data: str = "mnist", train_set: Optional[ImageDataset] = None,
                     progress: bool = True) -> FeatureNet:
    """The feature net for the data set ``data``: the shipped asset for ``"mnist"``.

    Any other data set gets a network trained on ``train_set`` (its training split, loaded if not
    given) and cached by the data set's fingerprint.
    """
    if data.lower() == "mnist":
        return read_feature_net(_asset_path())
    if train_set is None:
        train_set = load_dataset(data, "train")
    fp = train_set.fingerprint().split(":")[-1][:24]
    path = os.path.join(os.path.dirname(cache_dir()), "feature_nets", f"{fp}.safetensors")
    if os.path.exists(path):
        return read_feature_net(path)
    net = train_feature_net(train_set, progress=progress)
    save_feature_net(net, path)
    return net


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cipherdm_torch.evaluation.feature_net",
                                description="train the classifier-feature FID network")
    p.add_argument("--data", default="mnist")
    p.add_argument("--out", default=None, help="safetensors file (default: the package asset)")
    p.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = load_dataset(args.data, "train"), load_dataset(args.data, "test")
    net = train_feature_net(train, test, epochs=args.epochs)
    out = args.out or _asset_path()
    save_feature_net(net, out)
    print(json.dumps({"out": out, "bytes": os.path.getsize(out), **net.meta}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
