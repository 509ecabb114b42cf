"""Evaluation of a generator: DPDM's downstream accuracies and FID against the training set.

``evaluate(generated, data)`` takes synthetic images + labels (an ``ImageDataset``) and returns a
JSON-ready report:

* ``accuracy``: Log Reg, MLP and small-CNN test accuracy on the real test split after training on
  the synthetic pairs (``classifiers``);
* ``fid_classifier``: FID in the feature space of the project's MNIST classifier (``feature_net``),
  always computed;
* ``*_pytorch_fid``: the same FID recomputed by pytorch-fid's ``calculate_frechet_distance`` on
  the same feature statistics when that package is installed (a cross-check), and
  ``*_images``: the generated and reference image counts and the reference split;
* ``fid_inception``: FID with the FID-standard InceptionV3 (``inception``), when its weights are
  installed and either a GPU is present or it is asked for (about a second per image on a CPU).

Both FIDs use the *training* split's statistics as reference (DPDM's protocol), cached on disk.
Generated images come from ``sample_checkpoint`` (the trainer's plaintext sampler) or
``load_generated`` (a .pt / .npz file or a folder).
"""

from __future__ import annotations

import os
import time
from typing import Iterable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from cipherdm_torch.data import ImageDataset, load_dataset, to_uint8
from cipherdm_torch.diffusion.denoiser import load_denoiser
from cipherdm_torch.diffusion.sampling import sample
from cipherdm_torch.errors import UserError
from cipherdm_torch.evaluation.classifiers import downstream_accuracies
from cipherdm_torch.evaluation.feature_net import load_feature_net
from cipherdm_torch.evaluation.fid import (feature_stats, fid_from_features, independent_fid,
                                           reference_stats)
from cipherdm_torch.evaluation.inception import InceptionFeatures, inception_available
from cipherdm_torch.training.ledger import read_ledger
from cipherdm_torch.training.trainer import resolve_checkpoint

__all__ = ["evaluate", "load_generated", "sample_checkpoint", "grid_by_class", "find_ledger"]


# ---------------------------------------------------------------------------- inputs
def load_generated(path: str, num_classes: Optional[int] = None) -> ImageDataset:
    """Generated (images, labels) from a ``.pt``/``.pth`` (dict with ``images``, ``labels``),
    a ``.npz`` (same keys) or a folder (IDX files or class sub-folders, see ``data.load_dataset``).

    Images may be uint8 in [0, 255] or float in [-1, 1]; (N, H, W) is read as one channel.
    """
    if os.path.isdir(path):
        for name in ("samples.pt", "samples.npz"):
            if os.path.isfile(os.path.join(path, name)):
                return load_generated(os.path.join(path, name), num_classes)
        ds = load_dataset(path, "train")
    else:
        if not os.path.isfile(path):
            raise UserError(f"{path} does not exist (give a .pt / .npz of images and labels, a "
                            f"folder of images, or a checkpoint folder)")
        try:
            if path.endswith(".npz"):
                with np.load(path) as z:
                    obj = {k: torch.from_numpy(z[k]) for k in z.files}
            elif path.endswith((".pt", ".pth")):
                obj = torch.load(path, map_location="cpu", weights_only=True)
            else:
                raise UserError(f"{path}: expected a .pt, .npz or a folder")
        except UserError:
            raise
        except Exception as exc:  # empty, truncated, garbage or unsafe pickle
            raise UserError(f"{path} cannot be read as a {os.path.splitext(path)[1]} file of "
                            f"images and labels ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:120]})") from None
        if not isinstance(obj, dict) or "images" not in obj or "labels" not in obj:
            raise UserError(f"{path}: needs 'images' and 'labels' entries")
        images = torch.as_tensor(obj["images"])
        labels = torch.as_tensor(obj["labels"])
        if images.ndim not in (3, 4) or images.shape[0] == 0:
            raise UserError(f"{path}: expected a non-empty batch of images (N, H, W) or "
                            f"(N, C, H, W), got shape {tuple(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise UserError(f"{path}: expected one label per image, got {tuple(labels.shape)} "
                            f"labels for {images.shape[0]} images")
        if labels.is_floating_point() or labels.dtype == torch.bool or int(labels.min()) < 0:
            raise UserError(f"{path}: labels must be integers >= 0")
        if images.dtype != torch.uint8:
            f = images.float()
            if not torch.isfinite(f).all():
                raise UserError(f"{path}: {int((~torch.isfinite(f)).sum())} pixel values are NaN "
                                f"or infinite")
            if f.min() < -1.01 or f.max() > 1.01:
                raise UserError(f"{path}: float images must lie in [-1, 1]")
            images = to_uint8(images)
        labels = labels.long()
        ds = ImageDataset(images, labels, int(labels.max()) + 1, os.path.basename(path))
    if num_classes is not None:
        ds.num_classes = num_classes
    return ds


def find_ledger(folder: str) -> Optional[dict]:
    """The privacy ledger (as a dict) of a checkpoint folder or its run folder, if any."""
    led = read_ledger(folder)
    return led.to_dict() if led is not None else None


