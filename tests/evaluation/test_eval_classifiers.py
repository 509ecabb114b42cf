"""DPDM downstream classifiers: trained on real MNIST pairs they must reach sane test accuracy."""

import pytest
import torch

from cipherdm_torch.evaluation.classifiers import LogReg, MLP, SmallCNN, downstream_accuracies, make_classifier
from cipherdm_torch.data import load_mnist


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One thread trains these small models faster than two on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mnist():
    train = load_mnist("train").subset(4000, seed=0)
    test = load_mnist("test").subset(2000, seed=0)
    return train, test


def test_architectures():
    assert sum(p.numel() for p in LogReg((1, 28, 28)).parameters()) == 784 * 10 + 10
    assert sum(p.numel() for p in MLP((1, 28, 28)).parameters()) == 784 * 100 + 100 + 100 * 10 + 10
    cnn = SmallCNN((1, 28, 28))
    x = torch.zeros(3, 1, 28, 28)
    assert cnn(x).shape == (3, 10) and cnn.features(x).shape == (3, 128)
    with pytest.raises(ValueError):
        make_classifier("resnet", (1, 28, 28))


def test_downstream_linear_and_mlp_on_real_mnist(mnist):
    train, test = mnist
    res = downstream_accuracies(train.images, train.labels, test, kinds=("logreg", "mlp"), epochs=3,
                                progress=False)
    print({k: v["accuracy"] for k, v in res.items()})
    assert res["mlp"]["accuracy"] > 0.85
    assert res["logreg"]["accuracy"] > 0.80


def test_downstream_cnn_on_real_mnist(mnist):
    train, test = mnist
    res = downstream_accuracies(train.images, train.labels, test, kinds=("cnn",), epochs=4, progress=False)
    print({k: v["accuracy"] for k, v in res.items()})
    assert res["cnn"]["accuracy"] > 0.90


def test_downstream_on_shuffled_labels_is_chance(mnist):
    """Labels carry the signal: pairs with permuted labels must not beat chance by much."""
    train, test = mnist
    g = torch.Generator().manual_seed(0)
    labels = train.labels[torch.randperm(len(train), generator=g)]
    res = downstream_accuracies(train.images, labels, test, kinds=("logreg",), epochs=2, progress=False)
    assert res["logreg"]["accuracy"] < 0.25


def test_shape_mismatch_is_reported(mnist):
    _, test = mnist
    with pytest.raises(ValueError, match="shape"):
        downstream_accuracies(torch.zeros(4, 1, 32, 32, dtype=torch.uint8), torch.zeros(4), test,
                              progress=False)
