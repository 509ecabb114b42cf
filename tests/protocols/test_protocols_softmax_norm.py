"""exp / SoftMax / reciprocal / rsqrt / GroupNorm / LayerNorm in three real processes."""

import pytest
import torch
import torch.nn.functional as F

import cipherdm_torch  # noqa: F401
import crypten

from cipherdm_torch import CostMeter
from cipherdm_torch.protocols import (config, exp_softmax, functions as P, reciprocal,
                                      recorded_ranges, sharewise)
from cipherdm_torch.protocols.replicated import backend as rss_backend


def _logit_scale():
    """Spread of recorded attention logits (fallback 10)."""
    r = recorded_ranges.load().get("softmax_logits")
    return max(abs(r["min"]), abs(r["max"])) if r else 10.0


def _body(d, protocol):
    rss_backend.install()
    out = {}
    with crypten.cfg.temp_override({"mpc.protocol": protocol}):
        ex = crypten.cryptensor(d["exp_x"])
        out["exp"] = P.exp(ex).get_plain_text()
        with config.use(exp_clip_compare=False):
            out["exp_noclip"] = P.exp(ex[ex.size(0) // 2:]).get_plain_text()  # x in [-64, 0]
        es = crypten.cryptensor(d["attn"])
        with CostMeter() as m:
            y = P.softmax(es, -1)
        out["softmax"] = (y.get_plain_text(), m.total.bytes_sent, m.total.rounds)
        with config.use("baseline"), CostMeter() as m:
            yb = P.softmax(es, -1)
        out["softmax_baseline"] = (yb.get_plain_text(), m.total.bytes_sent)
        out["softmax_long"] = P.softmax(crypten.cryptensor(d["long"]), 1).get_plain_text()
        er = crypten.cryptensor(d["pos"])
        out["reciprocal"] = P.reciprocal(er).get_plain_text()
        out["rsqrt"] = P.rsqrt(er).get_plain_text()
        with config.use("baseline"):
            out["reciprocal_baseline"] = P.reciprocal(er).get_plain_text()
        eg = crypten.cryptensor(d["img"])
        w = crypten.cryptensor(d["w"])
        out["group_norm"] = P.group_norm(eg, 2, w, d["b"]).get_plain_text()
        out["layer_norm"] = P.layer_norm(crypten.cryptensor(d["tokens"]), 16, d["lw"], None).get_plain_text()
    return out


@pytest.mark.parametrize("protocol", ["replicated", "rss"])  # CrypTen's, and our backend
def test_softmax_exp_norm_three_parties(parties, protocol):
    g = torch.Generator().manual_seed(0)
    s = _logit_scale()
    attn = torch.randn(2, 196, 196, generator=g)[:, :24] * s / 2  # (N, heads*L, L) rows of 196
    attn[0, 0] = torch.linspace(-3 * s, s, 196)  # a row reaching far below its max
    long = torch.randn(2, 4096, generator=g) * 0.5  # SD-sized rows: sums in the thousands
    img = torch.randn(2, 4, 5, 6, generator=g) * torch.tensor([0.01, 1, 30, 3]).view(1, 4, 1, 1) + 2
    d = {
        "exp_x": torch.cat([torch.tensor([-1e4, -1e3, -200.0]), torch.linspace(-64, 0, 801)]),
        "attn": attn, "long": long,
        "pos": torch.logspace(-3.5, 4.5, 60),
        "img": img, "w": torch.rand(4, generator=g) + 0.5, "b": torch.randn(4, generator=g),
        "tokens": torch.randn(3, 7, 16, generator=g) * 4 + 1, "lw": torch.rand(16, generator=g),
    }
    r = parties.run(_body, d, protocol, timeout=600)[0]
    x = d["exp_x"]
    # exp: twin and truth, clipped inputs give 0, never garbage
    assert (r["exp"] - exp_softmax.reference_exp(x)).abs().max() < 2e-3
    assert (r["exp"] - x.exp()).abs().max() < 2e-3
    assert r["exp"][:3].abs().max() < 1e-4
    xh = x[x.numel() // 2:]
    assert (r["exp_noclip"] - xh.exp()).abs().max() < 2e-3
    # softmax on rows of 196 (target error < 0.01), rows sum to 1
    y, sent, rounds = r["softmax"]
    print(f"softmax of 48 rows of 196 on {protocol}: party 0 sent {sent} B in {rounds} rounds")
    ref = attn.softmax(-1)
    assert (y - ref).abs().max() < 0.01
    assert (y.sum(-1) - 1).abs().max() < 0.01
    assert (y - exp_softmax.reference_softmax(attn, -1)).abs().max() < 0.005
    yb, sent_b = r["softmax_baseline"]
    assert (yb - ref).abs().max() < 0.05
    assert sent < sent_b, (sent, sent_b)  # fewer bytes than CrypTen's softmax
    # rows of 4096: the reciprocal of a sum in the thousands stays accurate
    yl = r["softmax_long"]
    assert (yl.sum(1) - 1).abs().max() < 0.02
    assert (yl - long.softmax(1)).abs().max() < 4e-5  # ~2 ulp of 16-bit fixed point
    # reciprocal / rsqrt over 8 decades (CrypTen's reciprocal fails above ~100)
    pos = d["pos"]
    # relative error where input and output both have >= 8 significant bits in 16-bit fixed point
    mid = (pos > 0.004) & (pos < 250)
    assert (((r["reciprocal"] - 1 / pos) * pos).abs())[mid].max() < 0.02
    assert (r["reciprocal"] - 1 / pos).abs()[pos >= 250].max() < 1e-4
    assert ((r["rsqrt"] - pos.rsqrt()) / pos.rsqrt()).abs()[pos > 0.004].max() < 0.02
    bad = ((r["reciprocal_baseline"] - 1 / pos) * pos).abs()
    assert bad[pos > 1000].max() > 0.5  # documents the baseline's failure the protocol fixes
    # normalisation, channels with variances from 1e-4 to 900
    gn = F.group_norm(img, 2, d["w"], d["b"])
    assert (r["group_norm"] - gn).abs().max() < 0.02
    ln = F.layer_norm(d["tokens"], (16,), d["lw"], None)
    assert (r["layer_norm"] - ln).abs().max() < 0.02


def _exp_many(x, protocol):
    rss_backend.install()
    with crypten.cfg.temp_override({"mpc.protocol": protocol}), \
            config.use(exp_squarings=10, exp_clip_compare=False):
        return P.exp(crypten.cryptensor(x)).get_plain_text()


@pytest.mark.parametrize("protocol", ["replicated", "rss"])
def test_exp_survives_probabilistic_truncation(parties, protocol):
    # CrypTen's "replicated" truncation is wrong with probability ~|x| / 2^64 per element. With
    # 10 squarings an untruncated first square would be ~2^52 (rate 2^-12: ~24 garbage entries
    # in 100,000); exp must keep its products small there (rate ~2^-32), and may take the
    # large product only where truncation is exact (our backend's default)
    x = torch.linspace(-8, 0, 100_000)
    y = parties.run(_exp_many, x, protocol)[0]
    err = (y - x.exp()).abs()  # 10 squarings amplify the rounding to ~0.02; garbage is far off
    assert err.max() < 0.05, f"{int((err > 0.05).sum())} garbage entries, worst {err.max():.3g}"


def _rsqrt_count(var, times, counts):
    out = {}
    with rss_backend.replicated_backend(), config.use("optimised"):
        for n in counts:
            v = crypten.cryptensor(var * n)  # the sum of n squares, n var
            t = crypten.cryptensor(times)
            sharewise.prepare_for_products([v.share, t.share])  # replicas, as a norm's have
            with CostMeter() as m:
                y = reciprocal.rsqrt(v, times=t, count=n)
            out[n] = (y.get_plain_text(), m.total.rounds)
        v, t = crypten.cryptensor(var * counts[-1]), crypten.cryptensor(times)
        sharewise.prepare_for_products([v.share, t.share])
        with CostMeter() as m:  # the mean instead: one division (truncation) more
            y = reciprocal.rsqrt(v.div(counts[-1]), times=t)
        out["mean"] = (y.get_plain_text(), m.total.rounds)
    return out


def test_rsqrt_of_a_sum_with_its_count(parties):
    """times / sqrt(x / n) from x = n var (a norm's sum of squares): as accurate as from the
    variance itself over the whole default range, variances 2^-10 .. 2^22 and counts up to a
    Stable-Diffusion-sized group (40960 = 10 channels x 64 x 64), without the division."""
    var = torch.logspace(-3, 6.6, 40, base=10.0)
    times = torch.linspace(-3, 3, 40) * var.sqrt()  # centred activations of that spread
    counts = [1, 3, 784, 40960]
    var = var.clamp(max=2.0 ** 46 / 2 ** 16 / max(counts))  # n var fits the 16-bit fixed point
    every = parties.run(_rsqrt_count, var, times, counts)
    r = every[0]
    ref = times / var.sqrt()
    for n in counts:
        y, rounds = r[n]
        rel = ((y - ref).abs() / ref.abs().clamp(min=0.1)).max().item()
        assert rel < 0.01, (n, rel)
    # the division by n is one truncation: two rounds for each of the two parties that open,
    # none counted for its helper (it receives nothing), so 4 over the parties whichever
    # party helps (the helper rotates from call to call)
    total = {k: sum(p[k][1] for p in every) for k in ("mean", counts[-1])}
    assert total["mean"] == total[counts[-1]] + 4, total


def _group_norm_many(x, w, b, protocol):
    rss_backend.install()
    with crypten.cfg.temp_override({"mpc.protocol": protocol}), config.use("optimised"):
        return P.group_norm(crypten.cryptensor(x), 2, crypten.cryptensor(w), b).get_plain_text()


@pytest.mark.parametrize("protocol", ["beaver", "replicated", "rss"])
def test_group_norm_survives_probabilistic_truncation(parties, protocol):
    # CrypTen's truncations are wrong with probability ~|raw| / 2^64 per element. GroupNorm's
    # outputs may meet 32-fractional-bit weights (raw ~2^50: ~6 garbage entries in 100,000)
    # only where truncation is exact (our backend's default); elsewhere ordinary products
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 4, 100, 64, generator=g) * 2 + 1
    w, b = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    y = parties.run(_group_norm_many, x, w, b, protocol, timeout=300)[0]
    err = (y - F.group_norm(x, 2, w, b)).abs()
    assert err.max() < 0.05, f"{int((err > 0.05).sum())} garbage entries, worst {err.max():.3g}"
