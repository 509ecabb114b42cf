"""Replicated arithmetic sharing: products, truncation and their cost, in three real processes."""

import math

import torch

import cipherdm_torch  # noqa: F401
import crypten
from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor

from cipherdm_torch.cost import CostMeter
from cipherdm_torch.protocols import rss_arith as ra
from cipherdm_torch.protocols import rss_backend



def _plain(t):
    """Decode by hand: CrypTen 0.4.1's decoder divides negatives by 2^16 - 1 (off by up to 1)."""
    return (t.reveal().double() / t.encoder.scale).float()

def _ops_body(x, y, w, img, k, kt, big_x, big_y):
    out = {}
    with rss_backend.replicated_backend():
        ex, ey = crypten.cryptensor(x, src=0), crypten.cryptensor(y, src=1)
        ew, ei = crypten.cryptensor(w, src=0), crypten.cryptensor(img, src=1)
        ek, ekt = crypten.cryptensor(k, src=0), crypten.cryptensor(kt, src=0)
        out["mul"] = _plain((ex * ey))
        out["matmul"] = _plain(ex.view(4, -1).matmul(ew))
        out["conv2d"] = _plain(ei.conv2d(ek, padding=1, stride=2))
        out["conv_t"] = _plain(ei.conv_transpose2d(ekt, stride=2))
        out["square"] = _plain(ex.square())
        out["pub_mul"] = _plain((ex * 0.3))
        out["div3"] = _plain(ex.div(3))
        chain = ex
        for _ in range(4):
            chain = chain * ey
        out["chain"] = _plain(chain)
        out["add_then_mul"] = _plain(((ex + ey) * (ex - 1.5)))
        eb, ec = crypten.cryptensor(big_x), crypten.cryptensor(big_y, src=2)
        out["big"] = _plain((eb * ec))
        # cost: fresh operands re-share both (16 B) + truncation (8 B); replicated operands 8 B
        a = crypten.cryptensor(torch.ones(1000))
        with CostMeter() as fresh:
            p = a * a.clone()
        with CostMeter() as warm:
            q = p * p
        with CostMeter() as mm:
            m = crypten.cryptensor(torch.ones(64, 64)).matmul(crypten.cryptensor(torch.ones(64, 64)))
        out["cost_fresh"], out["cost_warm"], out["cost_mm"] = (
            fresh.total.as_dict(), warm.total.as_dict(), mm.total.as_dict())
        out["q"] = _plain(q)[:3]
        del m
    out["protocol_after"] = str(crypten.cfg.mpc.protocol)
    return out


