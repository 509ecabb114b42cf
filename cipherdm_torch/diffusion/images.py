"""Image files of a model's samples: PNG grids.

The models work on images in [-1, 1]; data sets, sample files and PNGs hold uint8 pixels. The one
pair of conversions, :func:`cipherdm_torch.data.to_uint8` / :func:`~cipherdm_torch.data.from_uint8`,
lives in the data layer below this one (``ImageDataset`` needs it too).
"""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid

from cipherdm_torch.data import to_uint8
from cipherdm_torch.files import atomic_write_bytes

__all__ = ["save_image_grid", "GRID_PADDING"]

GRID_PADDING = 2  # black pixels around and between the images of a grid


def save_image_grid(images: torch.Tensor, path: str, nrow: int = 10) -> None:
    """Save (N, C, H, W) images (in [-1, 1], or uint8) as one PNG grid, ``nrow`` images per row.

    The grid is ``torchvision.utils.make_grid``'s (2 black pixels around every image, also for a
    single image); one channel is written as a grayscale PNG. The file is written atomically.
    """
    x = to_uint8(images.detach().cpu())
    c = x.shape[1]
    if x.shape[0] == 1:  # make_grid returns a single image without its border
        grid = F.pad(x[0], (GRID_PADDING,) * 4)
    else:  # make_grid repeats one channel three times: keep the first
        grid = make_grid(x, nrow=nrow, padding=GRID_PADDING, pad_value=0)[:c]
    arr = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
