"""Secure links, attacked from outside: impostors, tampering, replay, wire capture, keys.

The three parties' meshes run in threads of this process; a recording / tampering TCP
proxy sits on the link between party 1 and party 0 where a test needs the wire.
"""

import socket
import threading
import time

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from cipherdm_torch.mpc import identity
from cipherdm_torch.mpc.channel import ChannelError, Mesh, PeerHungError, wire_bytes
from cipherdm_torch.mpc.prg import KeyStream


class Proxy:
    """TCP forwarder to ``target`` that records (and may alter) the client -> server bytes."""

    def __init__(self, target, tamper=None):
        self.target, self.tamper = target, tamper
        self.up = bytearray()  # client -> server, as forwarded
        self.down = bytearray()  # server -> client
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.address = self.sock.getsockname()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        client, _ = self.sock.accept()
        server = socket.create_connection(self.target)
        threading.Thread(target=self._pump, args=(client, server, self.up, True),
                         daemon=True).start()
        self._pump(server, client, self.down, False)

    def _pump(self, src, dst, log, upstream):
        while True:
            try:
                chunk = src.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            if upstream and self.tamper is not None:
                chunk = self.tamper(bytes(chunk), len(log))
            log += chunk
            try:
                dst.sendall(chunk)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _connect_all(meshes, addresses_of, timeout):
    """Connect every mesh in its own thread (``addresses_of(rank)``); return the errors."""
    errors = []

    def connect(r):
        try:
            meshes[r].connect(addresses_of(r), timeout=timeout)
        except Exception as exc:  # reported by the caller
            errors.append(exc)
    threads = [threading.Thread(target=connect, args=(r,)) for r in range(len(meshes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _meshes(folder, proxy_factory=None, timeout=30.0, hang_timeout=None):
    """Three connected meshes; party 1 reaches party 0 through ``proxy_factory(address)``."""
    identity.create(str(folder))
    meshes = [Mesh(identity.load(str(folder), r, 3), timeout=timeout, hang_timeout=hang_timeout)
              for r in range(3)]
    addresses = [m.listen() for m in meshes]
    proxy = proxy_factory(addresses[0]) if proxy_factory else None

    def addresses_of(r):
        addr = list(addresses)
        if r == 1 and proxy is not None:
            addr[0] = proxy.address
        return addr
    errors = _connect_all(meshes, addresses_of, timeout)
    if errors:
        raise errors[0]
    return meshes, proxy


def _close(meshes):
    for m in meshes:
        m.close()


def test_links_carry_tensors_and_pairs_share_streams(tmp_path):
    meshes, _ = _meshes(tmp_path / "keys")
    try:
        x = torch.arange(100_000, dtype=torch.long)
        works = [meshes[1].isend(x, 0), meshes[0].isend(-x, 1)]
        got0, got1 = torch.empty_like(x), torch.empty_like(x)
        meshes[0].recv(got0, 1)
        meshes[1].recv(got1, 0)
        for w in works:
            w.wait()
        assert torch.equal(got0, x) and torch.equal(got1, -x)
        for r in range(3):  # party r's "next" is party r+1's "prev"; the others differ
            nxt = meshes[r].streams()["next"].ring((64,))
            assert torch.equal(nxt, meshes[(r + 1) % 3].streams()["prev"].ring((64,)))
            assert not torch.equal(nxt, meshes[r].streams()["prev"].ring((64,)))
    finally:
        _close(meshes)


def test_impostor_is_refused_before_anything_is_sent(tmp_path):
    identity.create(str(tmp_path / "keys"))
    identity.create(str(tmp_path / "impostor"))  # a different identity for "party 1"
    real = [Mesh(identity.load(str(tmp_path / "keys"), r, 3), timeout=10) for r in range(3)]
    addresses = [m.listen() for m in real]
    # the impostor trusts the real certificates of 0 and 2, but holds its own key as "party 1"
    fake = identity.load(str(tmp_path / "impostor"), 1, 3)
    real_certs = identity.load(str(tmp_path / "keys"), 0, 3).certs_pem
    fake = identity.Credentials(1, fake.key_file, fake.cert_file,
                                [real_certs[0], fake.certs_pem[1], real_certs[2]])
    impostor = Mesh(fake, timeout=10)
    impostor.listen()
    with pytest.raises(ChannelError):
        impostor.connect(addresses, timeout=5)  # dials party 0 first: refused by party 0
    errors = _connect_all(real, lambda r: addresses, 30)
    try:
        assert not errors, errors
        assert real[0].refused, "party 0 should have turned the impostor away"
        assert sorted(real[0].links) == [1, 2]
    finally:
        _close(real)
        impostor.close()


def test_client_refuses_a_server_with_the_wrong_identity(tmp_path):
    identity.create(str(tmp_path / "keys"))
    identity.create(str(tmp_path / "other"))
    # a listener that presents another deployment's "party 0" certificate
    fake0 = Mesh(identity.load(str(tmp_path / "other"), 0, 3), timeout=5)
    addr = fake0.listen()
    threading.Thread(target=lambda: _swallow(fake0.connect, [addr] * 3, timeout=5),
                     daemon=True).start()
    p1 = Mesh(identity.load(str(tmp_path / "keys"), 1, 3), timeout=5)
    p1.listen()
    with pytest.raises(ChannelError, match="party 0"):
        p1.connect([addr, None, None], timeout=5)
    p1.close()
    fake0.close()


def _swallow(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception:
        pass


def _send_big(meshes, n=50_000):
    x = torch.arange(n, dtype=torch.long) << 16
    w = meshes[1].isend(x, 0)
    return x, w


def test_flipped_byte_stops_the_run_naming_the_link(tmp_path):
    state = {"done": False}

    def flip(chunk, offset):
        # after the handshake and hello (a few KB), flip one byte of the next large chunk
        if not state["done"] and offset > 4000 and len(chunk) > 100:
            state["done"] = True
            b = bytearray(chunk)
            b[len(b) // 2] ^= 0x01
            return bytes(b)
        return chunk

    meshes, proxy = _meshes(tmp_path / "keys", lambda a: Proxy(a, flip), timeout=10)
    try:
        _ = meshes[1].isend(torch.zeros(512, dtype=torch.long), 0)  # pushes past the offset
        meshes[0].recv(torch.empty(512, dtype=torch.long), 1)
        x, _w = _send_big(meshes)
        with pytest.raises(ChannelError, match=r"parties 0 and 1.*tampered"):
            meshes[0].recv(torch.empty_like(x), 1)
        assert state["done"]
    finally:
        _close(meshes)


def test_replayed_record_is_rejected(tmp_path):
    state = {"seen": None, "done": False}

    def replay(chunk, offset):
        if offset > 4000 and state["seen"] is None and len(chunk) > 100:
            state["seen"] = chunk
            return chunk
        if state["seen"] is not None and not state["done"]:
            state["done"] = True
            return state["seen"] + chunk  # the earlier bytes again
        return chunk

    meshes, proxy = _meshes(tmp_path / "keys", lambda a: Proxy(a, replay), timeout=10)
    try:
        _ = meshes[1].isend(torch.zeros(512, dtype=torch.long), 0)
        meshes[0].recv(torch.empty(512, dtype=torch.long), 1)
        x = torch.arange(20_000, dtype=torch.long)
        for _k in range(3):
            meshes[1].isend(x, 0)
        with pytest.raises(ChannelError):
            for _k in range(3):
                got = meshes[0].recv(torch.empty_like(x), 1)
                assert torch.equal(got, x)
    finally:
        _close(meshes)


def test_wire_holds_no_plaintext_and_costs_what_we_report(tmp_path):
    # no heartbeat within the test (every 900 s): the wire is messages only (see the next test)
    meshes, proxy = _meshes(tmp_path / "keys", lambda a: Proxy(a), hang_timeout=3600)
    try:
        before = len(proxy.up)
        secret = (torch.arange(1, 30_001, dtype=torch.long) * 7919) << 16  # distinctive values
        sizes = [secret.numel() * 8, 8, 0, 100_000]
        msgs = [secret, torch.tensor([12345 << 16]), torch.empty(0, dtype=torch.long),
                torch.full((12_500,), 42 << 16, dtype=torch.long)]
        for m in msgs:
            meshes[1].isend(m, 0)
        for m in msgs:
            got = meshes[0].recv(torch.empty_like(m), 1)
            assert torch.equal(got, m)
        wire = bytes(proxy.up)
        for k in range(0, 30_000, 997):  # any 2 consecutive plaintext elements
            assert secret[k:k + 2].numpy().tobytes() not in wire
        assert (torch.full((2,), 42 << 16).numpy().tobytes()) not in wire
        expected = sum(wire_bytes(s) for s in sizes)
        assert meshes[1].links[0].heartbeats_sent == 0
        assert len(proxy.up) - before == expected, (len(proxy.up) - before, expected)
        assert expected <= 1.05 * sum(sizes) + 4 * 200
        stats = meshes[1].stats()
        assert stats["payload_sent"] == sum(sizes) and stats["messages_sent"] == len(sizes)
    finally:
        _close(meshes)


# ---------------------------------------------------------------- liveness (heartbeats)

def _mute(link):
    """This link stops sending heartbeats (as if its process were stopped)."""
    link._beat = lambda: setattr(link, "_last_tx", time.monotonic())


def test_heartbeats_carry_no_payload_and_are_counted_apart(tmp_path):
    # hang_timeout 4 s: a heartbeat every 1 s while the link is idle
    meshes, proxy = _meshes(tmp_path / "keys", lambda a: Proxy(a), hang_timeout=4)
    try:
        link, back = meshes[1].links[0], meshes[0].links[1]
        x = torch.arange(1000, dtype=torch.long)
        meshes[1].isend(x, 0)
        meshes[0].recv(torch.empty_like(x), 1)
        # a quiet point: the last write was that message (the next heartbeat is 1 s away)
        before, beats0, got0, stats0 = (len(proxy.up), link.heartbeats_sent,
                                        back.heartbeats_received, meshes[1].stats())
        time.sleep(4.5)  # idle: about 4 heartbeats
        y = torch.arange(10, dtype=torch.long)
        sent = meshes[1].isend(y, 0)
        assert torch.equal(meshes[0].recv(torch.empty_like(y), 1), y)  # reads past the beats
        sent.wait()  # the sender thread counts a message once it has written it
        # heartbeats keep coming while we read the counters (sender, proxy and receiver are
        # three threads): read until one snapshot is consistent, or fail after 20 s
        deadline = time.monotonic() + 20
        while True:
            after, beats1, got1, stats1 = (len(proxy.up), link.heartbeats_sent,
                                           back.heartbeats_received, meshes[1].stats())
            beats = beats1 - beats0
            if (got1 - got0 == beats and after - before == wire_bytes(y.numel() * 8)
                    + beats * wire_bytes(0)) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert beats >= 2, beats
        assert got1 - got0 == beats  # every heartbeat read, none taken for a message
        assert after - before == wire_bytes(y.numel() * 8) + beats * wire_bytes(0)
        # messages only in payload / wire / message counts; heartbeats apart
        assert stats1["payload_sent"] - stats0["payload_sent"] == 80
        assert stats1["wire_sent"] - stats0["wire_sent"] == wire_bytes(80)
        assert stats1["messages_sent"] - stats0["messages_sent"] == 1
        all_beats = stats1["heartbeats_sent"] - stats0["heartbeats_sent"]  # to parties 0 and 2
        assert all_beats >= beats
        assert stats1["heartbeat_wire"] - stats0["heartbeat_wire"] == all_beats * wire_bytes(0)
    finally:
        _close(meshes)


def test_silent_peer_is_named_within_the_hang_timeout(tmp_path):
    meshes, _ = _meshes(tmp_path / "keys", hang_timeout=2)
    try:
        _mute(meshes[1].links[0])
        t0 = time.monotonic()
        with pytest.raises(PeerHungError, match="party 1 is not responding") as err:
            meshes[0].recv(torch.empty(4, dtype=torch.long), 1)
        took = time.monotonic() - t0
        assert (err.value.rank, err.value.peer) == (0, 1)
        assert 2 <= took < 2 + 10, took
    finally:
        _close(meshes)


def test_a_peer_that_beats_is_waited_for_beyond_the_hang_timeout(tmp_path):
    meshes, _ = _meshes(tmp_path / "keys", hang_timeout=2)
    try:
        x = torch.arange(8, dtype=torch.long)
        box = {}

        def receive():
            try:
                box["got"] = meshes[0].recv(torch.empty_like(x), 1)
            except BaseException as exc:
                box["error"] = exc
        t = threading.Thread(target=receive)
        t.start()
        time.sleep(7)  # 3.5 x hang_timeout of "computing" at party 1: its heartbeats go on
        meshes[1].isend(x, 0)
        t.join(30)
        assert "error" not in box, box.get("error")
        assert torch.equal(box["got"], x)
        assert meshes[0].links[1].heartbeats_received >= 3
    finally:
        _close(meshes)


def test_a_peer_that_beats_but_sends_no_data_hits_the_link_timeout(tmp_path):
    # heartbeats every 1 s against a 4 s hang bound: a loaded machine cannot starve them
    meshes, _ = _meshes(tmp_path / "keys", timeout=8, hang_timeout=4)
    try:
        with pytest.raises(ChannelError, match="alive, its heartbeats arrive") as err:
            meshes[0].recv(torch.empty(4, dtype=torch.long), 1)
        assert not isinstance(err.value, PeerHungError)
    finally:
        _close(meshes)


def test_a_send_stuck_on_a_silent_peer_is_named(tmp_path):
    meshes, _ = _meshes(tmp_path / "keys", hang_timeout=2)
    try:
        big = torch.zeros(8 << 20, dtype=torch.long)  # 64 MB: far beyond the socket buffers
        _mute(meshes[0].links[1])  # party 0 neither reads nor beats
        t0 = time.monotonic()
        with pytest.raises(PeerHungError, match="party 0 is not responding") as err:
            meshes[1].send(big, 0)
        assert (err.value.rank, err.value.peer) == (1, 0)
        assert time.monotonic() - t0 < 2 + 10
    finally:
        _close(meshes)


def test_a_send_to_a_busy_peer_that_beats_waits(tmp_path):
    meshes, _ = _meshes(tmp_path / "keys", hang_timeout=2)
    try:
        big = torch.arange(8 << 20, dtype=torch.long)
        box = {}

        def send():
            try:
                meshes[1].send(big, 0)
                box["sent"] = time.monotonic()
            except BaseException as exc:
                box["error"] = exc
        t = threading.Thread(target=send)
        t.start()
        time.sleep(7)  # party 0 computes without reading; it beats, party 1 waits on
        assert "error" not in box, box.get("error")
        got = meshes[0].recv(torch.empty_like(big), 1)
        t.join(60)
        assert "error" not in box, box.get("error")
        assert torch.equal(got, big)
    finally:
        _close(meshes)


# ---------------------------------------------------------------- the stream cipher

def test_keystream_matches_aes128_ctr_known_answer():
    # NIST SP 800-38A, F.5.1 CTR-AES128.Encrypt, blocks 1-2
    ks = KeyStream(bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c"),
                   bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"))
    plain = bytes.fromhex("6bc1bee22e409f96e93d7e117393172a" "ae2d8a571e03ac9c9eb76fac45af8e51")
    stream = ks.bytes(32).numpy().tobytes()
    cipher = bytes(a ^ b for a, b in zip(stream, plain))
    assert cipher.hex() == "874d6191b620e3261bef6864990db6ce" "9806f66b7970fdff8617187bb9fffdff"


def test_every_key_bit_matters_and_streams_look_uniform():
    key = bytes(range(16))
    base = KeyStream(key).ring((256,))
    for bit in range(128):
        k = bytearray(key)
        k[bit // 8] ^= 1 << (bit % 8)
        other = KeyStream(bytes(k)).ring((256,))
        assert (other != base).float().mean() > 0.95, bit  # a 128-bit key, all bits used
    data = KeyStream(key).bytes(1 << 20).numpy()
    counts = np.bincount(data, minlength=256)
    assert chisquare(counts)[1] > 1e-6
    bits = KeyStream(key).bits((1 << 16,)).float().mean().item()
    assert abs(bits - 0.5) < 0.01
    # consecutive draws continue the stream (never reuse keystream)
    s = KeyStream(key)
    a, b = s.bytes(1000), s.bytes(1000)
    assert torch.equal(torch.cat([a, b]), KeyStream(key).bytes(2000))


def test_full_duplex_traffic_with_heartbeats_keeps_the_link(tmp_path):
    # OpenSSL forbids two threads in one TLS connection at once: a read racing the sender
    # thread's write (a heartbeat every 50 ms here, and the other direction's data) used to
    # end in a spurious "link closed" within seconds
    meshes, _ = _meshes(tmp_path / "keys", hang_timeout=0.2)
    errors, counts = [], [0, 0]

    def side(me, peer):
        try:
            for _ in range(150):  # the same count on both sides: every send has its receive
                size = (1, 1000, 100_000)[counts[me] % 3]
                works = meshes[me].isend(torch.arange(size) * (me + 1), peer)
                got = torch.empty(size, dtype=torch.long)
                meshes[me].recv(got, peer)
                works.wait()
                assert torch.equal(got, torch.arange(size) * (peer + 1))
                counts[me] += 1
                if counts[me] % 10 == me:
                    time.sleep(0.08)  # idle past a heartbeat period while the peer reads
        except BaseException as exc:  # reported below
            errors.append(exc)
    try:
        threads = [threading.Thread(target=side, args=(0, 1)),
                   threading.Thread(target=side, args=(1, 0))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert counts == [150, 150], counts
        assert meshes[0].links[1].heartbeats_sent + meshes[1].links[0].heartbeats_sent > 0
    finally:
        _close(meshes)


def test_a_ring_of_large_sends_waited_before_the_receives_completes(tmp_path):
    # CrypTen's replication: each party sends to its successor and waits for that send before
    # it reads its predecessor. 16 MB outgrows the socket buffers, so every send stalls unless
    # a waiting send reads what has arrived (it used to hang until the link timeout)
    meshes, _ = _meshes(tmp_path / "keys", timeout=20)
    n = 2 << 20
    box = {}

    def party(r):
        try:
            got = torch.empty(n, dtype=torch.long)
            work = meshes[r].isend(torch.full((n,), r), (r + 1) % 3)
            recv = meshes[r].irecv(got, (r - 1) % 3)
            work.wait()
            recv.wait()
            box[r] = got
        except BaseException as exc:  # reported below
            box[r] = exc
    try:
        threads = [threading.Thread(target=party, args=(r,)) for r in range(3)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(torch.is_tensor(box.get(r)) for r in range(3)), box
        for r in range(3):
            assert torch.equal(box[r], torch.full((n,), (r - 1) % 3))
        assert time.monotonic() - t0 < 15
    finally:
        _close(meshes)


def test_staged_device_tensors_put_the_same_frames_on_the_wire(tmp_path, monkeypatch):
    # GPU shares cross through host memory (channel.staged); forced here on CPU tensors, the
    # wire carries exactly the unstaged frames and a receive lands only on wait()
    from cipherdm_torch.mpc import channel

    meshes, proxy = _meshes(tmp_path / "keys", lambda a: Proxy(a), hang_timeout=3600)
    try:
        msgs = [torch.arange(40_000, dtype=torch.long) * 3, torch.tensor([7], dtype=torch.long)]
        before = len(proxy.up)
        for m in msgs:
            meshes[1].isend(m, 0)
        plain = [meshes[0].recv(torch.empty_like(m), 1) for m in msgs]
        unstaged = len(proxy.up) - before
        monkeypatch.setattr(channel, "staged", lambda t: True)
        before = len(proxy.up)
        sends = [meshes[1].isend(m, 0) for m in msgs]
        targets = [torch.full_like(m, -1) for m in msgs]
        works = [meshes[0].irecv(t, 1) for t in targets]
        for w in works + sends:
            w.wait()
        assert len(proxy.up) - before == unstaged == sum(wire_bytes(m.numel() * 8) for m in msgs)
        for m, t, p in zip(msgs, targets, plain):
            assert torch.equal(t, m) and torch.equal(p, m)
        # a staged receive fills its target on wait(), not before
        late = torch.full((5,), -1, dtype=torch.long)
        work = meshes[0].irecv(late, 1)
        meshes[1].isend(torch.arange(5), 0).wait()
        work.link.complete(work)  # data read into the host buffer ...
        assert torch.equal(late, torch.full((5,), -1))  # ... not yet in the target
        work.wait()
        assert torch.equal(late, torch.arange(5))
    finally:
        _close(meshes)
