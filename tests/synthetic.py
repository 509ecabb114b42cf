"""Test helper: a small synthetic labelled image set (8x8, 3 classes) for trainer tests."""

import torch

from cipherdm_torch.data import ImageDataset


def synthetic_images(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = (torch.rand(n, 1, 8, 8, generator=g) * 255).to(torch.uint8)
    return ImageDataset(imgs, torch.randint(0, 3, (n,), generator=g), 3, "synthetic")
