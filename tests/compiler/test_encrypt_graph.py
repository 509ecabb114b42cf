"""Graph export, public-subgraph detection, the unsupported-op report and the range warning."""

import warnings

import pytest
import torch
import torch.nn as nn

import cipherdm_torch
from cipherdm_torch import FixedPointRangeWarning, encrypt
from cipherdm_torch.compiler import graph, ops
from cipherdm_torch.compiler.encrypted_module import fixed_point_limit


def _tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=2,
                       add_attention=False).eval()


def test_timestep_embedding_is_public_and_weights_secret():
    model = _tiny_unet()
    inputs = graph.bind_inputs(model, (torch.randn(2, 1, 8, 8), torch.tensor([3, 3])))
    g = graph.export_graph(model, inputs)
    secret = graph.secret_nodes(g, set(graph.DEFAULT_PUBLIC))
    by_target = {}
    for n in g.nodes():
        by_target.setdefault(str(n.target), []).append(n.name)
    # sinusoidal embedding of the public timestep: computed in plaintext
    for target in ("aten.sin.default", "aten.cos.default", "aten.exp.default"):
        assert by_target[target] and not set(by_target[target]) & secret
    assert set(by_target["aten.conv2d.default"]) <= secret
    assert set(g.state.values()) == set(model.state_dict())
    assert not graph.unsupported_ops(g, secret)
    # the same model with the timestep declared secret needs sin/cos on shares: reported
    secret_t = graph.secret_nodes(g, set())
    problems = graph.unsupported_ops(g, secret_t)
    assert any("aten.sin" in p for p in problems) and any("aten.cos" in p for p in problems)


class _Bad(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4))

    def forward(self, x, t):
        h = self.inner(x)
        h = torch.floor(h)                      # unsupported on secrets
        v, _ = torch.sort(h, dim=-1)            # unsupported on secrets
        h = h + torch.floor(t)[:, None]         # floor of a public value: fine
        return torch.nn.functional.dropout(v + h, 0.1, training=True)  # training dropout


def test_unsupported_ops_listed_together_with_location():
    model = _Bad()
    with pytest.raises(cipherdm_torch.UnsupportedOpsError) as info:
        g = graph.export_graph(model, {"x": torch.randn(2, 4), "t": torch.ones(2)})
        problems = graph.unsupported_ops(g, graph.secret_nodes(g, {"t"}))
        raise cipherdm_torch.UnsupportedOpsError(problems)
    problems = info.value.problems
    text = str(info.value)
    assert len(problems) == 3, text
    assert "aten.floor.default" in text and "aten.sort" in text and "dropout" in text
    assert "training mode" in text
    assert "test_encrypt_graph.py" in text  # source line of the offending call
    assert sum("floor" in p for p in problems) == 1  # the public floor is not reported


def test_registry_covers_the_unet_ops():
    names = ops.supported_ops()
    for op in ("aten.conv2d.default", "aten.linear.default", "aten.group_norm.default",
               "aten.silu.default", "aten.scaled_dot_product_attention.default",
               "aten.upsample_nearest2d.vec", "aten.layer_norm.default", "aten.gelu.default",
               "aten.cat.default", "aten.embedding.default", "aten.softmax.int"):
        assert op in names


def test_fixed_point_limit():
    assert fixed_point_limit(16) == pytest.approx(2 ** 15.5)
    assert fixed_point_limit(20) < fixed_point_limit(16)


class _Loud(nn.Module):
    def __init__(self, gain):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        with torch.no_grad():
            self.lin.weight.fill_(gain)

    def forward(self, x):
        return self.lin(x) * 2


def _warn_body(gain, precision_bits):
    info = cipherdm_torch.party()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # owner: the loud weights; others: any weights of the same architecture
        enc = encrypt(_Loud(gain if info.is_owner else 0.0), (torch.ones(1, 8),),
                      precision_bits=precision_bits)
        # an unsupported model fails on every party before anything is shared
        with cipherdm_torch.CostMeter() as meter:
            try:
                encrypt(_Bad(), (torch.ones(2, 4), torch.ones(2)), public=("t",))
                raised = False
            except cipherdm_torch.UnsupportedOpsError:
                raised = True
    msgs = [str(w.message) for w in caught if issubclass(w.category, FixedPointRangeWarning)]
    return {"warnings": msgs, "max": max(enc.calibration.values()) if enc.calibration else None,
            "raised": raised, "bytes": meter.total.bytes_sent + meter.total.bytes_received}


def test_range_warning_on_owner_and_early_unsupported_error(parties):
    results = parties.run(_warn_body, 3000.0, 20)  # |activation| 2*8*3000 = 48000 > 0.25*2^11.5
    owner = cipherdm_torch.Roles().owner
    for rank, r in enumerate(results):
        assert r["raised"] and r["bytes"] == 0  # nothing communicated before the error
        if rank == owner:
            assert r["max"] == pytest.approx(48000, rel=1e-3)
            assert r["warnings"] and "fixed-point limit" in r["warnings"][0]
        else:
            assert r["warnings"] == [] and r["max"] is None  # only the owner calibrates
