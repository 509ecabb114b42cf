"""DPDM's downstream protocol: classifiers trained on synthetic (image, label) pairs, tested on real data.

A generator is useful for private data release if a classifier trained only on its samples does well
on the real test set. DPDM (Dockhorn et al., 2022) reports three: logistic regression (784 -> 10),
an MLP (784 -> 100 -> 10) and a small CNN. ``downstream_accuracies`` trains each on the given
images and labels (Adam, a few epochs) and returns its accuracy on a real ``ImageDataset``.

``SmallCNN`` is also the architecture of the project's feature network (``feature_net``), whose
penultimate layer gives the classifier-feature FID.
"""

from __future__ import annotations

import math
import time
from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from cipherdm_torch.data import ImageDataset, from_uint8

__all__ = ["LogReg", "MLP", "SmallCNN", "CLASSIFIERS", "make_classifier", "train_classifier",
           "accuracy", "downstream_accuracies"]


class LogReg(nn.Module):
    """Multinomial logistic regression on flattened pixels (784 -> 10 on MNIST)."""

    def __init__(self, shape: Sequence[int], num_classes: int = 10):
        super().__init__()
        self.fc = nn.Linear(math.prod(shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    """One hidden layer of 100 ReLU units (784 -> 100 -> 10 on MNIST)."""

    def __init__(self, shape: Sequence[int], num_classes: int = 10, hidden: int = 100):
        super().__init__()
        self.fc1 = nn.Linear(math.prod(shape), hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class SmallCNN(nn.Module):
    """Two 3x3 conv layers (16, 32 channels) with 2x2 max pooling, a 128-unit layer, a linear head.

    About 210k parameters (mostly the 1568 -> 128 layer), ~1.2M multiply-adds per 28 x 28 image:
    cheap enough to train on a shared 2-core CPU, and ~96% test accuracy from 10k real images in
    2 epochs (a variant with a third conv layer and 3x3 average pooling reached only 92%).
    ``features(x)`` is the 128-d penultimate activation.
    """

    def __init__(self, shape: Sequence[int], num_classes: int = 10, width: int = 16, feat_dim: int = 128):
        super().__init__()
        c, h, w = shape
        self.conv1 = nn.Conv2d(c, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * (h // 4) * (w // 4), feat_dim)
        self.head = nn.Linear(feat_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


CLASSIFIERS = {"logreg": LogReg, "mlp": MLP, "cnn": SmallCNN}


def make_classifier(kind: str, shape: Sequence[int], num_classes: int = 10) -> nn.Module:
    if kind not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {kind!r}: choose from {sorted(CLASSIFIERS)}")
    return CLASSIFIERS[kind](tuple(shape), num_classes)


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int = 5,
                     batch_size: int = 64, lr: float = 1e-3, seed: int = 0, device: str = "cpu",
                     progress: Optional[str] = None) -> nn.Module:
    """Adam on cross-entropy, shuffled mini-batches; images uint8 or float in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    labels = torch.as_tensor(labels).long()
    n = len(images)
    steps = epochs * math.ceil(n / batch_size)
    bar = None
    if progress:
        bar = tqdm(total=steps, desc=progress, unit="step", leave=False)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            x = from_uint8(images[idx]).to(device)
            loss = F.cross_entropy(model(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000,
             device: str = "cpu") -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        pred = model(from_uint8(images[i:i + batch_size]).to(device)).argmax(1).cpu()
        correct += int((pred == torch.as_tensor(labels[i:i + batch_size])).sum())
    return correct / max(len(images), 1)


def downstream_accuracies(images: torch.Tensor, labels: torch.Tensor, test: ImageDataset,
                          kinds: Iterable[str] = ("logreg", "mlp", "cnn"), epochs: int = 5,
                          batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                          device: str = "cpu", progress: bool = True) -> Dict[str, dict]:
    """Train each classifier kind on (images, labels); accuracy on the real ``test`` ImageDataset.

    Returns ``{kind: {"accuracy": float, "seconds": float}}``.
    """
    if tuple(images.shape[1:]) != tuple(test.images.shape[1:]):
        raise ValueError(f"training images have shape {tuple(images.shape[1:])} but the test set "
                         f"{test.name!r} has {tuple(test.images.shape[1:])}")
    out = {}
    for k, kind in enumerate(kinds):
        t0 = time.perf_counter()
        torch.manual_seed(seed + k)  # initial weights
        model = make_classifier(kind, images.shape[1:], test.num_classes)
        train_classifier(model, images, labels, epochs=epochs, batch_size=batch_size, lr=lr,
                         seed=seed + k, device=device, progress=f"train {kind}" if progress else None)
        acc = accuracy(model, test.images, test.labels, device=device)
        out[kind] = {"accuracy": acc, "seconds": round(time.perf_counter() - t0, 2)}
    return out
