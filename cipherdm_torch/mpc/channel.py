"""Secure point-to-point links between the parties: mutually authenticated TLS 1.3.

Why: shares, masks and the pair keys must not cross the network in the clear, and a party
must be sure who is at the other end. Every pair of parties holds one TLS 1.3 connection
(the higher rank dials the lower one); both ends present their certificate and accept the
peer only if its certificate is exactly the one configured for that rank
(:mod:`cipherdm_torch.mpc.identity`). TLS encrypts and authenticates every record and
numbers them, so a tampered, dropped, reordered or replayed record stops the run with a
:class:`ChannelError` naming the link. gloo carries no data at all once the links are up.

Framing and the desync detector: each message is a fixed 68-byte header (magic, per-link
message number, payload length, the sender's current operation label) followed by the
payload. The receiver checks the number, the length and the label against its own
expectation before it reads the payload, so parties that took different branches stop
with a :class:`DesyncError` naming the operation on each side (and tell the other parties,
so every party reports its own operation) instead of a gloo abort or a hang. The check
compares integers and 48 bytes per message; it is always on.

Pair keys: after the handshake each side sends 32 fresh random bytes over the link; the
pair's stream keys are SHA-256 of both contributions (domain-separated per direction), so
they come from an authenticated key exchange and never travel in the clear.

Threads: each link has one sender thread (so two parties sending large messages to each
other cannot deadlock on full socket buffers); receives are read in the caller's thread
in the order they were posted.
"""

from __future__ import annotations

import collections
import hashlib
import os
import socket
import ssl
import struct
import threading
import time
import queue
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from cipherdm_torch.mpc.identity import Credentials, fingerprint
from cipherdm_torch.mpc.prg import KeyStream

__all__ = ["ChannelError", "DesyncError", "Mesh", "op_label", "current_label", "HEADER",
           "wire_bytes", "tls_record_overhead"]

HEADER = struct.Struct("<4sQQ48s")
MAGIC = b"CDM1"
ABORT = b"CDMX"
HELLO = b"CDMH"
TLS_RECORD = 16384  # max plaintext bytes per TLS record
TLS_RECORD_OVERHEAD = 22  # TLS 1.3: 5-byte header + content type + 16-byte AEAD tag


