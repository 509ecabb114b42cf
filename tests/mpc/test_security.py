"""The secrets stay where they belong: keyed randomness, process boundaries, desync detector.

(The whole-view tests of secure sampling are in test_pipelines.py and test_rss_security.py;
the link attacks in test_channel.py.)
"""

import pytest
import torch

import cipherdm_torch
from cipherdm_torch import PartyError, party
from cipherdm_torch.mpc.prg import KeyStream


def _randomness_body():
    import crypten
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor

    from cipherdm_torch.mpc import prg, secure_comm
    from cipherdm_torch.protocols.replicated import arith as ra

    rank = party().rank
    m = secure_comm.mesh()
    offset = prg.stream("next").drawn
    values = ra.rand_ring((1000,), "next")
    ra.rand_ring((1000,), "prev")  # the neighbour's matching draw: streams stay aligned
    fresh = KeyStream(m.stream_key(rank))
    fresh.bytes(offset)
    aes = fresh.ring((1000,))
    # what the old code did: MT19937 from CrypTen's (clear-text exchanged) seed
    seed = crypten.generators["next"][torch.device("cpu")].initial_seed()
    mt = torch.randint(-(2 ** 63), 2 ** 63 - 1, (1000,),
                       generator=torch.Generator().manual_seed(seed))
    zero = ArithmeticSharedTensor.PRZS((4096,)).share  # CrypTen's own zero sharing
    local = [ArithmeticSharedTensor.PRSS((4,)).share for _ in range(2)]
    return {"values": values, "aes": aes, "mt": mt, "zero": zero, "local": local}


def test_pairwise_randomness_is_keyed_aes_not_mersenne_twister(parties):
    out = parties.run(_randomness_body, timeout=120)
    for r in out:
        assert torch.equal(r["values"], r["aes"])  # AES-128-CTR under the agreed pair key
        assert not torch.equal(r["values"], r["mt"])  # not CrypTen's MT19937 stream
        assert not torch.equal(r["local"][0], r["local"][1])
    # CrypTen's PRZS now draws from the keyed streams, and the three shares still cancel
    assert torch.equal(sum(r["zero"] for r in out), torch.zeros(4096, dtype=torch.long))
    assert (out[0]["zero"] != 0).float().mean() > 0.99


def _kwargs_body(**kwargs):
    return sorted(kwargs)


def test_private_arguments_reach_only_their_party(parties):
    got = parties.run(_kwargs_body, public=1, private={1: {"seed": 7}}, timeout=60)
    assert got == [["public"], ["public", "seed"], ["public"]]


def test_sample_command_sends_the_seed_and_labels_to_the_user_only(monkeypatch, tmp_path):
    from cipherdm_torch.pipelines import job

    seen = {}

    def fake_launch(fn, *args, private=None, **kwargs):
        seen.update(args=args, kwargs=kwargs, private=private)
        raise RuntimeError("stop here")

    monkeypatch.setattr(job, "launch", fake_launch)
    spec = job.SampleSpec(model=job.embedded_model_dir(), labels=[3, 1, 4], seed=271828)
    with pytest.raises(RuntimeError, match="stop here"):
        job.run_job(spec, str(tmp_path))
    text = repr((seen["args"], seen["kwargs"]))
    assert "271828" not in text and "[3, 1, 4]" not in text  # nothing secret for every party
    assert seen["private"] == {1: {"seed": 271828, "labels": [3, 1, 4]}}  # the user (rank 1)
    with pytest.raises(RuntimeError, match="stop here"):
        job.run_job(spec, str(tmp_path), check=True)
    assert set(seen["private"]) == {0, 1}  # --check: the owner's debugging tool


def _desync_body():
    import crypten

    from cipherdm_torch.mpc.channel import op_label
    from cipherdm_torch.protocols.replicated import arith as ra, backend as rss_backend

    x = crypten.cryptensor(torch.ones(8), src=0)
    with rss_backend.replicated_backend():
        with op_label("injected.reshare"):
            if party().rank != 2:  # party 2 "forgets" a re-share the others do
                ra.replicate(x.share)
        with op_label("next.square"):
            return (x * x).get_plain_text()


def test_injected_desync_is_reported_with_the_op_on_every_party(parties):
    with pytest.raises(PartyError) as err:
        parties.run(_desync_body, timeout=120)
    text = str(err.value)
    assert "desync" in text
    for rank in range(3):  # every party names the operation it was at
        assert f"party {rank} at op" in text or f"party {rank} stopped at op" in text, text
    assert "injected.reshare" in text and "next.square" in text
