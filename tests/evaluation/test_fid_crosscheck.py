"""The project's FID against independent computations on the same features."""

import numpy as np
import pytest

from cipherdm_torch.evaluation.fid import FeatureStats, fid_from_features, independent_fid

pytest.importorskip("pytorch_fid")


def _stats(rng, n, d, shift=0.0):
    f = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.1 + shift
    return FeatureStats.from_features(f)


def test_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(50), rng.standard_normal(50)
    v1, v2 = rng.uniform(0.1, 3, 50), rng.uniform(0.1, 3, 50)
    a, b = FeatureStats(mu1, np.diag(v1), 10), FeatureStats(mu2, np.diag(v2), 10)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert fid_from_features(a, b) == pytest.approx(exact, rel=1e-10)
    assert independent_fid(a, b) == pytest.approx(exact, rel=1e-10)


@pytest.mark.parametrize("n,d", [(4000, 64), (300, 512)])  # full rank; fewer samples than dims
def test_matches_pytorch_fid(n, d):
    rng = np.random.default_rng(n)
    a, b = _stats(rng, n, d), _stats(rng, n, d, shift=0.05)
    ours, theirs = fid_from_features(a, b), independent_fid(a, b)
    assert isinstance(theirs, float)
    assert abs(ours - theirs) / theirs < 1e-6, (ours, theirs)


def test_singular_case_where_sqrtm_gives_up():
    # fewer samples than dimensions, as with 1,000 samples of 2,048-D Inception features
    # (there pytorch-fid's sqrtm leaves an imaginary part and refuses): the eigh form agrees
    # with the eigenvalues of S1 S2
    rng = np.random.default_rng(7)
    a, b = _stats(rng, 300, 640), _stats(rng, 300, 640, shift=0.05)
    ours = fid_from_features(a, b)
    ev = np.linalg.eigvals(a.cov @ b.cov)
    tr_sqrt = np.sqrt(np.clip(ev.real, 0, None)).sum()
    diff = a.mu - b.mu
    other = diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2 * tr_sqrt
    assert abs(ours - other) / other < 1e-4, (ours, other)
    theirs = independent_fid(a, b)
    assert isinstance(theirs, float) or theirs.startswith("pytorch-fid failed")
