"""Fréchet distance between feature Gaussians (FID), with cached reference statistics.

FID(x, y) = |mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x S_y)^{1/2}) for the mean / covariance of a
feature extractor's outputs on two image sets. The matrix square root term is computed as
``sum sqrt(eig(A S_y A))`` with ``A = S_x^{1/2}`` (a symmetric PSD matrix, so ``eigh`` is stable
and never returns the complex parts an unsymmetric ``sqrtm`` can produce).

The feature extractor is any callable mapping a batch of images in [-1, 1] to (B, D) features:
``inception.InceptionFeatures`` (the FID-standard network) or ``feature_net.FeatureNet`` (an MNIST
classifier trained by the project). Reference statistics of a training set are cached on disk under
``cache_dir()`` keyed by extractor id and data set fingerprint, because extracting features of
60,000 images is the expensive part.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from cipherdm_torch.data import ImageDataset, from_uint8
from cipherdm_torch.files import atomic_write_bytes

__all__ = [
    "FeatureStats",
    "frechet_distance",
    "feature_stats",
    "fid_from_features",
    "independent_fid",
    "reference_stats",
    "cache_dir",
]

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class FeatureStats:
    """Mean and covariance (float64) of N feature vectors."""

    mu: np.ndarray
    cov: np.ndarray
    n: int

    @classmethod
    def from_features(cls, feats: np.ndarray) -> "FeatureStats":
        f = np.asarray(feats, dtype=np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
        return cls(f.mean(0), np.cov(f, rowvar=False), len(f))

    def save(self, path: str) -> None:
        """Write ``mu``, ``cov`` and ``n`` as an ``.npz`` file (atomically)."""
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, cov=self.cov, n=np.int64(self.n))
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str) -> "FeatureStats":
        with np.load(path) as z:
            return cls(z["mu"], z["cov"], int(z["n"]))


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray,
                     cov2: np.ndarray) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, cov {cov1.shape} vs {cov2.shape}")
    s1 = _psd_sqrt(cov1)
    cross = np.linalg.eigvalsh(s1 @ cov2 @ s1)
    tr_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)


def fid_from_features(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.cov, b.mu, b.cov)


def independent_fid(a: FeatureStats, b: FeatureStats):
    """The same distance by ``pytorch-fid``'s ``calculate_frechet_distance`` (scipy ``sqrtm``),
    so a report carries its own cross-check against the reference implementation: a float,
    None when pytorch-fid is not installed, or the error text when it refuses (its ``sqrtm``
    fails on the singular covariances of fewer samples than feature dimensions, where the
    symmetric ``eigh`` form above still gives the distance)."""
    try:
        from pytorch_fid.fid_score import calculate_frechet_distance  # optional dependency
    except ImportError:
        return None
    try:
        return float(calculate_frechet_distance(a.mu, a.cov, b.mu, b.cov))
    except (ValueError, np.linalg.LinAlgError) as exc:
        return f"pytorch-fid failed: {exc}"


@torch.no_grad()
def feature_stats(extract: FeatureFn, images: torch.Tensor, batch_size: int = 256,
                  progress: Optional[str] = None) -> FeatureStats:
    """Feature statistics of (N, C, H, W) images (uint8, or float in [-1, 1])."""
    feats = []
    it = range(0, len(images), batch_size)
    if progress:
        it = tqdm(it, desc=progress, unit="batch", leave=False)
    for i in it:
        feats.append(extract(from_uint8(images[i:i + batch_size])).double().cpu().numpy())
    return FeatureStats.from_features(np.concatenate(feats))


def cache_dir() -> str:
    """``$CIPHERDM_CACHE`` or ``~/.cache/cipherdm_torch``."""
    d = os.environ.get("CIPHERDM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cipherdm_torch")
    return os.path.join(d, "fid_stats")


def reference_stats(extract: FeatureFn, extractor_id: str, dataset: ImageDataset,
                    batch_size: int = 256, cache: bool = True,
                    progress: bool = True) -> FeatureStats:
    """Statistics of a reference ``ImageDataset`` (e.g. the training set), cached on disk.

    The cache key is ``extractor_id`` plus the data set's sha256 fingerprint, so a different
    network or different data never reuses stale statistics.
    """
    fp = dataset.fingerprint().split(":")[-1][:24]
    path = os.path.join(cache_dir(), f"{extractor_id}-{fp}.npz")
    if cache and os.path.exists(path):
        try:
            return FeatureStats.load(path)
        except Exception:  # a corrupt cache file is recomputed, never trusted
            pass
    stats = feature_stats(extract, dataset.images, batch_size,
                          progress=f"{extractor_id} stats of {dataset.name or 'reference'}" if progress else None)
    if cache:
        stats.save(path)
    return stats