def tls_record_overhead(nbytes: int) -> int:
    """Bytes TLS 1.3 adds to one write of ``nbytes`` (full records of 16 KiB)."""
    return TLS_RECORD_OVERHEAD * max(1, -(-nbytes // TLS_RECORD))


def wire_bytes(payload: int) -> int:
    """Bytes one framed message of ``payload`` bytes puts on the wire (header + TLS records)."""
    over = tls_record_overhead(HEADER.size)
    if payload:
        over += tls_record_overhead(payload)
    return HEADER.size + payload + over


class ChannelError(RuntimeError):
    """A link failed: peer gone, authentication failure, tampering, timeout."""


class DesyncError(ChannelError):
    """The parties disagree on which message comes next (different branches taken)."""


# ---------------------------------------------------------------- operation labels

_LABELS: List[str] = []


@contextmanager
def op_label(name: str) -> Iterator[None]:
    """Tag every message sent inside the block with ``name`` (e.g. the graph node)."""
    _LABELS.append(name)
    try:
        yield
    finally:
        _LABELS.pop()


def current_label() -> str:
    return _LABELS[-1] if _LABELS else ""


def _label_bytes(label: str) -> bytes:
    return label.encode("utf-8", "replace")[:48].ljust(48, b"\0")


def _label_str(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def _as_bytes_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    if not t.is_contiguous():
        raise ValueError("the channel sends and receives contiguous tensors only")
    if t.device.type != "cpu":
        raise ValueError("the channel moves CPU tensors; copy device tensors first")
    if t.numel() == 0:
        return memoryview(bytearray(0))
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


# ---------------------------------------------------------------- one link

class Work:
    """A posted send or receive; :meth:`wait` completes it (CrypTen / gloo style)."""

    def __init__(self, link: "Link", tensor: torch.Tensor, label: str):
        self.link, self.tensor, self.label = link, tensor, label
        self.done = threading.Event()
        self.error: Optional[BaseException] = None

    def is_completed(self) -> bool:
        return self.done.is_set()


class _SendWork(Work):
    def wait(self, timeout=None):
        if not self.done.wait(self.link.timeout):
            raise ChannelError(f"link to party {self.link.peer}: send timed out after "
                               f"{self.link.timeout:.0f} s at op {self.label!r}")
        if self.error is not None:
            raise self.error
        return True


class _RecvWork(Work):
    def wait(self, timeout=None):
        self.link.complete(self)
        if self.error is not None:
            raise self.error
        return True


class Link:
    """The TLS connection to one peer, with its sender thread and posted receives."""

    def __init__(self, mesh: "Mesh", peer: int, sock: ssl.SSLSocket, timeout: float):
        self.mesh, self.peer, self.sock, self.timeout = mesh, peer, sock, timeout
        sock.settimeout(timeout)
        self.sent_msgs = self.recv_msgs = 0
        self.payload_sent = self.wire_sent = 0
        self._queue: "queue.Queue" = queue.Queue()
        self._pending: "collections.deque[_RecvWork]" = collections.deque()
        self._read_lock = threading.Lock()
        self._broken: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._send_loop, daemon=True,
                                        name=f"cipherdm-send-{mesh.rank}to{peer}")
        self._thread.start()

    # -------------------------------------------------------------- sending
    def post_send(self, tensor: torch.Tensor, label: Optional[str] = None) -> _SendWork:
        label = current_label() if label is None else label
        tensor = tensor.contiguous()
        work = _SendWork(self, tensor, label)
        header = HEADER.pack(MAGIC, self.sent_msgs, tensor.numel() * tensor.element_size(),
                             _label_bytes(label))
        self.sent_msgs += 1
        recorder = self.mesh.recorder
        if recorder is not None:
            recorder.append(("sent", self.peer, label, tensor.clone()))
        self._queue.put((header, tensor, work))
        return work

    def _send_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            header, tensor, work = item
            try:
                if self._broken is not None:
                    raise self._broken
                self.sock.sendall(header)
                payload = _as_bytes_view(tensor)
                if len(payload):
                    self.sock.sendall(payload)
                self.payload_sent += len(payload)
                self.wire_sent += wire_bytes(len(payload))
            except BaseException as exc:  # report on wait(); later sends fail the same way
                err = exc if isinstance(exc, ChannelError) else self._error(exc, "send",
                                                                            work.label)
                self._broken = err
                work.error = err
            work.done.set()

    def send_abort(self, message: str) -> None:
        """Tell the peer this party stopped (best effort, bounded wait).

        Queued behind this link's pending sends, so the sender thread stays the only
        writer of the TLS socket and the abort frame is never interleaved with a payload.
        """
        data = torch.frombuffer(bytearray(message.encode("utf-8", "replace")[:4000]),
                                dtype=torch.uint8)
        work = _SendWork(self, data, current_label())
        self._queue.put((HEADER.pack(ABORT, 0, data.numel(), _label_bytes(work.label)), data,
                         work))
        work.done.wait(2.0)

    # -------------------------------------------------------------- receiving
    def post_recv(self, tensor: torch.Tensor, label: Optional[str] = None) -> _RecvWork:
        if not tensor.is_contiguous():
            raise ValueError("receive buffers must be contiguous")
        work = _RecvWork(self, tensor, current_label() if label is None else label)
        self._pending.append(work)
        return work

    def complete(self, work: _RecvWork) -> None:
        """Read posted receives in order until ``work`` is filled."""
        with self._read_lock:
            while not work.done.is_set():
                head = self._pending.popleft()
                try:
                    self._read_into(head)
                except BaseException as exc:
                    head.error = exc
                    for w in self._pending:
                        w.error = exc
                        w.done.set()
                    self._pending.clear()  # ``work`` was among them unless it was ``head``
                head.done.set()

    def _read_exact(self, view: memoryview, what: str, label: str) -> None:
        pos, n = 0, len(view)
        while pos < n:
            try:
                k = self.sock.recv_into(view[pos:], n - pos)
            except BaseException as exc:
                raise self._error(exc, what, label) from exc
            if k == 0:
                raise self._closed(what, label)
            pos += k

    def _read_into(self, work: _RecvWork) -> None:
        raw = bytearray(HEADER.size)
        self._read_exact(memoryview(raw), "a message header", work.label)
        magic, seq, nbytes, peer_label = HEADER.unpack(bytes(raw))
        peer_label = _label_str(peer_label)
        if magic == ABORT:
            msg = bytearray(nbytes)
            self._read_exact(memoryview(msg), "an abort message", work.label)
            raise DesyncError(f"party {self.mesh.rank} stopped at op {work.label!r}: party "
                              f"{self.peer} stopped the run ({msg.decode(errors='replace')})")
        expected = work.tensor.numel() * work.tensor.element_size()
        if magic != MAGIC:
            raise ChannelError(f"link from party {self.peer}: bad frame (magic {magic!r})")
        if seq != self.recv_msgs or nbytes != expected or peer_label != work.label:
            msg = (f"desync: party {self.mesh.rank} at op {work.label!r} expected message "
                   f"#{self.recv_msgs} of {expected} bytes from party {self.peer}, which sent "
                   f"message #{seq} of {nbytes} bytes at op {peer_label!r}")
            self.mesh.abort(msg, skip=None)
            raise DesyncError(msg)
        self.recv_msgs += 1
        if nbytes:
            self._read_exact(_as_bytes_view(work.tensor), f"{nbytes} bytes", work.label)
        recorder = self.mesh.recorder
        if recorder is not None:
            recorder.append(("recv", self.peer, work.label, work.tensor.clone()))

    def _closed(self, what: str, label: str) -> ChannelError:
        return ChannelError(f"party {self.mesh.rank} stopped at op {label!r}: the link to party "
                            f"{self.peer} closed (the party stopped or the connection was cut) "
                            f"during {what}")

    def _error(self, exc: BaseException, what: str, label: str) -> ChannelError:
        if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, BrokenPipeError,
                            ConnectionResetError, ConnectionAbortedError)):
            return self._closed(what, label)
        if isinstance(exc, ssl.SSLError):
            return ChannelError(
                f"link between parties {self.mesh.rank} and {self.peer}: a TLS record failed "
                f"authentication or decryption ({exc.reason or exc}) during {what} at op "
                f"{label!r}: the stream was tampered with, corrupted or replayed")
        if isinstance(exc, socket.timeout):
            return ChannelError(f"link between parties {self.mesh.rank} and {self.peer}: no "
                                f"progress for {self.timeout:.0f} s during {what} at op {label!r}")
        return ChannelError(f"link between parties {self.mesh.rank} and {self.peer} failed "
                            f"during {what} at op {label!r}: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------- the mesh

class Mesh:
    """This party's authenticated links to every other party, and the pair keys."""

    def __init__(self, creds: Credentials, timeout: float = 900.0):
        self.creds, self.rank, self.world_size = creds, creds.rank, creds.world_size
        self.timeout = timeout
        self.links: Dict[int, Link] = {}
        self.refused: List[str] = []  # who was turned away during set-up (for logs / tests)
        self.recorder: Optional[list] = None  # when a list: every payload sent / received
        self._pair_secret: Dict[int, bytes] = {}
        self._listener: Optional[socket.socket] = None
        cadata = "".join(c.decode() for c in creds.certs_pem)
        self._server_ctx = self._context(ssl.PROTOCOL_TLS_SERVER, cadata)
        self._client_ctx = self._context(ssl.PROTOCOL_TLS_CLIENT, cadata)

    def _context(self, protocol, cadata: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self.creds.cert_file, self.creds.key_file)
        ctx.load_verify_locations(cadata=cadata)
        ctx.verify_mode = ssl.CERT_REQUIRED
        if protocol == ssl.PROTOCOL_TLS_CLIENT:
            ctx.check_hostname = False  # identity is pinned by certificate, not host name
        return ctx

    # -------------------------------------------------------------- set-up
    def listen(self, host: str = "127.0.0.1", port: int = 0) -> Tuple[str, int]:
        """Open the listening socket; return the address peers should dial."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(16)
        self._listener = s
        return host, s.getsockname()[1]

    def connect(self, addresses: Sequence[Tuple[str, int]], timeout: float = 120.0) -> None:
        """Dial lower ranks, accept higher ranks, authenticate all, agree the pair keys."""
        deadline = time.monotonic() + timeout
        expect = {r for r in range(self.rank + 1, self.world_size)}
        accepted: Dict[int, ssl.SSLSocket] = {}
        errors: List[BaseException] = []
        acceptor = None
        if expect:
            if self._listener is None:
                raise RuntimeError("listen() before connect()")
            acceptor = threading.Thread(target=self._accept_loop,
                                        args=(expect, accepted, deadline, errors), daemon=True)
            acceptor.start()
        for peer in range(self.rank):
            self._add_link(peer, self._dial(peer, addresses[peer], deadline))
        if acceptor is not None:
            acceptor.join(max(0.0, deadline - time.monotonic()) + 1)
            if errors:
                raise errors[0]
            missing = expect - set(accepted)
            if missing:
                raise ChannelError(f"party {self.rank}: parties {sorted(missing)} did not connect "
                                   f"with a valid identity within {timeout:.0f} s"
                                   + (f" (refused: {'; '.join(self.refused)})"
                                      if self.refused else ""))
            for peer, sock in sorted(accepted.items()):
                self._add_link(peer, sock)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _dial(self, peer: int, address: Tuple[str, int], deadline: float) -> ssl.SSLSocket:
        last: Optional[BaseException] = None
        while time.monotonic() < deadline:
            try:
                raw = socket.create_connection(tuple(address), timeout=10)
            except OSError as exc:
                last = exc
                time.sleep(0.05)
                continue
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sock = self._client_ctx.wrap_socket(raw)
            except (ssl.SSLError, OSError) as exc:
                raw.close()
                raise ChannelError(f"party {self.rank}: TLS handshake with party {peer} at "
                                   f"{address[0]}:{address[1]} failed: {exc}") from exc
            self._check_identity(sock, peer)
            return sock
        raise ChannelError(f"party {self.rank} could not reach party {peer} at "
                           f"{address[0]}:{address[1]}: {last}")

    def _accept_loop(self, expect, accepted, deadline, errors) -> None:
        listener = self._listener
        listener.settimeout(0.5)
        while set(accepted) != expect and time.monotonic() < deadline:
            if self._listener is None:  # closed: connect() gave up
                return
            try:
                raw, addr = listener.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                errors.append(exc)
                return
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(10)
            try:
                sock = self._server_ctx.wrap_socket(raw, server_side=True)
                peer = self._identify(sock)
            except (ssl.SSLError, OSError, ChannelError) as exc:
                self.refused.append(f"{addr[0]}:{addr[1]}: {exc}")
                raw.close()
                continue
            if peer not in expect or peer in accepted:
                self.refused.append(f"{addr[0]}:{addr[1]}: party {peer} is not expected here")
                sock.close()
                continue
            accepted[peer] = sock

    def _identify(self, sock: ssl.SSLSocket) -> int:
        der = sock.getpeercert(binary_form=True)
        if der is None:
            raise ChannelError("peer presented no certificate")
        fp = fingerprint(der)
        for r in range(self.world_size):
            if r != self.rank and self.creds.peer_fingerprint(r) == fp:
                return r
        raise ChannelError("peer certificate is not one of the configured parties'")

    def _check_identity(self, sock: ssl.SSLSocket, peer: int) -> None:
        der = sock.getpeercert(binary_form=True)
        if der is None or fingerprint(der) != self.creds.peer_fingerprint(peer):
            sock.close()
            raise ChannelError(f"party {self.rank}: the server at party {peer}'s address does "
                               f"not hold party {peer}'s identity; refusing to send anything")

    def _add_link(self, peer: int, sock: ssl.SSLSocket) -> None:
        """Hello: confirm ranks and exchange 32 fresh random bytes each for the pair keys."""
        mine = os.urandom(32)
        sock.settimeout(30)
        got = bytearray()
        try:
            sock.sendall(HELLO + struct.pack("<II", self.rank, peer) + mine)
            while len(got) < 4 + 8 + 32:
                chunk = sock.recv(4 + 8 + 32 - len(got))
                if not chunk:
                    raise ChannelError(f"party {peer} closed the link during the hello")
                got += chunk
        except (ssl.SSLError, OSError) as exc:  # TLS 1.3: a refused client learns it here
            sock.close()
            raise ChannelError(f"party {self.rank}: party {peer} refused the link (identity not "
                               f"accepted) or it failed during the hello: {exc}") from exc
        if bytes(got[:4]) != HELLO or struct.unpack("<II", bytes(got[4:12])) != (peer, self.rank):
            raise ChannelError(f"party {self.rank}: bad hello from party {peer}")
        theirs = bytes(got[12:])
        lo, hi = (mine, theirs) if self.rank < peer else (theirs, mine)
        self._pair_secret[peer] = hashlib.sha256(
            b"cipherdm pair secret v1" + bytes([min(self.rank, peer), max(self.rank, peer)])
            + lo + hi).digest()
        self.links[peer] = Link(self, peer, sock, self.timeout)

    def stream_key(self, owner: int) -> bytes:
        """Key of the stream that party ``owner`` calls "next" (its successor calls it "prev")."""
        succ = (owner + 1) % self.world_size
        peer = succ if owner == self.rank else owner
        secret = self._pair_secret[peer]
        return hashlib.sha256(secret + b"stream next-of " + bytes([owner])).digest()[:16]

    def streams(self) -> Dict[str, KeyStream]:
        """This party's pairwise AES-CTR streams: "next" (with rank+1), "prev" (with rank-1)."""
        prev = (self.rank - 1) % self.world_size
        return {"next": KeyStream(self.stream_key(self.rank)),
                "prev": KeyStream(self.stream_key(prev))}

    # -------------------------------------------------------------- messaging
    def link(self, peer: int) -> Link:
        try:
            return self.links[peer]
        except KeyError:
            raise ValueError(f"party {self.rank} has no link to {peer!r} (peers: "
                             f"{sorted(self.links)})") from None

    def isend(self, tensor: torch.Tensor, dst: int) -> _SendWork:
        return self.link(dst).post_send(tensor)

    def irecv(self, tensor: torch.Tensor, src: int) -> _RecvWork:
        return self.link(src).post_recv(tensor)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.isend(tensor, dst).wait()

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self.irecv(tensor, src).wait()
        return tensor

    def abort(self, message: str, skip: Optional[int] = None) -> None:
        """Tell every peer that this party stops (so each reports its own operation)."""
        for peer, link in self.links.items():
            if peer != skip:
                link.send_abort(message)

    @contextmanager
    def record(self) -> Iterator[list]:
        """Record this party's whole view: every payload it sends and receives."""
        self.recorder = []
        try:
            yield self.recorder
        finally:
            self.recorder = None

    def stats(self) -> Dict[str, int]:
        return {"payload_sent": sum(link.payload_sent for link in self.links.values()),
                "wire_sent": sum(link.wire_sent for link in self.links.values()),
                "messages_sent": sum(link.sent_msgs for link in self.links.values())}

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.links.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
