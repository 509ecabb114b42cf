"""Replicated binary sharing and comparisons, full ring range, in three real processes."""

import torch

import cipherdm_torch  # noqa: F401
import crypten
from crypten.encoder import FixedPointEncoder
from crypten.mpc import MPCTensor
from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor

from cipherdm_torch.protocols import config
from cipherdm_torch.mpc.cost import CostMeter
from cipherdm_torch.protocols.replicated import arith as ra
from cipherdm_torch.protocols.replicated import backend as rss_backend, compare as rss_compare
from cipherdm_torch.protocols.replicated import binary as rb



def _plain(t):
    """Decode by hand: CrypTen 0.4.1's decoder divides negatives by 2^16 - 1 (off by up to 1)."""
    return (t.reveal().double() / t.encoder.scale).float()

def _share_ints(v):
    """Additive sharing of raw ring elements ``v`` (bypasses the encoder)."""
    z = ArithmeticSharedTensor.PRZS(v.size()).share
    return z + v if crypten.communicator.get().get_rank() == 0 else z


def _binary_body(words_a, words_b, ring):
    out = {}
    rank = crypten.communicator.get().get_rank()
    # binary sharings of public-known test words via A2B of arithmetic sharings
    xa = _share_ints(words_a)
    xb = _share_ints(words_b)
    ba = rb.a2b(xa, ra.replicate(xa))
    bb = rb.a2b(xb, ra.replicate(xb))
    out["a2b"] = rb.reveal_binary(ba)
    with CostMeter() as m:
        anded = rb.and_(ba, bb)
    out["and"], out["and_cost"] = rb.reveal_binary(anded), m.total.as_dict()
    out["xor"] = rb.reveal_binary(rb.xor(ba, bb))
    out["b2a"] = crypten.communicator.get().all_reduce(rb.b2a(anded))
    # sign bit over the whole ring
    xr = _share_ints(ring)
    with CostMeter() as m:
        bit = rb.msb(xr, ra.replicate(xr))
    out["msb_cost"] = m.total.as_dict()
    out["msb"] = rb.reveal_binary(bit)
    out["ltz_ring"] = crypten.communicator.get().all_reduce(rss_compare.ltz_share(xr))
    with CostMeter() as m:
        big = _share_ints(torch.arange(-8192, 8192, dtype=torch.long) << 40)
        rb.a2b(big, ra.replicate(big))
    out["a2b_cost"] = m.total.as_dict()
    out["rank"] = rank
    return out


def test_binary_and_conversions_full_ring(parties):
    g = torch.Generator().manual_seed(3)
    lo, hi = -(2 ** 63), 2 ** 63 - 1
    a = torch.randint(lo, hi, (300,), generator=g)
    b = torch.randint(lo, hi, (300,), generator=g)
    ring = torch.cat([torch.randint(lo, hi, (2000,), generator=g),
                      torch.tensor([lo, lo + 1, -1, 0, 1, hi - 1, hi, -(2 ** 62), 2 ** 62])])
    results = parties.run(_binary_body, a, b, ring, timeout=300)
    for r in results:
        assert torch.equal(r["a2b"], a)
        assert torch.equal(r["and"], a & b)
        assert torch.equal(r["xor"], a ^ b)
        assert torch.equal(r["b2a"], a & b)
        assert torch.equal(r["msb"].long(), (ring < 0).long())
        assert torch.equal(r["ltz_ring"], (ring < 0).long())
        assert r["and_cost"]["bytes_sent"] == 8 * 300 and r["and_cost"]["rounds"] == 1
        # msb: re-share (8 B) + generate / propagate words (P0 16 B, P1 / P2 8 B) + bit-packed
        # carry tree (~15.6 B)
        per = r["msb_cost"]["bytes_sent"] / ring.numel()
        assert per <= (40.5 if r["rank"] == 0 else 32.5), (r["rank"], per)
    # a2b: re-share + generate / propagate (1) + Kogge-Stone (6); msb: re-share + generate /
    # propagate + 6 carry-tree levels. P0 only sends in the generate / propagate round (a round
    # is counted by the parties that wait for it): the others count one more.
    for key, most in (("a2b_cost", 8), ("msb_cost", 8)):
        counts = sorted(r[key]["rounds"] for r in results)
        assert counts == [most - 1, most, most], (key, counts)


