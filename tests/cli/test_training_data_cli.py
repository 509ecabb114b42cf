"""Offline data sets (MNIST zarr, IDX, ImageFolder, missing data) and the training CLI."""

import gzip
import json
import os
import struct

import numpy as np
import pytest
import torch

from cipherdm_torch import cli
from cipherdm_torch import data as data_mod
from cipherdm_torch.data import DatasetMissing, load_dataset, read_idx

torch.set_num_threads(1)


def _write_idx(path, arr, gz=False):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(head + arr.tobytes())


def _idx_dir(folder, n=64, res=8, gz=False):
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    imgs = rng.integers(0, 256, (n, res, res), dtype=np.uint8)
    labs = rng.integers(0, 4, n, dtype=np.uint8)
    sfx = ".gz" if gz else ""
    _write_idx(os.path.join(folder, "train-images-idx3-ubyte" + sfx), imgs, gz)
    _write_idx(os.path.join(folder, "train-labels-idx1-ubyte" + sfx), labs, gz)
    return imgs, labs


def test_mnist_offline():
    ds = load_dataset("mnist")
    assert len(ds) == 60000 and ds.shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.images.dtype == torch.uint8
    assert torch.bincount(ds.labels).tolist()[:2] == [5923, 6742]  # canonical MNIST counts
    x = ds.float_images(torch.arange(4))
    assert x.min() >= -1 and x.max() <= 1
    test = load_dataset("mnist", split="test")
    assert len(test) == 10000
    assert ds.fingerprint() == load_dataset("mnist").fingerprint() != test.fingerprint()


@pytest.mark.parametrize("gz", [False, True])
def test_idx_dir_and_torchvision_layout(tmp_path, gz):
    imgs, labs = _idx_dir(str(tmp_path / "flat"), gz=gz)
    ds = load_dataset(str(tmp_path / "flat"))
    assert np.array_equal(ds.images[:, 0].numpy(), imgs)
    assert np.array_equal(ds.labels.numpy(), labs)
    # torchvision layout: <root>/<Name>/raw/*-idx*-ubyte
    _idx_dir(str(tmp_path / "tv" / "FashionMNIST" / "raw"), gz=gz)
    assert len(load_dataset(str(tmp_path / "tv"))) == 64
    assert read_idx(os.path.join(tmp_path / "flat", "train-labels-idx1-ubyte" + (".gz" if gz else ""))).shape == (64,)


def test_image_folder(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        os.makedirs(tmp_path / "imgs" / c)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    ds = load_dataset(str(tmp_path / "imgs"))
    assert len(ds) == 6 and ds.num_classes == 2 and ds.shape == (1, 8, 8)
    assert sorted(ds.labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_missing_data_sets_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "FASHION_MNIST_DIR", str(tmp_path / "nope"))
    with pytest.raises(DatasetMissing, match="apt-get install dataset-fashion-mnist"):
        data_mod.load_fashion_mnist(folder=str(tmp_path / "nope"))
    with pytest.raises(DatasetMissing, match="unknown data set"):
        load_dataset("cifar-typo")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DatasetMissing):
        load_dataset(str(tmp_path / "empty"))


def test_cli_account(capsys):
    assert cli.main(["account", "--epsilon", "10", "--batch-size", "4000", "--n", "60000",
                     "--epochs", "300", "--check"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 4500
    assert out["sigma"] == pytest.approx(2.488, abs=0.01)
    assert out["dp_accounting_rdp"] == pytest.approx(out["epsilon"], rel=1e-3)


def test_cli_train_resume_sample(tmp_path, capsys):
    _idx_dir(str(tmp_path / "data"), n=48)
    out = str(tmp_path / "run")
    common = ["--channels", "8", "--mults", "1,2", "--res-blocks", "1", "--attn", "4",
              "--dropout", "0", "--batch-size", "8", "-K", "2", "--sample-steps", "2",
              "--no-progress"]
    assert cli.main(["train", "--data", str(tmp_path / "data"), "--out", out, "--steps", "3",
                     "--epsilon", "6", "--checkpoint-every", "2", "--max-steps", "2"] + common) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["steps"] == 2 and first["epsilon_spent"] <= 6
    assert cli.main(["train", "--resume", out] + common) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["steps"] == 3 and second["epsilon_spent"] > first["epsilon_spent"]
    assert second["epsilon_spent"] <= 6
    png = str(tmp_path / "plain" / "samples.png")  # a run folder samples its latest checkpoint
    assert cli.main(["sample", "--plaintext", "--model", out, "--out", str(tmp_path / "plain"),
                     "--labels", "0,1,2,3,0,1,2,3", "--sampler", "edm", "--steps", "2",
                     "--guidance", "2"]) == 0
    from PIL import Image

    im = Image.open(png)
    assert im.size == (2 + 8 * 10, 2 + 1 * 10)  # 8 images of 8x8 in one row, 2-pixel borders
