"""Ops added for diffusers coverage, each against plaintext in three processes, on CrypTen's
protocol and on the replicated backend: padding (zero, constant, reflect, negative = crop),
eval-mode BatchNorm (folded into weights the owner computes), leaky_relu, max_pool2d,
hardtanh / clamp as comparisons, in-place adds, and public parameters (public_params=)."""

import pytest
import torch
import torch.nn.functional as F

import cipherdm_torch
from cipherdm_torch import encrypt
from cipherdm_torch.compiler import graph as graph_mod
from cipherdm_torch.protocols import config


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.bn1 = torch.nn.BatchNorm1d(4, affine=False)
        self.pool = torch.nn.MaxPool2d(3, stride=2, padding=1)
        self.proj = torch.nn.Parameter(torch.randn(4), requires_grad=False)  # public by nature

    def forward(self, x, t):
        y = self.bn(self.conv(x))
        y = F.leaky_relu(y, 0.2)
        p = self.pool(y)                                          # 8x8 -> 4x4
        z = F.hardtanh(p)
        z += p                                                     # in-place add
        z.add_(0.25)
        out = torch.clamp(z, -0.5, 0.7) + F.pad(p, (1, 1, 1, 1), value=0.5)[..., 1:-1, 1:-1]
        out = out + p.clamp(min=0.1) + F.pad(p, (1, 2, 0, 1), mode="reflect")[..., :4, 1:5]
        out = out + F.pad(y, (-2, -2, -2, -2))                   # negative padding crops
        emb = torch.sin(t[:, None] * self.proj[None, :])          # public-only: plaintext
        v = self.bn1(out.mean((2, 3))) + emb
        return out, v


def make_toy(seed):
    torch.manual_seed(seed)
    m = Toy()
    with torch.no_grad():  # non-trivial running statistics
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 2, 8, 8, generator=g), torch.tensor([3.0, 7.0])


def _toy_body(backend):
    info = cipherdm_torch.party()
    x, t = _inputs()
    with config.use(backend=backend):  # "rss" or "crypten"
        model = make_toy(0 if info.is_owner else 10 + info.rank)
        enc = encrypt(model, {"x": x, "t": t}, public_params=["proj"])
        sx = enc.share_input("x", x if info.is_user else None)
        out, v = enc(sx, t)
        g = enc.graph
        folded = sum(1 for k in g.state.values() if k.startswith("folded::"))
        left = [str(n.target) for n in g.nodes() if "batch_norm" in str(n.target)
                or str(n.target).endswith("_.Tensor")]
        return enc.reveal(out), enc.reveal(v), folded, left


@pytest.mark.parametrize("backend", ["crypten", "rss"])
def test_new_ops_match_plaintext(parties, backend):
    results = parties.run(_toy_body, backend, timeout=240)
    x, t = _inputs()
    with torch.no_grad():
        ref_out, ref_v = make_toy(0)(x, t)
    out, v, folded, left = results[cipherdm_torch.Roles().user]
    assert folded >= 4 and left == []  # BN scale / shift folded, no in-place op left
    for got, ref in ((out, ref_out), (v, ref_v)):
        err = (got - ref).abs().max().item()
        assert err <= 0.01 * ref.abs().max().item() + 2e-3, err
    for rank, r in enumerate(results):
        if rank != cipherdm_torch.Roles().user:
            assert r[0] is None and r[1] is None


def test_secret_parameter_feeding_sin_is_refused_with_public_params_hint():
    x, t = _inputs()
    g = graph_mod.export_graph(make_toy(0), {"x": x, "t": t})
    graph_mod.rewrite(g)
    secret = graph_mod.secret_nodes(g, set(graph_mod.DEFAULT_PUBLIC))
    names = []
    problems = graph_mod.unsupported_ops(g, secret, names=names)
    assert len(problems) == 1 and "aten.sin" in problems[0]
    hint = "\n".join(graph_mod.hints(g, secret, names))
    assert "public_params=['proj']" in hint
    # declared public, the projection is a constant and nothing is unsupported
    g = graph_mod.rewrite(graph_mod.export_graph(make_toy(0), {"x": x, "t": t},
                                                 public_state={"proj"}))
    secret = graph_mod.secret_nodes(g, set(graph_mod.DEFAULT_PUBLIC))
    assert graph_mod.unsupported_ops(g, secret) == []


class TimeNamed(torch.nn.Module):
    def forward(self, sample, time, noise_level):
        return sample * torch.cos(time)[:, None] + noise_level.sin()[:, None]


def test_common_timestep_names_are_public_and_errors_suggest_public():
    x, t = torch.randn(2, 3), torch.tensor([1.0, 2.0])
    g = graph_mod.export_graph(TimeNamed(), {"sample": x, "time": t, "noise_level": t.clone()})
    secret = graph_mod.secret_nodes(g, set(graph_mod.DEFAULT_PUBLIC))
    assert graph_mod.unsupported_ops(g, secret) == []
    secret = graph_mod.secret_nodes(g, {"noise_level"})
    names = []
    problems = graph_mod.unsupported_ops(g, secret, names=names)
    assert problems and "aten.cos" in problems[0]
    hint = "\n".join(graph_mod.hints(g, secret, names))
    assert "public=" in hint and "'time'" in hint