def _compare_body(x, y, rows, cond, c):
    out = {}
    ex, ey = crypten.cryptensor(x, src=0), crypten.cryptensor(y, src=1)
    er = crypten.cryptensor(rows, src=1)
    ecb = MPCTensor.from_shares(_share_ints(cond), precision=0)
    with rss_backend.replicated_backend():
        out["ltz"] = _plain(rss_compare.ltz(ex))
        out["lt_const"] = _plain(rss_compare.lt(ex, c))
        out["ge"] = _plain(rss_compare.ge(ex, ey))
        # CrypTen API on the backend
        out["api_lt"] = _plain((ex < ey))
        out["api_gt"] = _plain((ex > c))
        out["api_le"] = _plain((ex <= ey))
        out["api_eq"] = _plain((ex == ex))
        out["api_sign"] = _plain(ex.sign())
        # value outputs are compared as raw ring elements (exact: no truncation involved);
        # CrypTen's float32 decoding is itself inexact for large negatives (-1e6 -> -1000015)
        out["api_abs"] = ex.abs().reveal()
        out["api_where"] = crypten.where(ex < ey, ex, ey).reveal()
        out["api_max"] = er.max(dim=1)[0].reveal()
        out["select"] = rss_compare.select(ecb, ex, ey).reveal()
        out["select_pub"] = rss_compare.select(ecb, ex, y).reveal()
        out["tree_max"] = rss_compare.max(er, dim=1).reveal()
        out["tree_max0"] = rss_compare.max(er, dim=0, keepdim=True).reveal()
        n = 4096
        big = crypten.cryptensor(torch.linspace(-50, 50, n))
        with CostMeter() as m:
            rl = big.relu()
        out["relu_cost"] = m.total.as_dict()
        out["relu_big"] = _plain(rl)
        with CostMeter() as m:
            cmp = big < 0.5
        out["lt_cost"] = m.total.as_dict()
        out["lt_big"] = _plain(cmp)
        out["relu"] = ex.relu().reveal()
    return out


def test_comparisons_relu_select_max(parties):
    g = torch.Generator().manual_seed(4)
    lim = float(2 ** 45)  # x - y reaches 2^46 (encoded 2^62), still inside the ring
    x = torch.cat([torch.randn(60, generator=g) * 10, torch.tensor(
        [0.0, -2 ** -16, 2 ** -16, -1e-3, 1e-3, lim, -lim, 1e6, -1e6, 2.0 ** 40, -(2.0 ** 40)])])
    y = torch.cat([torch.randn(60, generator=g) * 10, torch.tensor(
        [0.0, 0.0, 0.0, 1e-3, -1e-3, -lim, lim, 1e6, 1e6 + 1, 0.0, 0.0])])
    rows = torch.randn(9, 13, generator=g) * 20
    cond = (torch.rand(x.numel(), generator=g) < 0.5).long()
    c = 0.75
    results = parties.run(_compare_body, x, y, rows, cond, c, timeout=300)
    big = torch.linspace(-50, 50, 4096)
    enc = FixedPointEncoder()
    ex, ey, er = enc.encode(x), enc.encode(y), enc.encode(rows)
    for r in results:
        assert torch.equal(r["ltz"], (x < 0).float())
        assert torch.equal(r["lt_const"], (x < c).float())
        assert torch.equal(r["ge"].float(), (x >= y).float())
        assert torch.equal(r["api_lt"], (x < y).float())
        assert torch.equal(r["api_gt"], (x > c).float())
        assert torch.equal(r["api_le"], (x <= y).float())
        assert torch.equal(r["api_eq"], torch.ones_like(x))
        assert torch.equal(r["api_sign"], torch.where(x < 0, -1.0, 1.0))
        assert torch.equal(r["api_abs"], ex.abs())
        assert torch.equal(r["api_where"], torch.minimum(ex, ey))
        assert torch.equal(r["api_max"], er.max(1)[0])
        assert torch.equal(r["select"], torch.where(cond.bool(), ex, ey))
        assert torch.equal(r["select_pub"], torch.where(cond.bool(), ex, ey))
        assert torch.equal(r["tree_max"], er.max(1)[0])
        assert torch.equal(r["tree_max0"], er.max(0, keepdim=True)[0])
        assert torch.equal(r["relu"], ex.relu())
        torch.testing.assert_close(r["relu_big"], big.relu(), atol=1e-4, rtol=0)
        assert torch.equal(r["lt_big"], (big < 0.5).float())
        relu_b = r["relu_cost"]["bytes_sent"] / 4096
        lt_b = r["lt_cost"]["bytes_sent"] / 4096
        assert relu_b <= 100 and lt_b <= 100, (relu_b, lt_b)
    # ReLU of a fresh input: re-share, generate / propagate with the random bit's injection,
    # 5 carry-tree levels, the last level's AND merged with the opening of msb ^ rho (the
    # bit comes out replicated and 1 - b keeps the replica, so x (1 - b) is local): 8 rounds
    # (11 before stop 18, 9 before stop 19); x < c then reuses x's replica: 7. P0 only sends
    # in the generate / propagate round, so its meter counts one fewer
    for key, most in (("relu_cost", 8), ("lt_cost", 7)):
        counts = sorted(r[key]["rounds"] for r in results)
        assert counts == [most - 1, most, most], (key, counts)


