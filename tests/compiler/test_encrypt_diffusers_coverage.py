"""Every diffusers UNet family the project claims, encrypted, against plaintext in three
processes, on the replicated backend (and CrypTen's own protocol in the slow set).

Block types: DownBlock2D / AttnDownBlock2D / ResnetDownsampleBlock2D / SkipDownBlock2D /
AttnSkipDownBlock2D and their up twins; time embeddings positional, learned and fourier
(NCSN++: the Gaussian Fourier projection declared with ``public_params=``); class embeddings
none / "timestep" / "identity"; act_fn silu / mish / gelu; a ``UNet2DConditionModel`` with
cross-attention on a secret encoder_hidden_states. Outputs are compared unclamped with a
tolerance relative to the output scale: max|diff| <= 0.05 max|ref| + 0.02.
"""

import pytest
import torch

import cipherdm_torch
from cipherdm_torch import encrypt
from cipherdm_torch.compiler import graph as G
from cipherdm_torch.compiler.graph import DEFAULT_PUBLIC, UnsupportedOpsError
from cipherdm_torch.mpc.cost import CostMeter
from cipherdm_torch.protocols import config

PLAIN = dict(down_block_types=("DownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "UpBlock2D"))
SKIP = dict(in_channels=3, out_channels=3, block_out_channels=(32, 32), norm_num_groups=8,
            attention_head_dim=8, down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
            up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"))

# name -> (UNet2DModel config, encrypt kwargs, extra input)
MODELS = {
    "attn_positional_silu": (dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D")), {}, None),
    "resnet_sample_learned_mish": (
        dict(down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"),
             time_embedding_type="learned", num_train_timesteps=100, act_fn="mish"), {}, None),
    "skip_fourier_gelu": (dict(SKIP, time_embedding_type="fourier", act_fn="gelu"),
                          {"public_params": ["time_proj"]}, None),
    "skip_positional_silu": (dict(SKIP), {}, None),
    "class_identity_gelu": (dict(PLAIN, class_embed_type="identity", act_fn="gelu"), {},
                            "identity"),
    "class_timestep_public": (dict(PLAIN, class_embed_type="timestep"),
                              {"public": list(DEFAULT_PUBLIC) + ["class_labels"]}, "public"),
    "cond_cross_attention": ("condition", {}, "text"),
}


def make(name, seed):
    from diffusers import UNet2DConditionModel, UNet2DModel

    cfg = MODELS[name][0]
    torch.manual_seed(seed)
    if cfg == "condition":
        return UNet2DConditionModel(
            sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
            layers_per_block=1, norm_num_groups=4, attention_head_dim=4, cross_attention_dim=12,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    base = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                layers_per_block=1, norm_num_groups=4, attention_head_dim=4)
    base.update(cfg)
    return UNet2DModel(**base).eval()


def inputs(name):
    g = torch.Generator().manual_seed(11)
    cfg, _, extra = MODELS[name]
    channels = 3 if cfg != "condition" and cfg.get("in_channels") == 3 else 1
    x = torch.randn(2, channels, 8, 8, generator=g)
    fourier = cfg != "condition" and cfg.get("time_embedding_type") == "fourier"
    t = torch.tensor(2.5) if fourier else 37   # noise level sigma / a Python int timestep
    kw = {}
    if extra == "identity":
        kw["class_labels"] = torch.randn(2, 32, generator=g)   # time_embed_dim = 4 * 8
    elif extra == "public":
        kw["class_labels"] = torch.tensor([3, 9])
    elif extra == "text":
        kw["encoder_hidden_states"] = torch.randn(2, 5, 12, generator=g)
    return x, t, kw


def _body(names, backend):
    info = cipherdm_torch.party()
    out = {}
    with config.use(backend=backend):  # "rss" or "crypten"
        for name in names:
            model = make(name, 0 if info.is_owner else 50 + info.rank)
            x, t, kw = inputs(name)
            enc = encrypt(model, {"sample": x, "timestep": t, **kw}, **MODELS[name][1])
            secret = {k: enc.share_input(k, v if info.is_user else None) for k, v in kw.items()
                      if k not in enc.public}
            public = {k: v for k, v in kw.items() if k in enc.public}
            sx = enc.share_input("sample", x if info.is_user else None)
            res, meter = enc.profile(sample=sx, timestep=t, **secret, **public)
            out[name] = {"opened": enc.reveal(res[0]), "mb": meter.total.bytes_sent / 1e6,
                         "rounds": meter.total.rounds, "seconds": meter.total.seconds,
                         "graphs": len(enc._graphs)}
    return out


def reference(name):
    x, t, kw = inputs(name)
    with torch.no_grad():
        return make(name, 0)(x, t, **kw).sample


def check(results, names):
    user = cipherdm_torch.Roles().user
    report = {}
    for name in names:
        got, ref = results[user][name]["opened"], reference(name)
        err = (got - ref).abs().max().item()
        scale = ref.abs().max().item()
        p0 = results[0][name]
        report[name] = (err, scale, p0["mb"], p0["rounds"], p0["seconds"])
        print(f"{name}: max|diff| {err:.4f} (max|ref| {scale:.3f}), party 0: "
              f"{p0['mb']:.2f} MB, {p0['rounds']} rounds, {p0['seconds']:.1f} s")
        assert err <= 0.05 * scale + 0.02, f"{name}: max|diff| {err:.4f}, max|ref| {scale:.3f}"
        assert results[user][name]["graphs"] == 1
        for rank, r in enumerate(results):
            if rank != user:
                assert r[name]["opened"] is None
    return report


FAST = ["attn_positional_silu", "cond_cross_attention"]
SLOW = [n for n in MODELS if n not in FAST]


@pytest.mark.parametrize("name", FAST)
def test_attention_unets_on_rss(parties, name):
    check(parties.run(_body, [name], "rss", timeout=420), [name])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["rss", "crypten"])
def test_block_type_matrix(parties, backend):
    names = SLOW if backend == "rss" else list(MODELS)
    check(parties.run(_body, names, backend, timeout=1800), names)


def _refused_body(name):
    info = cipherdm_torch.party()
    x, t, kw = inputs(name)
    with CostMeter() as meter:
        try:
            encrypt(make(name, 0 if info.is_owner else 9), {"sample": x, "timestep": t, **kw})
        except UnsupportedOpsError as exc:
            return str(exc), meter.total.bytes_sent
    return None, meter.total.bytes_sent


def test_secret_timestep_class_labels_are_refused_before_any_traffic(parties):
    """class_embed_type="timestep" feeds the labels through sin / cos: refused with a hint."""
    for rank, (msg, sent) in enumerate(parties.run(_refused_body, "class_timestep_public",
                                                   timeout=240)):
        assert msg is not None and sent == 0, (rank, msg, sent)
        assert "class_labels" in msg and "public=" in msg, msg


def test_fourier_without_public_params_names_the_fix():
    x, t, _ = inputs("skip_fourier_gelu")
    g = G.rewrite(G.export_graph(make("skip_fourier_gelu", 0), {"sample": x, "timestep": t}))
    secret = G.secret_nodes(g, set(DEFAULT_PUBLIC))
    names = []
    problems = G.unsupported_ops(g, secret, names=names)
    assert problems and all("time_proj" in p for p in problems)
    assert "public_params=['time_proj.weight']" in "\n".join(G.hints(g, secret, names))