def test_products_match_plaintext_and_cost(parties):
    g = torch.Generator().manual_seed(1)
    # mixed magnitudes: tiny, negative, around one, up to 100
    x = torch.cat([torch.randn(40, generator=g) * 3, torch.tensor([-100.0, 99.5, 1e-3, -1e-3,
                                                                   0.0, -0.0, 37.25, -64.0])])
    y = torch.cat([torch.randn(40, generator=g) * 3, torch.tensor([3.0, -2.5, 1e-3, 7.0,
                                                                   -5.0, 1.0, -0.125, -64.0])])
    w = torch.randn(12, 5, generator=g)
    img, k = torch.randn(2, 3, 9, 9, generator=g) * 2, torch.randn(4, 3, 3, 3, generator=g)
    kt = torch.randn(3, 2, 2, 2, generator=g)
    # products near the stated range: |x y| up to 2^14 (truncation failure prob 2^-18 each)
    big_x = torch.tensor([120.5, -127.75, 2 ** 7, -(2 ** 7), 0.5])
    big_y = torch.tensor([-120.25, -127.5, 2 ** 7, 2 ** 7, 2 ** 13])
    results = parties.run(_ops_body, x, y, w, img, k, kt, big_x, big_y)
    r = results[0]
    for other in results[1:]:
        torch.testing.assert_close(other["mul"], r["mul"])
    # encoding rounds inputs to 2^-17; truncation adds at most 1 ulp (2^-16)
    torch.testing.assert_close(r["mul"], x * y, atol=2e-3, rtol=0)
    torch.testing.assert_close(r["matmul"], x.view(4, -1) @ w, atol=3e-3, rtol=0)
    torch.testing.assert_close(r["conv2d"], torch.conv2d(img, k, padding=1, stride=2),
                               atol=3e-3, rtol=0)
    torch.testing.assert_close(r["conv_t"], torch.conv_transpose2d(img, kt, stride=2),
                               atol=3e-3, rtol=0)
    torch.testing.assert_close(r["square"], x * x, atol=2e-3, rtol=0)
    torch.testing.assert_close(r["pub_mul"], x * 0.3, atol=2e-3, rtol=0)
    torch.testing.assert_close(r["div3"], x / 3, atol=1e-4, rtol=0)
    # chain on the randn*3 part (the -64^5 = -2^30 tail is where truncation wraps, p ~ 1/4)
    torch.testing.assert_close(r["chain"][:40], (x * y ** 4)[:40], atol=0.05, rtol=1e-3)
    torch.testing.assert_close(r["add_then_mul"], (x + y) * (x - 1.5), atol=1e-3, rtol=0)
    torch.testing.assert_close(r["big"], big_x * big_y, atol=1e-3, rtol=0)
    torch.testing.assert_close(r["q"], torch.ones(3), atol=1e-4, rtol=0)
    assert r["protocol_after"] != "rss"  # the context manager restores CrypTen's protocol
    for rank, res in enumerate(results):
        fresh, warm, mm = res["cost_fresh"], res["cost_warm"], res["cost_mm"]
        assert fresh["bytes_sent"] == 24 * 1000, (rank, fresh)  # two re-shares + truncation
        assert warm["bytes_sent"] == 8 * 1000 and warm["rounds"] == 1, (rank, warm)
        assert mm["bytes_sent"] == 24 * 64 * 64, (rank, mm)


def _trunc_body(enc_products):
    """Truncate additive sharings of known encoded values by 2^16 (direct protocol call)."""
    rank = crypten.communicator.get().get_rank()
    z = ArithmeticSharedTensor.PRZS(enc_products.size()).share
    if rank == 0:
        z = z + enc_products
    t, t_next = ra.truncate_shares(z, 2 ** 16)
    total = crypten.communicator.get().all_reduce(t.clone())
    # replica check: the next party's share equals my replica
    nxt = torch.empty_like(t)
    ra.exchange([(t, (rank - 1) % 3)], [(nxt, (rank + 1) % 3)])
    return total, bool(torch.equal(nxt, t_next))


def test_truncation_error_behaviour(parties):
    g = torch.Generator().manual_seed(2)
    n = 60000
    # (a) moderate products |v| < 2^10 (reals): result is floor(v) or floor(v) - 1 ulp, always
    small = torch.randint(-(2 ** 42), 2 ** 42, (n,), generator=g)
    # (b) large products |v| ~ 2^20: rare wrap errors with probability about |v| / 2^32 = 2^-12
    large = torch.randint(2 ** 51, 2 ** 52, (n,), generator=g) * \
        torch.where(torch.rand(n, generator=g) < 0.5, -1, 1)
    results = parties.run(_trunc_body, torch.cat([small, large]))
    total, replica_ok = results[0]
    assert all(r[1] for r in results)
    floor = torch.cat([small, large]) >> 16
    err = total - floor
    err_small, err_large = err[:n], err[n:]
    assert set(err_small.unique().tolist()) <= {0, -1}
    assert (err_small == -1).float().mean() > 0.2  # the 1-ulp error is real and common
    wraps = (err_large.abs() > 2).sum().item()
    expected = (large.abs().double() / float(2 ** 64)).sum().item()
    # binomial: expected ~ n * 2^-12.5 ~ 10; accept a generous Poisson band
    assert 1 <= wraps <= expected + 6 * math.sqrt(expected) + 3, (wraps, expected)
    if wraps:
        big = err_large[err_large.abs() > 2].abs().double()
        assert torch.all((big - float(2 ** 48)).abs() <= 2)  # a wrap is off by exactly 2^(64-16)
    ok = err_large[err_large.abs() <= 2]
    assert set(ok.unique().tolist()) <= {0, -1}
