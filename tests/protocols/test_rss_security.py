"""Security of the replicated backend: a single party's view does not depend on the secret.

A party's *view* here is every tensor it receives on its secure links
(recorded by the link, below the communicator API) plus the shares it ends up holding. For a fixed
secret and for varied secrets, the byte distributions of every view tensor (and
of sums / differences / XORs of pairs of them) must be indistinguishable
(two-sample chi-square), and fully random messages must be uniform. The
chained-multiplication leak of CrypTen's ``replicated`` mode is shown by an
actual key-recovery attack on party 1's view, which fails on this backend.
"""

import itertools

import numpy as np
import torch
from scipy.stats import chi2_contingency, chisquare

import cipherdm_torch  # noqa: F401
import crypten
import crypten.communicator as comm

from cipherdm_torch.protocols import config, functions as P, max_tree
from cipherdm_torch.protocols.replicated import arith as ra, backend as rss_backend, \
    compare as rss_compare
from party_views import whole_view_recorder

P_MIN = 1e-7  # per-test threshold; a few thousand tests per run -> false alarm < 1e-3


class _Recorder:
    """Record every payload this party receives on its secure links while active."""

    def __enter__(self):
        self.got, self._stop = whole_view_recorder(include_sent=False)
        return self

    def __exit__(self, *exc):
        self._stop()


def _view_body(kind, secrets):
    """Run protocol ``kind`` on each secret tensor; return this party's view for each."""
    views = []
    with rss_backend.replicated_backend():
        for s in secrets:
            ex = crypten.cryptensor(s, src=0)
            ey = crypten.cryptensor(torch.full_like(s, 1.75), src=1)
            ra.replicate_many([ex.share, ey.share])  # inputs replicated beforehand
            ra.helper_rotation.calls = 0  # same truncation helper for both secrets (all parties)
            with _Recorder() as rec:
                if kind == "mul":
                    out = ex * ey
                elif kind == "relu":
                    out = ex.relu()
                elif kind == "lt":
                    out = rss_compare.lt(ex, 0.5)
                elif kind == "silu":  # comparison and polynomial side by side (lockstep)
                    with config.use("optimised"):
                        out = P.silu(ex)
                elif kind == "max3":  # masked comparison bits, products prepared in the tree
                    with config.use("optimised"), config.coarse_comparisons():
                        out = max_tree.ternary_max(ex.reshape(-1, 8), -1)
                elif kind == "softmax":  # coarse max, exp, 1/s with nested side-by-side parts
                    with config.use("optimised"):
                        out = P.softmax(ex.reshape(-1, 8), -1)
                elif kind == "softmax_matmul":  # attention: normalised after e @ v
                    with config.use("optimised"):
                        out = P.softmax_matmul(ex.reshape(-1, 8), ey.reshape(-1, 8)[:8])
                else:
                    raise ValueError(kind)
                nxt = ra.cached_next(out.share)  # the replica, if the output has one
                out.share.add_(0)  # nothing revealed; force contiguous shares
            own = [out.share.clone()] + ([nxt.clone()] if nxt is not None else [])
            views.append([t.clone() for t in rec.got] + own)
    return views


def _byte_columns(t):
    a = t.contiguous().numpy()
    return a.view(np.uint8).reshape(a.size, a.itemsize) if a.dtype != np.uint8 else \
        a.reshape(-1, 1)


def _two_sample_p(a, b):
    ca = np.bincount(a, minlength=256)
    cb = np.bincount(b, minlength=256)
    keep = (ca + cb) > 0
    if keep.sum() < 2:
        return 1.0
    return chi2_contingency(np.stack([ca[keep], cb[keep]]))[1]


def _indistinguishable(view_fixed, view_varied, pairs=True):
    """Smallest p-value over all bytes of all view tensors (and pairwise combinations)."""
    ps = []
    tensors = list(zip(view_fixed, view_varied))
    combos = list(tensors)
    if pairs:
        for (fa, va), (fb, vb) in itertools.combinations(tensors, 2):
            if fa.shape == fb.shape and fa.dtype == fb.dtype and \
                    fa.dtype in (torch.long, torch.int32, torch.int16):  # ring words
                combos += [(fa + fb, va + vb), (fa - fb, va - vb), (fa ^ fb, va ^ vb)]
    for f, v in combos:
        bf, bv = _byte_columns(f), _byte_columns(v)
        for col in range(bf.shape[1]):
            ps.append(_two_sample_p(bf[:, col], bv[:, col]))
    return min(ps), len(ps)


