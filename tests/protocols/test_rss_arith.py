"""Replicated arithmetic sharing: products, truncation and their cost, in three real processes."""

import math

import pytest
import torch

import cipherdm_torch  # noqa: F401
import crypten
from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor

from cipherdm_torch.mpc.cost import CostMeter
from cipherdm_torch.protocols.replicated import arith as ra
from cipherdm_torch.protocols.replicated import backend as rss_backend



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
        out["div_neg"] = _plain(ex / -2)
        out["div_neg3"] = _plain(ex.div(-3))
        out["div_mixed"] = _plain(ex.div(torch.tensor([2, -3, 5, -7] * 12)))
        # cost: fresh operands re-share both (16 B) + truncation by 2^16 (16 B for P0 / P1, 20 B
        # for the helper: its share of the product and two 16-bit corrections)
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
    # products near the stated range: |x y| up to 2^14 (exact truncation: no failure)
    big_x = torch.tensor([120.5, -127.75, 2 ** 7, -(2 ** 7), 0.5])
    big_y = torch.tensor([-120.25, -127.5, 2 ** 7, 2 ** 7, 2 ** 13])
    results = parties.run(_ops_body, x, y, w, img, k, kt, big_x, big_y, timeout=180)
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
    torch.testing.assert_close(r["div_neg"], x / -2, atol=1e-4, rtol=0)
    torch.testing.assert_close(r["div_neg3"], x / -3, atol=1e-4, rtol=0)
    torch.testing.assert_close(r["div_mixed"], x / torch.tensor([2.0, -3, 5, -7] * 12),
                               atol=1e-4, rtol=0)
    # the whole chain, including the -64^5 = -2^30 tail (2^62 encoded before the last
    # truncation: the two-share truncation wrapped there with probability ~1/4, the exact
    # one is exact up to |x| = 2^62)
    torch.testing.assert_close(r["chain"], x * y ** 4, atol=0.05, rtol=1e-3)
    torch.testing.assert_close(r["add_then_mul"], (x + y) * (x - 1.5), atol=1e-3, rtol=0)
    torch.testing.assert_close(r["big"], big_x * big_y, atol=1e-3, rtol=0)
    torch.testing.assert_close(r["q"], torch.ones(3), atol=1e-4, rtol=0)
    assert r["protocol_after"] != "rss"  # the context manager restores CrypTen's protocol
    # exact truncation: two parties send 2 elements and receive in 2 rounds, the helper
    # (rotating from call to call) sends 1 element and two 16-bit values (power-of-two divisor)
    # and receives nothing
    for key, reshares, n in (("cost_fresh", 16, 1000), ("cost_warm", 0, 1000),
                             ("cost_mm", 16, 64 * 64)):
        sent = sorted(res[key]["bytes_sent"] / n - reshares for res in results)
        rounds = sorted(res[key]["rounds"] for res in results)
        assert sent == [16, 16, 20], (key, sent)
        assert rounds == ([0, 2, 2] if reshares == 0 else [1, 3, 3]), (key, rounds)


def _trunc_body(enc_products, divisor, method, chunk=250_000):
    """Truncate additive sharings of known encoded values (direct protocol call)."""
    comm = crypten.communicator.get()
    rank = comm.get_rank()
    totals, replica_ok, contiguous = [], True, True
    for lo in range(0, enc_products.numel(), chunk):
        xs = enc_products[lo:lo + chunk]
        z = ArithmeticSharedTensor.PRZS(xs.size()).share
        if rank == 0:
            z = z + xs
        div = divisor[lo:lo + chunk] if torch.is_tensor(divisor) else divisor
        t, t_next = ra.truncate_shares(z, div, method=method)
        totals.append(comm.all_reduce(t.clone()))
        # replica check: the next party's share equals my replica
        nxt = torch.empty_like(t)
        ra.exchange([(t, (rank - 1) % 3)], [(nxt, (rank + 1) % 3)])
        replica_ok &= bool(torch.equal(nxt, t_next))
        contiguous &= t.is_contiguous() and t_next.is_contiguous()
    return torch.cat(totals), replica_ok, contiguous


def _signed_values(n, lo_bits, hi_bits, g):
    mag = torch.randint(2 ** lo_bits, 2 ** hi_bits, (n,), generator=g)
    return mag * torch.where(torch.rand(n, generator=g) < 0.5, -1, 1)


