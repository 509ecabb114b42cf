"""``cipherdm eval``: inputs (checkpoint, .pt, .npz), the JSON report and the sample grid."""

import json

import numpy as np
import pytest
import torch

from cipherdm_torch import cli
from cipherdm_torch.data import to_uint8
from cipherdm_torch.evaluation.evaluate import grid_by_class, load_generated


pytestmark = pytest.mark.usefixtures("private_cache")


def test_load_generated_formats(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, 1, 28, 28, generator=g) * 2 - 1
    y = torch.arange(20) % 10
    torch.save({"images": x, "labels": y}, tmp_path / "f.pt")
    np.savez(tmp_path / "u.npz", images=to_uint8(x).numpy(), labels=y.numpy())
    a, b = load_generated(str(tmp_path / "f.pt")), load_generated(str(tmp_path / "u.npz"))
    assert a.images.dtype == torch.uint8 and a.shape == (1, 28, 28) and a.num_classes == 10
    torch.testing.assert_close(a.images, b.images)
    torch.testing.assert_close(a.labels, y)
    torch.save({"images": x * 3, "labels": y}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        load_generated(str(tmp_path / "bad.pt"))
    torch.save({"images": x}, tmp_path / "nolabels.pt")
    with pytest.raises(ValueError, match="labels"):
        load_generated(str(tmp_path / "nolabels.pt"))
    grid = grid_by_class(a, per_class=3)
    assert grid.shape == (30, 1, 28, 28)
    assert torch.equal(to_uint8(grid[3 * 7]), a.images[7])  # first image of class 7 starts row 7


def test_cli_on_real_images(tmp_path, monkeypatch):
    """Real train digits as 'generated' samples: sane accuracies, small classifier FID."""
    from cipherdm_torch.evaluation import evaluate as ev
    from cipherdm_torch.data import load_mnist

    # smaller real splits keep the test fast (reference statistics of 5000, not 60000, images)
    small = {"train": load_mnist("train").subset(5000, seed=3), "test": load_mnist("test").subset(2000, seed=3)}
    monkeypatch.setattr(ev, "load_dataset", lambda spec, split: small[split])
    gen = load_mnist("train").subset(3000, seed=2)
    torch.save({"images": gen.images, "labels": gen.labels}, tmp_path / "real.pt")
    out = tmp_path / "ev"
    rc = cli.main(["eval", str(tmp_path / "real.pt"), "--out", str(out), "--classifiers", "logreg,mlp",
                        "--epochs", "3", "--no-inception", "--quiet"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    print(rep)
    assert rep["num_samples"] == 3000 and sum(rep["per_class"]) == 3000
    assert rep["accuracy"]["logreg"] > 0.80 and rep["accuracy"]["mlp"] > 0.80
    assert 0 <= rep["fid_classifier"] < 3.0
    assert rep["fid_inception"] is None and "fid_inception_note" in rep
    from PIL import Image

    im = Image.open(out / "grid.png")
    assert im.size == (10 * 30 + 2, 10 * 30 + 2)


def test_cli_from_checkpoint(tmp_path):
    """A (random, untrained) checkpoint is sampled per class and evaluated end to end."""
    from cipherdm_torch.diffusion.denoiser import save_denoiser
    from cipherdm_torch.training.trainer import TrainConfig, build_denoiser

    cfg = TrainConfig(model_channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=())
    torch.manual_seed(0)
    den = build_denoiser(cfg, (1, 28, 28), 10)
    ck = tmp_path / "ck"
    save_denoiser(den, str(ck))
    out = tmp_path / "ev"
    rc = cli.main(["eval", str(ck), "--per-class", "3", "--steps", "2", "--out", str(out),
                        "--classifiers", "logreg", "--epochs", "1", "--no-fid-classifier",
                        "--no-inception", "--quiet", "--save-samples"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["num_samples"] == 30 and rep["per_class"] == [3] * 10
    assert rep["source"]["kind"] == "checkpoint" and rep["source"]["sampler"]["steps"] == 2
    assert 0.0 <= rep["accuracy"]["logreg"] <= 1.0
    s = torch.load(out / "samples.pt")
    assert s["images"].shape == (30, 1, 28, 28) and s["images"].dtype == torch.uint8
    assert (out / "grid.png").exists()


def test_cli_usage_errors(tmp_path):

    assert cli.main(["eval"]) == 2  # the commands' one error path: exit 2
    assert cli.main(["eval", str(tmp_path / "missing.pt")]) == 2


# ------------------------------------------------------------------ images: same pixels as before
def _reference_save_image_grid(images, path, nrow=10):
    """The hand-made grid that ``diffusion.images.save_image_grid`` replaced (frozen here)."""
    from PIL import Image

    x = ((images.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    grid = torch.zeros((c, nrows * (h + 2) + 2, ncol * (w + 2) + 2), dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, 2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + q * (w + 2): 2 + q * (w + 2) + w] = x[i]
    arr = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(arr)).save(path)


@pytest.mark.parametrize("n,c,nrow", [(1, 1, 10), (7, 1, 3), (25, 1, 10), (10, 1, 1), (5, 3, 2)])
def test_image_grid_same_pixels_as_before(tmp_path, n, c, nrow):
    from PIL import Image

    from cipherdm_torch.diffusion.images import save_image_grid

    g = torch.Generator().manual_seed(n)
    x = torch.rand(n, c, 6, 5, generator=g) * 2.4 - 1.2  # some values outside [-1, 1]
    x[0, 0, 0, :3] = torch.tensor([-1.0, 1.0, 0.0])
    _reference_save_image_grid(x, tmp_path / "old.png", nrow)
    save_image_grid(x, str(tmp_path / "new.png"), nrow)
    old, new = Image.open(tmp_path / "old.png"), Image.open(tmp_path / "new.png")
    assert new.mode == old.mode and new.size == old.size
    assert np.array_equal(np.asarray(new), np.asarray(old))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_uint8_conversions_match_the_old_expressions():
    from cipherdm_torch.data import from_uint8

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 5, 5, generator=g) * 2.2 - 1.1
    assert torch.equal(to_uint8(x), ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(from_uint8(u), u.float() / 127.5 - 1.0)
    assert torch.equal(to_uint8(from_uint8(u)), u) and to_uint8(u) is u
    assert torch.equal(from_uint8(x), x)