def test_statistic_detects_a_leak():
    # power check of the test itself: a "message" equal to share + secret must be flagged
    g = torch.Generator().manual_seed(0)
    n = 8192
    share = torch.randint(-(2 ** 63), 2 ** 63 - 1, (n,), generator=g)
    fixed = torch.full((n,), 3 << 16)
    varied = torch.randint(-(100 << 16), 100 << 16, (n,), generator=g)
    other = torch.randint(-(2 ** 63), 2 ** 63 - 1, (n,), generator=g)
    p, _ = _indistinguishable([share, fixed - share], [other, varied - other])
    assert p < 1e-12


def test_views_independent_of_secret(parties):
    g = torch.Generator().manual_seed(6)
    n = 8192
    fixed = torch.full((n,), 3.25)
    varied = (torch.rand(n, generator=g) - 0.5) * 200
    for kind in ("mul", "lt", "relu"):
        views = parties.run(_view_body, kind, [fixed, varied], timeout=300)
        for rank, (vf, vv) in enumerate(views):
            assert len(vf) == len(vv) and len(vf) >= 2
            p, m = _indistinguishable(vf, vv)
            assert p > P_MIN, (kind, rank, p, m)
            # every received message is uniform in its random bytes
            for t in vv[:-2]:
                cols = _byte_columns(t)
                usable = cols.shape[1] if t.dtype == torch.uint8 else 6  # trunc: top 2 sign bytes
                for col in range(usable):
                    counts = np.bincount(cols[:, col], minlength=256)
                    assert chisquare(counts)[1] > P_MIN, (kind, rank, t.dtype, col)


def test_side_by_side_silu_view_independent_of_secret(parties):
    """SiLU runs its comparison and its polynomial side by side (lockstep: merged rounds, forked
    pairwise streams): every party's whole view is independent of the secret. (Not every
    message is uniform here: the polynomial's first truncation takes x times a public multiple
    of 2^20, whose shares have zero low bits, and the shares of it a party receives are ones it
    already holds as replicas.)"""
    g = torch.Generator().manual_seed(6)
    n = 8192
    fixed = torch.full((n,), 3.25)
    varied = (torch.rand(n, generator=g) - 0.5) * 200
    views = parties.run(_view_body, "silu", [fixed, varied], timeout=300)
    for rank, (vf, vv) in enumerate(views):
        assert len(vf) == len(vv) and len(vf) >= 2
        p, m = _indistinguishable(vf, vv)
        assert p > P_MIN, ("silu", rank, p, m)


def test_max_and_softmax_views_independent_of_secret(parties):
    """The ternary max (on 16-bit words: comparison bits opened under a random bit's mask, the
    selection's products re-shared during the carry tree, the last level's candidates lifted
    back to 64 bits in its rounds), the softmax around it (exp's squarings on 32-bit words)
    and attention's softmax times v: every party's whole view is independent of the secret
    (the max with pairs of messages too)."""
    g = torch.Generator().manual_seed(7)
    n = 8192
    fixed = torch.full((n,), 3.25)
    varied = (torch.rand(n, generator=g) - 0.5) * 40
    for kind, pairs in (("max3", True), ("softmax", False), ("softmax_matmul", False)):
        views = parties.run(_view_body, kind, [fixed, varied], timeout=600)
        for rank, (vf, vv) in enumerate(views):
            assert len(vf) == len(vv) and len(vf) >= 2
            p, m = _indistinguishable(vf, vv, pairs=pairs)
            assert p > P_MIN, (kind, rank, p, m)