def _narrow_body(ring, values):
    out = {}
    xr = _share_ints(ring)
    xn = ra.replicate(xr)
    for bits in (64, 32):
        with CostMeter() as m:
            bit = rb.msb(xr, xn, bits)
        out[bits] = (rb.reveal_binary(bit), m.total.as_dict())
    with rss_backend.replicated_backend():
        ex = crypten.cryptensor(values, src=0)
        with config.bounded_comparisons():
            out["lt"] = _plain(ex < 0.25)
        out["lt_full"] = _plain(ex < 0.25)
    return out


def test_narrow_sign_is_exact_in_its_range_and_cheaper(parties):
    """The sign read mod 2^32: exact for every encoded value in [-2^31, 2^31) (both ends,
    and values whose high 32 bits would fool a wrong implementation), one round and ~13 B per
    element (mean over the parties) cheaper than the full ring."""
    g = torch.Generator().manual_seed(8)
    lo, hi = -(2 ** 31), 2 ** 31 - 1
    ring = torch.cat([torch.randint(lo, hi, (4000,), generator=g),
                      torch.tensor([lo, lo + 1, -1, 0, 1, hi - 1, hi, 2 ** 30, -(2 ** 30)])])
    values = torch.cat([torch.randn(1000, generator=g) * 50, torch.tensor([0.25, 0.2499, 32767.0,
                                                                          -32767.0])])
    results = parties.run(_narrow_body, ring, values, timeout=300)
    for r in results:
        for bits in (64, 32):
            assert torch.equal(r[bits][0].long(), (ring < 0).long()), bits
        assert r[32][1]["rounds"] == r[64][1]["rounds"] - 1
    for k in ("lt", "lt_full"):
        assert torch.equal(results[0][k], (values < 0.25).float()), k
    sent = {bits: sum(r[bits][1]["bytes_sent"] for r in results) / ring.numel() / 3
            for bits in (64, 32)}
    assert sent[32] <= sent[64] - 12, sent


def _coarse_body(ring, shift):
    xr = _share_ints(ring)
    xn = ra.replicate(xr)
    out = {}
    for bits, sh in ((32, 0), (16, shift)):
        with CostMeter() as m:
            share = rb.msb_arith(xr, xn, bits, sh)
        out[bits] = (crypten.communicator.get().all_reduce(share.clone()), m.total.as_dict())
        replica = ra.cached_next(share)
        out[bits, "replica"] = replica
        out[bits, "share"] = share
    out["rank"] = crypten.communicator.get().get_rank()
    return out


def test_coarse_sign_errs_only_just_above_zero(parties):
    """The 16-bit sign after a local shift s: exact for encoded values in
    [-2^(15+s) + 2^(s+1), 2^(15+s)) outside the zone [0, 2^(s+1)), where an attacker-chosen
    grid of values shows it may say "negative" (and does, for some); one round fewer than the
    32-bit sign and fewer bytes; the bit comes out replicated (party i's replica is party
    i+1's share)."""
    s = 10
    g = torch.Generator().manual_seed(12)
    lo, hi = -(2 ** (15 + s)) + 2 ** (s + 1), 2 ** (15 + s) - 1
    ring = torch.cat([torch.randint(lo, hi, (6000,), generator=g),
                      torch.arange(-2 ** (s + 2), 2 ** (s + 2), 7),
                      torch.tensor([lo, lo + 1, -1, 0, 1, hi - 1, hi, 2 ** (s + 1),
                                    2 ** (s + 1) - 1])])
    results = parties.run(_coarse_body, ring, s, timeout=300)
    truth = (ring < 0).long()
    zone = (ring >= 0) & (ring < 2 ** (s + 1))
    for r in results:
        assert torch.equal(r[32][0], truth)
        got = r[16][0]
        assert torch.equal(got[~zone], truth[~zone])
        assert bool(((got[zone] == 0) | (got[zone] == 1)).all())
        assert int(got[zone].sum()) > 0  # the zone is real: some read as negative
        assert r[16][1]["rounds"] == r[32][1]["rounds"] - 1, (r[16][1], r[32][1])
    by_rank = {r["rank"]: r for r in results}
    for i in range(3):
        assert torch.equal(by_rank[i][16, "replica"], by_rank[(i + 1) % 3][16, "share"])
    sent = {bits: sum(r[bits][1]["bytes_sent"] for r in results) / ring.numel() / 3
            for bits in (32, 16)}
    assert sent[16] < sent[32] - 3, sent