def test_exact_truncation_never_fails(parties):
    """10^6 values up to 2^61 encoded (half of them above 2^52), by 2^16: error in {0, +1},
    zero failures; 200k values by tensor divisors (odd and power-of-two): error <= 1."""
    g = torch.Generator().manual_seed(3)
    n = 500_000
    values = torch.cat([_signed_values(n, 0, 52, g), _signed_values(n, 52, 61, g)])
    values[:4] = torch.tensor([2 ** 62 - 2 ** 16 - 1, -(2 ** 62), 2 ** 61, -1])
    results = parties.run(_trunc_body, values, 2 ** 16, "exact", timeout=300)
    total = results[0][0]
    assert all(r[1] and r[2] for r in results)  # replicated and contiguous on every party
    err = total - (values >> 16)
    assert set(err.unique().tolist()) <= {0, 1}, err.abs().max()
    # unbiased: +1 with probability frac(x / 2^16), ~1/2 on these values
    assert abs(err.double().mean().item() - 0.5) < 0.01
    m = 200_000
    vals = _signed_values(m, 0, 61, g)
    divs = torch.randint(1, 2 ** 20, (m,), generator=g)
    divs[: m // 4] = 2 ** torch.randint(0, 40, (m // 4,), generator=g)
    total = parties.run(_trunc_body, vals, divs, "exact", timeout=300)[0][0]
    err = total - torch.div(vals, divs, rounding_mode="floor")
    assert err.abs().max().item() <= 1


@pytest.mark.parametrize("method", ["probabilistic", "exact"])
def test_truncation_at_large_magnitude(parties, method):
    """Statistical: the two-share truncation wraps with probability ~|x| / 2^64 (here
    |x| ~ 2^52: about 2^-12.5 per element, ~10 expected in 60k; could fail with a tiny
    probability); the exact one never does."""
    g = torch.Generator().manual_seed(2)
    n = 60000
    small = torch.randint(-(2 ** 42), 2 ** 42, (n,), generator=g)
    large = _signed_values(n, 51, 52, g)
    results = parties.run(_trunc_body, torch.cat([small, large]), 2 ** 16, method, timeout=120)
    total = results[0][0]
    assert all(r[1] for r in results)
    err = total - (torch.cat([small, large]) >> 16)
    err_small, err_large = err[:n], err[n:]
    units = {0, -1} if method == "probabilistic" else {0, 1}
    assert set(err_small.unique().tolist()) <= units
    assert (err_small != 0).float().mean() > 0.2  # the 1-ulp rounding is real and common
    wraps = (err_large.abs() > 2).sum().item()
    if method == "exact":
        assert wraps == 0
        assert set(err_large.unique().tolist()) <= units
        return
    expected = (large.abs().double() / float(2 ** 64)).sum().item()
    # binomial: expected ~ n * 2^-12.5 ~ 10; accept a generous Poisson band
    assert 1 <= wraps <= expected + 6 * math.sqrt(expected) + 3, (wraps, expected)
    big = err_large[err_large.abs() > 2].abs().double()
    assert torch.all((big - float(2 ** 48)).abs() <= 2)  # a wrap is off by exactly 2^(64-16)
    ok = err_large[err_large.abs() <= 2]
    assert set(ok.unique().tolist()) <= units


def _bad_divisor_body():
    with rss_backend.replicated_backend():
        x = crypten.cryptensor(torch.ones(3))
        try:
            x._tensor.div_(0)
        except ZeroDivisionError as e:
            return str(e)
    return None


def test_truncation_by_zero_is_refused(parties):
    for msg in parties.run(_bad_divisor_body, timeout=60):
        assert msg and "zero" in msg


@pytest.mark.parametrize("d", [1, 8, 13, 20, 40, 61])
def test_power_of_two_truncation_every_width(parties, d):
    """The power-of-two path sends its corrections in d-bit words (uint8 / int16 / int32 /
    int64): floor or floor + 1 at every width, up to |x| = 2^61, both ends of the range."""
    g = torch.Generator().manual_seed(d)
    values = torch.cat([_signed_values(20_000, 0, 40, g), _signed_values(20_000, 40, 61, g)])
    values[:3] = torch.tensor([2 ** 62 - 2 ** d - 1, -(2 ** 62), -1])
    results = parties.run(_trunc_body, values, 2 ** d, "exact", timeout=120)
    assert all(r[1] and r[2] for r in results)
    err = results[0][0] - (values >> d)
    assert set(err.unique().tolist()) <= {0, 1}, (d, err.abs().max())
