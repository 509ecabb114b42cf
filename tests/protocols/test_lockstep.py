"""Lockstep branches (:mod:`protocols.replicated.lockstep`) in three real processes: the same
values as running the branches one after the other, and the rounds of the longest branch."""

import torch

import cipherdm_torch  # noqa: F401
import crypten

from cipherdm_torch import CostMeter
from cipherdm_torch.protocols import config
from cipherdm_torch.protocols.replicated import backend as rss_backend
from cipherdm_torch.protocols.replicated.lockstep import run_together


def _square_chain(x, n):
    for _ in range(n):
        x = x * x
    return x


def _body(a, b):
    rss_backend.install()
    out = {}
    with config.use("optimised", backend="rss"):
        def make_jobs():  # fresh inputs for each measurement (no replica cached by another)
            xa, xb = crypten.cryptensor(a), crypten.cryptensor(b)
            xc, xd = crypten.cryptensor(b), crypten.cryptensor(a + 1)  # no input shared between
            return (lambda: _square_chain(xa, 3), lambda: xb._ltz(),  # branches: the replicas
                    lambda: xc.relu() * xd)  # cached are then the same as in sequence
        with CostMeter() as alone:
            seq = [job() for job in make_jobs()]
        with CostMeter() as merged:
            together = run_together(*make_jobs())
        each = []
        for job in make_jobs():
            with CostMeter() as m:
                job()
            each.append(m.total.rounds)
        xa, xb = crypten.cryptensor(a), crypten.cryptensor(b)
        # settings a branch enters stay in that branch
        def inner():
            with config.use(exp_squarings=3):
                y = xa * xa
                return config.current().exp_squarings, y
        def outer():
            y = xb * xb
            return config.current().exp_squarings, y
        (k_in, _), (k_out, _) = run_together(inner, outer)
    out["seq"] = [t.get_plain_text() for t in seq]
    out["together"] = [t.get_plain_text() for t in together]
    out["rounds"] = (alone.total.rounds, merged.total.rounds, each)
    out["bytes"] = (alone.total.bytes_sent, merged.total.bytes_sent)
    out["settings"] = (k_in, k_out, config.current().exp_squarings)
    return out


def test_branches_share_rounds(parties):
    g = torch.Generator().manual_seed(5)
    a = torch.rand(64, generator=g) + 0.5
    b = torch.randn(64, generator=g) * 4
    results = parties.run(_body, a, b)
    sums = [sum(r["rounds"][1] for r in results), sum(r["rounds"][0] for r in results)]
    for r in results:
        seq, together = r["seq"], r["together"]
        for s, t in zip(seq, together):
            assert torch.allclose(s, t, atol=1e-3)
        assert torch.allclose(together[0], a ** 8, rtol=1e-2)
        assert torch.equal(together[1], (b < 0).float())
        assert torch.allclose(together[2], b.clamp(min=0) * (a + 1), atol=1e-3)
        assert r["settings"] == (3, config.Settings().exp_squarings, config.Settings().exp_squarings)
    # the same messages, fewer rounds (summed over the parties: which party helps a truncation,
    # sending 4 elements instead of 2, rotates with the call order)
    assert sum(r["bytes"][0] for r in results) == sum(r["bytes"][1] for r in results)
    # merged rounds: at most the longest branch's, far fewer than the sum (compared over all
    # three parties: one party's count depends on the rotating truncation helper)
    longest = sum(max(r["rounds"][2]) for r in results)
    assert sums[0] <= longest + 3
    assert sums[0] < 0.75 * sums[1]


def test_forked_streams_match_across_a_pair_and_differ_between_branches():
    """The two ends of a pair (party i's "next", party i+1's "prev": the same key) fork the
    same per-branch streams; different branches get unrelated streams."""
    from cipherdm_torch.mpc import prg

    key_a, key_b = bytes(range(16)), bytes(range(16, 32))
    saved = dict(prg._STREAMS)
    try:
        prg.install_streams({"next": prg.KeyStream(key_a), "prev": prg.KeyStream(key_b)})
        mine = prg.fork_streams(3)
        prg.install_streams({"prev": prg.KeyStream(key_a), "next": prg.KeyStream(key_b)})
        theirs = prg.fork_streams(3)
    finally:
        prg.install_streams(saved)
    for i in range(3):
        assert torch.equal(mine[i]["next"].ring((8,)), theirs[i]["prev"].ring((8,)))
        assert torch.equal(mine[i]["prev"].ring((8,)), theirs[i]["next"].ring((8,)))
    draws = [m["next"].ring((4,)) for m in mine]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def _nested_body(a, b):
    rss_backend.install()
    with config.use("optimised", backend="rss"):
        def jobs():
            xa, xb, xc = (crypten.cryptensor(t) for t in (a, b, b + 1))
            # outer branch 0 runs two inner branches of its own; outer branch 1 a chain
            return (lambda: run_together(lambda: _square_chain(xa, 2), lambda: xb._ltz()),
                    lambda: _square_chain(xc, 3))
        with CostMeter() as seq:
            j0, j1 = jobs()
            alone = [j0(), j1()]
        with CostMeter() as merged:
            nested = run_together(*jobs())
        each = []
        for job in (lambda: _square_chain(crypten.cryptensor(a), 2),
                    lambda: crypten.cryptensor(b)._ltz(),
                    lambda: _square_chain(crypten.cryptensor(b + 1), 3)):
            with CostMeter() as m:
                job()
            each.append(m.total.rounds)
    flat = lambda r: [t.get_plain_text() for t in (*r[0], r[1])]  # noqa: E731
    return {"alone": flat(alone), "nested": flat(nested),
            "rounds": (seq.total.rounds, merged.total.rounds, each)}


def test_nested_branches_merge_into_the_outer_rounds(parties):
    """A branch that runs branches of its own: same values, and the rounds of the longest of
    ALL the leaves (before stop 19 the inner branches ran one after the other)."""
    g = torch.Generator().manual_seed(6)
    a = torch.rand(32, generator=g) + 0.5
    b = torch.randn(32, generator=g)
    results = parties.run(_nested_body, a, b)
    for r in results:
        for s, t in zip(r["alone"], r["nested"]):
            assert torch.allclose(s, t, rtol=1e-3, atol=1e-3)
        assert torch.allclose(r["nested"][0], a ** 4, rtol=1e-2)
        assert torch.equal(r["nested"][1], (b < 0).float())
    longest = sum(max(r["rounds"][2]) for r in results)
    merged = sum(r["rounds"][1] for r in results)
    assert merged <= longest + 3, (merged, longest)
    assert merged < 0.75 * sum(r["rounds"][0] for r in results)
