"""The softmax row max on 16-bit words (:mod:`protocols.replicated.word16_max`) in three real
processes: the exact lift back to 64 bits, the max within 3 2^-6 of the true one on rows of
every length (ties, rows of one and two entries, logits hundreds apart), the result
replicated, and its cost side by side with the 64-bit tree it replaces."""

import torch

import cipherdm_torch  # noqa: F401
import crypten

from cipherdm_torch import CostMeter
from cipherdm_torch.protocols import config, max_tree
from cipherdm_torch.protocols.replicated import arith as ra, backend as rss_backend, \
    word16_max

SHIFT = 10  # config.Settings().coarse_compare_shift
SLACK = 3 * 2.0 ** (SHIFT + 1 - 16)  # narrowed one bit coarser than the comparisons


def _lift_body(delta):
    rank = crypten.communicator.get().get_rank()
    out = []
    with rss_backend.replicated_backend():
        x = crypten.cryptensor(delta, precision=0)
        xs = x.share
        w = word16_max.narrow16(xs, ra.replicate(xs), 0)
        for _ in range(3):  # every party in the helper role once
            with CostMeter() as m:
                share, nxt = word16_max.lift16(w)
            out.append((share, nxt, m.total.as_dict()))
    return rank, out


def test_lift16_is_exact_for_every_helper(parties):
    g = torch.Generator().manual_seed(3)
    delta = torch.cat([torch.tensor([0, 1, 2 ** 14, 2 ** 15 - 2, 2 ** 15 - 1]),
                       torch.randint(0, 2 ** 15, (4000,), generator=g)])
    results = dict(parties.run(_lift_body, delta, timeout=300))
    for call in range(3):
        shares = [results[r][call][0] for r in range(3)]
        assert torch.equal(shares[0] + shares[1] + shares[2], delta)
        for r in range(3):
            assert torch.equal(results[r][call][1], shares[(r + 1) % 3])  # replicated
            assert results[r][call][2]["rounds"] <= 2
        # the helper sends 2 + 18 B per element in round 1, A and B 8 B each in round 2
        assert sum(results[r][call][2]["bytes_sent"] for r in range(3)) == 36 * delta.numel()


def _max_body(rows, dims):
    rank = crypten.communicator.get().get_rank()
    out = {"rank": rank, "tops": [], "cost": {}}
    with rss_backend.replicated_backend(), config.use("optimised"):
        for x, dim in zip(rows, dims):
            ex = crypten.cryptensor(x)
            with config.coarse_comparisons():
                top = max_tree.ternary_max(ex, dim, keepdim=True)
            out["tops"].append((top.get_plain_text(), top.share.clone(),
                                ra.cached_next(top.share)))
        # cost side by side: 16-bit words vs the 64-bit selection (same coarse comparisons)
        x = crypten.cryptensor(rows[-1])
        ra.replicate(x.share)
        with config.coarse_comparisons():
            with CostMeter() as words, ra.exchange_log() as words_log:
                max_tree.ternary_max(x, -1)
            with CostMeter() as wide, ra.exchange_log() as wide_log:
                max_tree.ternary_tree(x, -1)
        out["cost"] = (words.total.as_dict(), wide.total.as_dict())
        out["waits"] = (words_log, wide_log)
    return out


def test_row_max_on_words_within_slack_and_replicated(parties):
    g = torch.Generator().manual_seed(11)
    rows = [torch.randn(5, 1, generator=g),  # rows of one entry
            torch.randn(7, 2, generator=g) * 3,
            torch.randn(6, 3, generator=g),
            torch.randn(4, 5, generator=g) * 100,
            torch.full((3, 9), 1.5),  # all tied
            (torch.rand(2, 37, generator=g) - 0.5) * 500,  # entries up to 500 apart
            torch.randn(9, 4, generator=g),  # along dim 0
            torch.randn(6, 196, generator=g) * 3]
    rows[2][:, 1] = rows[2][:, 0] + 2 ** -12  # near-ties below the coarse resolution
    dims = [-1, -1, -1, -1, -1, -1, 0, -1]
    results = sorted(parties.run(_max_body, rows, dims, timeout=300), key=lambda r: r["rank"])
    for k, (x, dim) in enumerate(zip(rows, dims)):
        truth = x.max(dim, keepdim=True)[0]
        for r in results:
            top = r["tops"][k][0]
            assert top.shape == truth.shape
            assert float((top - truth).abs().max()) <= SLACK + 2 ** -15, (k, top, truth)
        for i in range(3):
            replica = results[i]["tops"][k][2]
            assert replica is not None
            assert torch.equal(replica, results[(i + 1) % 3]["tops"][k][1])
    # rows of 196: the 64-bit selection re-shares 8 words of 8 B per triple, these 2 B (bytes
    # summed over the parties: which party helps a lift rotates)
    sent = [sum(r["cost"][k]["bytes_sent"] for r in results) for k in range(2)]
    assert sent[0] < 0.5 * sent[1], sent
    # rounds in which any party waits (a party's own count depends on which party helps each
    # truncation and lift, a rotation that continues from earlier tests): the lift rides in
    # the last level's rounds
    rounds = [ra.rounds_any_party([r["waits"][k] for r in results]) for k in range(2)]
    assert rounds[0] is not None and rounds[0] <= rounds[1], rounds