def _chain_attack_body(mode, x):
    """y = x * x; w = y * y with integer encoding; party 1 tries to recover x from its view."""
    ctx = rss_backend.replicated_backend() if mode == "rss" else \
        crypten.cfg.temp_override({"mpc.protocol": mode})
    with ctx:
        ex = crypten.cryptensor(x, src=0, precision=0)
        with _Recorder() as rec:
            y = ex * ex
            w = y * y
        correct = bool(torch.equal(w.get_plain_text().long(), x.long() ** 4))
    if comm.get().get_rank() != 1:
        return None, correct
    own = ex.share
    got = rec.got
    # CrypTen: P1 receives x_0 (from P0) twice, then y_0 = x_0^2 + 2 x_0 x_2 twice.
    # rss: P1 receives x_2 (from P2), then y_2 = x_2^2 + 2 x_2 x_0 + alpha_2.
    a, y_a = got[0], got[2] if mode != "rss" else got[1]
    inv = a.clone()
    for _ in range(6):  # Newton: inverse of an odd number mod 2^64
        inv = inv * (2 - a * inv)
    h = (y_a - a * a) >> 1
    other = h * inv  # the unknown share, mod 2^63
    guess = a + own + other
    guess = (guess << 1) >> 1  # reduce mod 2^63, signed
    odd = (a & 1) == 1
    rate = (guess[odd] == x.long()[odd]).float().mean().item()
    return rate, correct


def test_chained_multiplication_leak_baseline_not_rss(parties):
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-50, 50, (4000,), generator=g).float()
    base = parties.run(_chain_attack_body, "replicated", x, timeout=300)
    ours = parties.run(_chain_attack_body, "rss", x, timeout=300)
    assert all(c for _, c in base) and all(c for _, c in ours)
    # CrypTen replicated: party 1 recovers every secret whose x_0 share is odd (about half)
    assert base[1][0] == 1.0
    # this backend: the same attack recovers nothing
    assert ours[1][0] < 0.01


def _truncation_attack_body(values, d):
    """Each non-helper party of one truncation by 2^d, as an attacker: rebuild the opened
    value c = x + 2^62 + r from its whole view (sent and received payloads) and subtract its
    own mask (its first draw from the helper's stream), then compare the low d bits with x."""
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor

    rank = comm.get().get_rank()
    helper = (2 + ra.helper_rotation.calls) % 3
    a, b = (helper + 1) % 3, (helper + 2) % 3
    z = ArithmeticSharedTensor.PRZS(values.size()).share
    if rank == 0:
        z = z + values
    draws, original = [], ra.rand_ring

    def recording(size, which, device=None):
        out = original(size, which, device)
        draws.append((which, out))
        return out
    ra.rand_ring = recording
    mesh = cipherdm_torch.mpc.secure_comm.mesh()
    mesh.recorder = []
    try:
        ra.truncate_shares(z.contiguous(), 2 ** d)
    finally:
        ra.rand_ring = original
        view, mesh.recorder = mesh.recorder, None
    if rank == helper:
        return None
    n = values.numel()
    sent = [t for kind, peer, _, t in view if kind == "sent"]
    got = {peer: t for kind, peer, _, t in reversed(view) if kind == "recv"}  # first per peer
    first = [t for kind, peer, _, t in view if kind == "recv"]
    low = (1 << d) - 1
    best = 0.0
    for clear in (False, True):  # the mask as drawn, or with its low d bits cleared
        if rank == a:  # c = my masked share + B's share + the helper's masked share
            mask = next(t for which, t in draws if which == "prev")
            mask = mask & ~low if clear else mask
            c = sent[0] + first[0] + first[1]
        else:  # c = A's masked share + my share + the helper's share (its first n elements)
            mask = next(t for which, t in draws if which == "next")
            mask = mask & ~low if clear else mask
            helper_part = got[helper].reshape(-1)[:8 * n].view(torch.long)
            c = got[a].reshape(-1) + sent[0].reshape(-1) + helper_part + mask
        guess = (c.reshape(-1) - mask.reshape(-1) - 2 ** 62) & low
        best = max(best, (guess == (values & low)).float().mean().item())
    return best


def test_truncation_hides_the_low_bits_from_each_opener(parties):
    # a regression test for a real mistake: with the low bits of both openers' masks cleared
    # (and no helper-only mask), each opener read x mod 2^d off c - (its mask): 100% hits
    g = torch.Generator().manual_seed(11)
    values = torch.randint(-(2 ** 40), 2 ** 40, (20_000,), generator=g)
    for d in (16, 8):
        hits = [h for h in parties.run(_truncation_attack_body, values, d) if h is not None]
        assert len(hits) == 2
        assert all(h < 4 * 2.0 ** -d + 0.01 for h in hits), (d, hits)
