"""The MPCTensor hook: with the replicated backend no Beaver-triple provider is ever asked."""

import torch

import cipherdm_torch  # noqa: F401
import crypten
import crypten.mpc

from cipherdm_torch import CostMeter
from cipherdm_torch.compiler import ops
from cipherdm_torch.protocols import sharewise
from cipherdm_torch.protocols.replicated import arith as rss_arith, backend as rss_backend, \
    compare as rss_compare


def _plain(t):
    """Decode by hand: CrypTen 0.4.1's decoder divides negatives by 2^16 - 1 (off by up to 1)."""
    return (t.reveal().double() / t.encoder.scale).float()

def _workload(x, y, w, img, k):
    ex, ey = crypten.cryptensor(x, src=0), crypten.cryptensor(y, src=1)
    ew, ei, ek = crypten.cryptensor(w), crypten.cryptensor(img, src=1), crypten.cryptensor(k)
    out = {
        "mul": ex * ey, "matmul": ex.unsqueeze(0).matmul(ew), "conv2d": ei.conv2d(ek, padding=1),
        "square": ex.square(), "pub": ex * 0.7, "div": ex / 5, "relu": ex.relu(),
        "lt": ex < ey, "gt": ex > 0.5, "ge": ex >= ey, "le": ex <= 1, "eq": ex == ey,
        "sign": ex.sign(), "abs": ex.abs(), "max": ew.max(dim=1)[0], "argmax": ew.argmax(dim=0),
        "where": crypten.where(ex < ey, ex, ey), "select": (ex < 0) * ex + (1 - (ex < 0)) * ey,
        "hardtanh": ex.hardtanh(), "min": ew.min(),
    }
    return {k_: _plain(v) for k_, v in out.items()}


def _count_provider_body(mode, *args):
    calls = []
    original = crypten.mpc.get_default_provider

    def counting():
        calls.append(1)
        return original()

    crypten.mpc.get_default_provider = counting
    try:
        if mode == "rss":
            with rss_backend.replicated_backend():
                res = _workload(*args)
                res["tree_max"] = _plain(rss_compare.max(crypten.cryptensor(args[2]), 1))
                res["rand"] = _plain(crypten.rand(4000))
        else:
            with crypten.cfg.temp_override({"mpc.protocol": mode}):
                res = _workload(*args)
    finally:
        crypten.mpc.get_default_provider = original
    return len(calls), res, str(crypten.cfg.mpc.protocol)


def test_no_provider_with_backend_and_baseline_unchanged(parties):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(20, generator=g) * 4, torch.randn(20, generator=g) * 4
    w = torch.randn(20, 6, generator=g)
    img, k = torch.randn(1, 2, 5, 5, generator=g), torch.randn(3, 2, 3, 3, generator=g)
    ours = parties.run(_count_provider_body, "rss", x, y, w, img, k, timeout=180)
    base = parties.run(_count_provider_body, "replicated", x, y, w, img, k, timeout=180)
    for (n_ours, r, proto_after), (n_base, b, _) in zip(ours, base):
        assert n_ours == 0, "a Beaver provider was used by the replicated backend"
        assert n_base > 0  # CrypTen's replicated mode does use the (dealer) provider
        assert proto_after != "rss"
        for key in b:  # same answers as CrypTen's own protocol
            torch.testing.assert_close(r[key].float(), b[key].float(), atol=2e-3, rtol=1e-3,
                                       msg=key)
        torch.testing.assert_close(r["relu"], x.relu(), atol=1e-3, rtol=0)
        torch.testing.assert_close(r["max"], w.max(1)[0], atol=1e-3, rtol=0)
        torch.testing.assert_close(r["tree_max"], w.max(1)[0], atol=1e-3, rtol=0)
        torch.testing.assert_close(r["select"], torch.where(x < 0, x, y), atol=1e-3, rtol=0)
        assert r["rand"].min() >= 0 and r["rand"].max() < 1
        assert abs(r["rand"].mean() - 0.5) < 0.03 and r["rand"].unique().numel() > 3000


def _enable_disable_body():
    rss_backend.enable()
    on = rss_backend.is_active()
    e = crypten.cryptensor(torch.tensor([-1.0, 2.0]))
    v = _plain(e.relu())
    rss_backend.disable()
    return on, rss_backend.is_active(), v


def test_enable_disable(parties):
    for on, off, v in parties.run(_enable_disable_body, timeout=60):
        assert on and not off
        torch.testing.assert_close(v, torch.tensor([0.0, 2.0]))