def sample_checkpoint(folder: str, per_class: int = 100, method: str = "edm", num_steps: int = 18,
                      guidance: float = 1.0, batch_size: int = 250, seed: int = 0,
                      ema: bool = True, progress: bool = True, **sampler_kw) -> ImageDataset:
    """``per_class`` images of every class from a checkpoint (or run) folder, plaintext sampling."""
    folder = resolve_checkpoint(folder)
    den = load_denoiser(folder, ema=ema)
    k = den.num_classes
    if k <= 0:
        raise ValueError(f"{folder}: an unconditional model has no labels for downstream classifiers")
    labels = torch.arange(k).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(seed)
    out = []
    it = range(0, len(labels), batch_size)
    if progress:
        it = tqdm(it, desc=f"sample ({method}, {num_steps} steps)", unit="batch")
    for i in it:
        x = sample(den, labels[i:i + batch_size], method=method, num_steps=num_steps,
                   guidance=guidance, generator=g, **sampler_kw)
        out.append(to_uint8(x))
    return ImageDataset(torch.cat(out), labels, k, os.path.basename(folder.rstrip("/")))


def grid_by_class(ds: ImageDataset, per_class: int = 10) -> torch.Tensor:
    """Up to ``per_class`` images of each class, one class per row, as [-1, 1] floats."""
    rows = []
    for c in range(ds.num_classes):
        idx = (ds.labels == c).nonzero().flatten()[:per_class]
        x = ds.float_images(idx)
        if len(x) < per_class:
            x = torch.cat([x, -torch.ones((per_class - len(x),) + tuple(x.shape[1:]))])
        rows.append(x)
    return torch.cat(rows)


# ---------------------------------------------------------------------------- report
def evaluate(generated: ImageDataset, data: str = "mnist", classifiers: Iterable[str] = ("logreg", "mlp", "cnn"),
             epochs: int = 5, fid_classifier: bool = True, inception: Optional[bool] = None,
             inception_max: Optional[int] = None, inception_ref_max: Optional[int] = None,
             device: Optional[str] = None, seed: int = 0, progress: bool = True,
             train_set: Optional[ImageDataset] = None, test_set: Optional[ImageDataset] = None) -> dict:
    """Downstream accuracies and FIDs of ``generated`` against the real data set ``data``.

    ``inception``: True forces FID-Inception, False skips it, None runs it when installed and a GPU
    is present. ``inception_max`` / ``inception_ref_max`` cap the generated / reference images
    it uses (fixed-seed subsets, stated in the report).
    """
    t_all = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    train = train_set if train_set is not None else load_dataset(data, "train")
    test = test_set if test_set is not None else load_dataset(data, "test")
    if tuple(generated.shape) != tuple(train.shape):
        raise ValueError(f"generated images have shape {generated.shape}, {data} has {train.shape}")
    counts = torch.bincount(generated.labels, minlength=train.num_classes)
    report = {
        "data": data,
        "num_samples": len(generated),
        "per_class": counts.tolist(),
        "device": device,
        "seconds": {},
    }
    classifiers = list(classifiers)
    if classifiers:
        t0 = time.perf_counter()
        downstream = downstream_accuracies(generated.images, generated.labels, test, kinds=classifiers,
                                           epochs=epochs, seed=seed, device=device, progress=progress)
        acc = {k: v["accuracy"] for k, v in downstream.items()}
        report["accuracy"] = acc
        report["classifier_epochs"] = epochs
        report["seconds"]["classifiers"] = round(time.perf_counter() - t0, 1)

    if fid_classifier:
        t0 = time.perf_counter()
        net = load_feature_net(data, train, progress=progress).to(device)
        dev_fn = lambda x: net(x.to(device))  # noqa: E731
        ref = reference_stats(dev_fn, net.extractor_id, train, progress=progress)
        gen = feature_stats(dev_fn, generated.images, progress="classifier features" if progress else None)
        report["fid_classifier"] = fid_from_features(gen, ref)
        report["fid_classifier_pytorch_fid"] = independent_fid(gen, ref)
        report["fid_classifier_images"] = {"generated": gen.n, "reference": ref.n,
                                           "reference_split": "train"}
        report["fid_classifier_net"] = {"id": net.extractor_id,
                                        "test_accuracy": net.meta.get("test_accuracy")}
        report["seconds"]["fid_classifier"] = round(time.perf_counter() - t0, 1)

    run_inc = inception if inception is not None else (inception_available() and device != "cpu")
    if run_inc:
        t0 = time.perf_counter()
        inc = InceptionFeatures().to(device)
        dev_fn = lambda x: inc(x.to(device))  # noqa: E731
        ref_ds = train if not inception_ref_max or inception_ref_max >= len(train) else train.subset(inception_ref_max, seed)
        gen_ds = generated if not inception_max or inception_max >= len(generated) else generated.subset(inception_max, seed)
        bs = 64 if device != "cpu" else 16
        ref = reference_stats(dev_fn, InceptionFeatures.extractor_id, ref_ds, batch_size=bs, progress=progress)
        gen = feature_stats(dev_fn, gen_ds.images, batch_size=bs, progress="inception features" if progress else None)
        report["fid_inception"] = fid_from_features(gen, ref)
        report["fid_inception_pytorch_fid"] = independent_fid(gen, ref)
        report["fid_inception_images"] = {"generated": len(gen_ds), "reference": len(ref_ds),
                                          "reference_split": "train"}
        report["seconds"]["fid_inception"] = round(time.perf_counter() - t0, 1)
    else:
        report["fid_inception"] = None
        report["fid_inception_note"] = (
            "not installed: pip install 'cipherdm-torch[eval]'" if not inception_available()
            else "skipped on CPU (about 1 s per image); pass --inception to force")
    report["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
    return report
