"""CrypTen fast paths (cipherdm_torch.mpc.crypten_speed): same answers as CrypTen's own code."""

import pytest
import torch
from omegaconf import OmegaConf

import cipherdm_torch  # noqa: F401  (applies the compatibility layer)
from cipherdm_torch.mpc.crypten_compat import crypten
from cipherdm_torch.mpc.crypten_speed import CachedConfig
from crypten.config import cfg

KEYS = ["mpc.protocol", "mpc.provider", "encoder.precision_bits", "debug.validation_mode",
        "functions.max_method", "functions.exp_iterations", "nn.dpsmpc.protocol"]


def _truth(key):
    """The value in the OmegaConf object itself, not through any cache."""
    return OmegaConf.select(vars(cfg)["config"], key)


def _through_cfg(key):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


@pytest.fixture
def saved_cfg():
    old = vars(cfg)["config"]
    yield
    cfg.set_config(old)


def _check_all():
    for key in KEYS:
        assert _through_cfg(key) == _truth(key), key
        assert cfg[key] == _truth(key), key


def test_cfg_is_cached_and_answers_like_omegaconf(saved_cfg):
    assert isinstance(cfg, CachedConfig)
    _check_all()
    for key in KEYS:  # second reads come from the cache and still agree
        assert _through_cfg(key) == _truth(key)


def test_every_kind_of_change_is_seen(saved_cfg):
    _check_all()
    with cfg.temp_override({"mpc.protocol": "rss", "encoder.precision_bits": 12}):
        assert cfg.mpc.protocol == "rss" and cfg.encoder.precision_bits == 12
        _check_all()
        with cfg.temp_override({"mpc.protocol": "beaver"}):
            assert cfg.mpc.protocol == "beaver"
        assert cfg.mpc.protocol == "rss"
    _check_all()
    cfg.mpc.protocol = "replicated"            # a write through a section, as CrypTen documents
    assert cfg.mpc.protocol == "replicated" and _truth("mpc.protocol") == "replicated"
    cfg.debug["validation_mode"] = True         # item syntax
    assert cfg.debug.validation_mode is True
    cfg.config.functions.max_method = "pairwise"  # the raw OmegaConf object, taken now
    assert cfg.functions.max_method == "pairwise"
    cfg.load_config(None)                        # the defaults again
    assert cfg.mpc.protocol == "beaver" and cfg.debug.validation_mode is False
    _check_all()
    fresh = OmegaConf.create({"mpc": {"protocol": "x", "provider": "y", "active_security": False}})
    cfg.set_config(fresh)
    assert cfg.mpc.protocol == "x"
    with pytest.raises(Exception):
        cfg.encoder.precision_bits  # noqa: B018  (absent in the new config, as in CrypTen)


def test_falsy_values_are_cached_as_values(saved_cfg):
    cfg.debug.validation_mode = False
    assert cfg.debug.validation_mode is False
    assert cfg.debug.validation_mode is False


def _empty_tensors():
    from crypten.mpc import MPCTensor
    from crypten.mpc.ptype import ptype

    original = MPCTensor.__init__.__wrapped__
    out = {}
    for kind in (ptype.arithmetic, ptype.binary):
        fast = MPCTensor([], ptype=kind)
        slow = MPCTensor.__new__(MPCTensor)
        original(slow, [], ptype=kind)
        out[kind.name] = [(t.share.shape, t.share.dtype, t.encoder.scale, t.ptype == kind)
                          for t in (fast, slow)]
    x = crypten.cryptensor(torch.arange(6.0).reshape(2, 3))
    copy = x.shallow_copy()
    out["copy_is_view"] = copy.share is x.share
    out["stacked"] = crypten.stack([x, copy]).get_plain_text()
    out["from_shares"] = MPCTensor.from_shares(x.share).get_plain_text()
    return out


def test_empty_mpc_tensor_matches_cryptens_own(parties):
    for r in parties.run(_empty_tensors):
        for kind in ("arithmetic", "binary"):
            fast, slow = r[kind]
            assert fast == slow, kind
            assert fast[0] == torch.Size([0])
        assert r["copy_is_view"]
        x = torch.arange(6.0).reshape(2, 3)
        torch.testing.assert_close(r["stacked"], torch.stack([x, x]))
        torch.testing.assert_close(r["from_shares"], x)


def test_attribute_fast_path_answers_like_cryptens_dispatch(saved_cfg, monkeypatch):
    """Plain attributes come straight from the object; functions, operators and in-place forms
    still take CrypTen's dispatch; with validation mode on every read takes CrypTen's path."""
    from crypten.cryptensor import CrypTensor
    from crypten.mpc import MPCTensor

    fast = CrypTensor.__getattribute__
    assert getattr(fast, "_cipherdm_fast_attribute", False)
    original = fast.__wrapped__
    t = MPCTensor([])  # no communication: an empty sharing
    for name in ("share", "_tensor", "encoder", "ptype", "size", "dim", "requires_grad",
                 "__class__", "mul", "add", "__add__", "neg_", "copy_", "sum"):
        a, b = fast(t, name), original(t, name)
        if callable(a) and hasattr(a, "__func__"):
            assert a.__func__ is b.__func__, name
        elif not callable(a):
            assert a is b or a == b, name
        else:
            assert type(a) is type(b), name
    # validation mode on: the read takes CrypTen's path, which validates it
    seen = []
    monkeypatch.setattr("crypten.debug.validate_correctness",
                        lambda self, fn, name: seen.append(name) or fn)
    _ = t.ptype
    cfg.debug.validation_mode = True
    enc = t.encoder
    cfg.debug.validation_mode = False
    assert enc is original(t, "encoder")
    _ = t.ptype
    assert "encoder" in seen and "ptype" not in seen  # (encoder reads _tensor: validated too)