def _replica_carry_body(x):
    with rss_backend.replicated_backend():
        a = crypten.cryptensor(x) * 1.0  # truncated: replicated
        b = crypten.cryptensor(x) * 0.5
        m2 = crypten.cryptensor(x.view(8, 8)) * 1.0
        out = {}
        for name, make in (("stack", lambda: crypten.stack([a, b])),
                           ("int_mul", lambda: a * 3),
                           ("rsub", lambda: 2.5 - a),
                           ("view", lambda: crypten.stack([a, b])[1]),
                           ("cat", lambda: crypten.cat([a, b])),
                           ("transpose", lambda: m2.t().reshape(-1)),
                           ("narrow", lambda: m2.narrow(1, 2, 4)),
                           ("pad", lambda: m2.pad((1, 1), value=0.5)),
                           # issue 13: a scalar division of a transposed share, then a view
                           ("div_of_transposed", lambda: (m2.t() / 2).view(-1)),
                           ("unbind", lambda: m2.unbind(0)[3])):
            t = make()
            with CostMeter() as m:
                y = t * t  # replicated operands: only the truncation is sent
            out[name] = (m.total.bytes_sent / t.numel(), _plain(y))
        fresh = crypten.cryptensor(x)
        with CostMeter() as m:
            fresh * fresh
        out["fresh"] = (m.total.bytes_sent / x.numel(), None)
    return out


def test_local_ops_keep_the_replica_on_every_party(parties):
    x = torch.linspace(-3, 3, 64)
    m2 = x.view(8, 8)
    results = parties.run(_replica_carry_body, x, timeout=120)
    # exact truncation by 2^16: 16 B per element from two parties, 20 B from the (rotating) helper
    assert sorted(out["fresh"][0] for out in results) == [24, 24, 28]  # re-share 8 + trunc.
    for name in results[0]:
        if name != "fresh":
            assert sorted(out[name][0] for out in results) == [16, 16, 20], name
    out = results[0]
    expect = {"stack": torch.stack([x, x / 2]), "int_mul": 3 * x, "rsub": 2.5 - x, "view": x / 2,
              "cat": torch.cat([x, x / 2]), "transpose": m2.t().reshape(-1),
              "narrow": m2.narrow(1, 2, 4), "pad": torch.nn.functional.pad(m2, (1, 1), value=0.5),
              "div_of_transposed": (m2.t() / 2).reshape(-1), "unbind": m2[3]}
    for name, ref in expect.items():
        torch.testing.assert_close(out[name][1], ref ** 2, atol=1e-3, rtol=0, msg=name)


def _compiler_local_ops_body(x):
    """The compiler's share-wise ops (ops.local, split, cat) reach the replica through the
    observer install() registers; without it the next product re-shares."""
    aten = torch.ops.aten
    out = {}
    with rss_backend.replicated_backend():
        a = crypten.cryptensor(x.view(8, 8)) * 1.0  # truncated: replicated
        makers = (("local", lambda: ops.local(a, lambda s: s.t().reshape(-1))),
                  ("split", lambda: ops.lookup(aten.split.Tensor).fn(a, 4, 1)[1]),
                  ("cat", lambda: ops.lookup(aten.cat.default).fn([a, a * 1.0], 0)))
        for observed in (True, False):
            if not observed:
                sharewise.remove_local_op_observer(rss_arith.carry_local_op)
            try:
                for name, make in makers:
                    t = make()
                    with CostMeter() as m:
                        y = t * t
                    out[name, observed] = (m.total.bytes_sent / t.numel(), _plain(y))
            finally:
                sharewise.on_local_op(rss_arith.carry_local_op)
    return out


def test_compiler_local_ops_keep_the_replica_through_the_observer(parties):
    x = torch.linspace(-3, 3, 64)
    m2 = x.view(8, 8)
    results = parties.run(_compiler_local_ops_body, x, timeout=120)
    expect = {"local": m2.t().reshape(-1), "split": m2.split(4, 1)[1], "cat": torch.cat([m2, m2])}
    for name, ref in expect.items():
        # exact truncation only (16 B, 20 B from the helper); re-share + truncation without
        assert sorted(r[name, True][0] for r in results) == [16, 16, 20], name
        assert sorted(r[name, False][0] for r in results) == [24, 24, 28], name
        for observed in (True, False):
            torch.testing.assert_close(results[0][name, observed][1], ref ** 2, atol=1e-3, rtol=0)


def test_install_registers_the_share_wise_observer_and_uninstall_removes_it():
    was_installed = bool(rss_backend._SAVED)
    rss_backend.install()
    try:
        assert rss_arith.carry_local_op in sharewise.observers()
        rss_backend.uninstall()
        assert rss_arith.carry_local_op not in sharewise.observers()
    finally:
        if was_installed:
            rss_backend.install()
