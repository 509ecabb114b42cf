"""CrypTen must import and run its MPC runtime on this PyTorch (via cipherdm_torch.mpc.crypten_compat)."""

import subprocess
import sys

import pytest
import torch

import cipherdm_torch  # noqa: F401  (applies the compatibility layer)
import crypten
import crypten.communicator as comm


def test_import_crypten_in_fresh_interpreter():
    # A fresh interpreter: importing cipherdm_torch alone must make crypten importable.
    code = "import cipherdm_torch, crypten, crypten.mpc, crypten.nn; print(crypten.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "crypten"


def _crypten_ops(x, y, w, img, kernel):
    """Representative CrypTen operations, evaluated on shares and revealed."""
    rank = comm.get().get_rank()
    ex, ey = crypten.cryptensor(x, src=0), crypten.cryptensor(y, src=1)
    ew, eimg = crypten.cryptensor(w, src=0), crypten.cryptensor(img, src=1)
    ek = crypten.cryptensor(kernel, src=0)
    out = {
        "share_differs": not torch.equal(ex.share, crypten.mpc.MPCTensor(x).encoder.encode(x)),
        "reveal": ex.get_plain_text(),
        "add": (ex + ey).get_plain_text(),
        "mul": (ex * ey).get_plain_text(),
        "matmul": (ex.unsqueeze(0) @ ew).get_plain_text(),
        "conv2d": eimg.conv2d(ek, padding=1).get_plain_text(),
        "lt": (ex < ey).get_plain_text(),
        "relu": ex.relu().get_plain_text(),
        "max": ex.max().get_plain_text(),
        "softmax": ex.softmax(0).get_plain_text(),
    }
    out["rank"] = rank
    return out


@pytest.mark.parametrize("protocol", ["beaver", "replicated"])
def test_crypten_ops_match_plaintext(parties, protocol):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, generator=g) * 3, torch.randn(16, generator=g) * 3
    w = torch.randn(16, 8, generator=g)
    img, kernel = torch.randn(1, 2, 6, 6, generator=g), torch.randn(3, 2, 3, 3, generator=g)
    results = parties.run(_with_protocol, protocol, x, y, w, img, kernel)
    for rank, r in enumerate(results):
        assert r["rank"] == rank
        assert r["share_differs"]
        torch.testing.assert_close(r["reveal"], x, atol=1e-4, rtol=0)
        torch.testing.assert_close(r["add"], x + y, atol=1e-4, rtol=0)
        torch.testing.assert_close(r["mul"], x * y, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(r["matmul"], x.unsqueeze(0) @ w, atol=5e-3, rtol=1e-3)
        torch.testing.assert_close(r["conv2d"], torch.conv2d(img, kernel, padding=1),
                                   atol=5e-3, rtol=1e-3)
        assert torch.equal(r["lt"], (x < y).float())
        torch.testing.assert_close(r["relu"], x.relu(), atol=1e-4, rtol=0)
        torch.testing.assert_close(r["max"], x.max(), atol=1e-4, rtol=0)
        torch.testing.assert_close(r["softmax"], x.softmax(0), atol=2e-2, rtol=0)


def _with_protocol(protocol, *args):
    with crypten.cfg.temp_override({"mpc.protocol": protocol}):
        return _crypten_ops(*args)


def test_decode_is_exact_for_negative_values():
    from crypten.encoder import FixedPointEncoder

    enc = FixedPointEncoder()  # 16 fractional bits
    raw = torch.tensor([-851967, -65536000000, -1, 0, 1, -65537, 2 ** 40 + 5, -(2 ** 40) - 5])
    expected = raw.double() / 65536  # CrypTen 0.4.1 gave -13.99998 for -851967 and -1000015 for 1e6
    torch.testing.assert_close(enc.decode(raw).double(), expected, atol=1e-4, rtol=0)
