"""The code paths of ``--device cuda`` on the CPU (no GPU here): products that travel to
another device and back, and links that stage every tensor through a host buffer. Three
parties, replicated backend: the same values, bytes and rounds as the plain CPU run, and every
offloaded ring product equal bit for bit to torch's int64 kernel. (On a GPU:
``bench/check_cuda.py``.)"""

import torch
import torch.nn as nn

import cipherdm_torch
from cipherdm_torch import CostMeter, encrypt
from cipherdm_torch.mpc import channel
from cipherdm_torch.protocols import config
from cipherdm_torch.protocols.replicated import arith


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        h = torch.nn.functional.silu(self.norm(self.conv(x)))
        return self.head(self.grouped(h).flatten(1)).softmax(-1)


def _checked(original, seen):
    """ring_product that also computes torch's int64 kernel and records any difference."""
    def product(op, x, y, *args, **kwargs):
        got = original(op, x, y, *args, **kwargs)
        if op in (torch.conv2d, torch.matmul):
            seen["products"] += 1
            seen["wrong"] += int(not torch.equal(got, op(x, y, *args, **kwargs)))
        return got
    return product


def _body(x):
    info = cipherdm_torch.party()
    torch.manual_seed(0 if info.is_owner else 3 + info.rank)
    model = _Block().eval()
    out, seen = {}, {"products": 0, "wrong": 0}
    original_product, original_staged = arith.ring_product, channel.staged
    with config.use("optimised", backend="rss"):
        enc = encrypt(model, (x,))
        enc(enc.share_input("x", x if info.is_user else None))  # re-shares the weights once
        for mode in ("host", "device"):
            device = None if mode == "host" else "cpu:0"
            if mode == "device":
                arith.ring_product = _checked(original_product, seen)
                channel.staged = lambda t: True
            try:
                with config.use(product_device=device):
                    sx = enc.share_input("x", x if info.is_user else None)
                    arith.helper_rotation.calls = 0  # the same truncation helper phase
                    with CostMeter() as m:
                        y = enc(sx)
                    out[mode] = (enc.reveal(y), m.total.rounds, m.total.bytes_sent)
            finally:
                arith.ring_product, channel.staged = original_product, original_staged
    with torch.no_grad():
        out["plain"] = model(x) if info.is_owner else None
    out["seen"] = seen
    return out


def test_offloaded_products_and_staged_links_change_nothing(parties):
    x = torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(4))
    results = parties.run(_body, x)
    plain = next(r["plain"] for r in results if r["plain"] is not None)
    user = next(r for r in results if r["host"][0] is not None)
    for mode in ("host", "device"):
        assert torch.allclose(user[mode][0], plain, atol=5e-3), mode
    for r in results:
        assert r["seen"]["products"] >= 2 * 3  # 3 layers, two ring products each
        assert r["seen"]["wrong"] == 0
    for r in results:  # the same rounds and bytes on every party
        assert r["host"][1:] == r["device"][1:]


def test_gpu_check_script_dry_runs(capsys):
    # the prepared script for a session with a GPU must not rot: its product and staging
    # checks pass on "cpu:0" (the forward comparison is the bench script, run elsewhere)
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "bench" / "check_cuda.py"
    spec = importlib.util.spec_from_file_location("check_cuda", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--device", "cpu:0", "--skip-forward"]) == 0
    out = capsys.readouterr().out
    assert "DIFFERENT" not in out and "BROKEN" not in out and "all device checks passed" in out


def _bench_module():
    import importlib.util
    import pathlib
    import sys

    bench = pathlib.Path(__file__).resolve().parents[2] / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("bench_unet_forward",
                                                      bench / "bench_unet_forward.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
    return module


def test_bench_variant_names_keep_the_device_index():
    # check_cuda.py's forward runs "optimised+rss@cpu:0" (dry run) or "@cuda": the device's
    # ":0" is not a knob suffix (a knob suffix holds "="); the GPU session of stop 18 found this
    bench = _bench_module()
    assert bench._variant("optimised+rss@cpu:0", 0) == ("optimised", "rss",
                                                        {"product_device": "cpu:0"})
    assert bench._variant("optimised+rss:exp_squarings=5", 0) == ("optimised", "rss",
                                                                 {"exp_squarings": 5})
    assert bench._variant("optimised+rss@cpu:0:exp_squarings=5,exp_clip=16.0", 1) == (
        "optimised", "rss", {"exp_squarings": 5, "exp_clip": 16.0, "product_device": "cpu:0"})


def test_bench_counts_the_rounds_in_which_any_party_waits():
    bench = _bench_module()
    # P0 only sends in the first exchange, P2 only in the second: three rounds, though each
    # party's meter counts two
    assert bench.protocol_rounds([[False, True, True], [True, True, False],
                                  [True, False, True]]) == 3
    assert bench.protocol_rounds([[True, False], [False, False], [True, False]]) == 1
    assert bench.protocol_rounds([[True], [True, True], [True]]) is None  # logs do not line up