def _injection_body(bits):
    rank = crypten.communicator.get().get_rank()
    # a replicated binary sharing of the bits: bit 0 of an A2B of an arithmetic sharing
    xs = _share_ints(bits)
    one = tuple(t & 1 for t in rb.a2b(xs, ra.replicate(xs)))
    with CostMeter() as m:
        share = rb.b2a_bit_replicated(one)
    replica = ra.cached_next(share)
    # a product by the bit right after: no re-share round
    with CostMeter() as mp:
        prod = ra.local_product(torch.mul, share, replica, xs, ra.replicate(xs))
    return {"rank": rank, "share": share, "replica": replica, "cost": m.total.as_dict(),
            "product_rounds": mp.total.as_dict()["rounds"],
            "product": crypten.communicator.get().all_reduce(prod)}


def test_bit_injection_with_replica_in_one_round(parties):
    """The replicated injection: the shares add up to the bit, party i's replica is party
    i+1's share, one round, P0 sends 16 B and P1 / P2 8 B per bit, and a product by the bit
    right after needs no re-share round (the round it saves)."""
    bits = torch.randint(0, 2, (3000,), generator=torch.Generator().manual_seed(5))
    results = sorted(parties.run(_injection_body, bits, timeout=300), key=lambda r: r["rank"])
    shares = [r["share"] for r in results]
    assert torch.equal(shares[0] + shares[1] + shares[2], bits)
    for r in results:
        assert torch.equal(r["replica"], shares[(r["rank"] + 1) % 3])
        # one round: P1 and P2 wait for it; P0 only sends (a round is counted where one waits)
        assert r["cost"]["rounds"] == (0 if r["rank"] == 0 else 1)
        assert r["cost"]["bytes_sent"] == (16 if r["rank"] == 0 else 8) * bits.numel()
        assert r["product_rounds"] == 0
        assert torch.equal(r["product"], bits)


def _three_body(a, b, c):
    from cipherdm_torch.protocols import max_tree

    out = {"rank": crypten.communicator.get().get_rank()}
    with rss_backend.replicated_backend(), config.use("optimised"):
        ea, eb, ec = (crypten.cryptensor(t) for t in (a, b, c))
        ra.replicate_many([ea.share, eb.share, ec.share])  # inputs replicated, as in a model
        for name, ctx in (("exact", config.bounded_comparisons), ("coarse",
                                                                  config.coarse_comparisons)):
            with ctx(), CostMeter() as m:
                top = rss_compare.largest_of_three(ea, eb, ec)
            out[name] = (_plain(top), m.total.as_dict(), top.share.clone(),
                         ra.cached_next(top.share))
        # a second level on the first one's output: no re-share round before its comparison
        with config.coarse_comparisons():
            first = rss_compare.largest_of_three(ea, eb, ec)
            with CostMeter() as m2:
                rss_compare.largest_of_three(first, ea, eb)
        out["second_rounds"] = m2.total.as_dict()["rounds"]
    return out


def test_largest_of_three_selects_without_a_round_and_stays_replicated(parties):
    """max(a, b, c) on masked comparison bits: exact (ties included) on 32-bit signs, within the
    coarse zone 2^-5 on 16-bit ones; the comparison's rounds only (6 / 5: generate / propagate,
    the tree, the opening), and the result comes out replicated (party i's replica is party
    i+1's share), so a next level starts its comparison at once."""
    g = torch.Generator().manual_seed(21)
    a = torch.randint(-40, 40, (3000,), generator=g).float() / 8
    b = torch.randint(-40, 40, (3000,), generator=g).float() / 8
    c = torch.randint(-40, 40, (3000,), generator=g).float() / 8
    truth = torch.maximum(torch.maximum(a, b), c)
    results = parties.run(_three_body, a, b, c, timeout=300)
    by_rank = {r["rank"]: r for r in results}
    for r in results:
        assert torch.equal(r["exact"][0], truth)
        err = truth - r["coarse"][0]
        assert bool((err >= 0).all()) and float(err.max()) <= 2 ** -5 + 1e-6
        assert r["exact"][1]["rounds"] <= 6 and r["coarse"][1]["rounds"] <= 5
        assert r["second_rounds"] <= 5
        for name in ("exact", "coarse"):
            assert r[name][3] is not None
    for i in range(3):
        for name in ("exact", "coarse"):
            assert torch.equal(by_rank[i][name][3], by_rank[(i + 1) % 3][name][2])
