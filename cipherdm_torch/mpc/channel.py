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
other cannot deadlock on full socket buffers); when nothing is queued for it, the caller
writes a new frame itself as far as the socket takes it without blocking and hands only the
rest to the thread (no thread hand-off per small message: a loopback ping-pong went from 1.30
to 0.74 ms); one writer at a time (the link's write lock), frames in post order. Receives are
read in the caller's thread in the order they were posted. OpenSSL forbids using one
connection from two threads at once, and Python's ``ssl`` does not serialise it: a read racing the sender thread's write
(heartbeats make that common) ends in a spurious EOF or a stuck stream. So the socket is
non-blocking and every TLS call runs under the link's lock, which is never held while
waiting: a call that would block releases it and the thread waits on ``poll()`` outside.

Liveness (a stopped or frozen party is named in bounded time): while a link has nothing to
send, its sender thread sends a heartbeat frame (a 68-byte header with magic ``CDMB`` and no
payload) every ``hang_timeout / 4`` seconds. The sender thread runs beside the computation
(torch releases the GIL in its kernels), so a party busy with a long local computation keeps
beating; a stopped (SIGSTOP), frozen or cut-off one does not. A party waiting on a link (for
a message, or for a large send to drain) that hears nothing at all from the peer, neither
data nor heartbeat, for ``hang_timeout`` seconds raises :class:`PeerHungError` naming the
peer. ``hang_timeout`` comes from :class:`Mesh` (default ``$CIPHERDM_HANG_TIMEOUT`` or 60 s;
``launch(..., hang_timeout=)`` and ``cipherdm sample --timeout`` set it). Heartbeats take no
message number and carry no payload: the cost meter (payload, rounds) never sees them and
:func:`wire_bytes` / ``Mesh.stats()["wire_sent"]`` count messages only; heartbeat traffic is
reported apart (``heartbeats_sent``, ``heartbeat_wire``; :func:`wire_bytes` of 0 each). A
heartbeat is skipped while the peer's receive buffer is full (the peer is not reading), so an
idle link never blocks on heartbeats. Separately, a receive that gets heartbeats but no data
for ``timeout`` seconds (``$CIPHERDM_LINK_TIMEOUT``, default 900 s) raises a
:class:`ChannelError`: the peer is alive but sends nothing (stuck, deadlocked, or computing
for longer than that).
"""

from __future__ import annotations

import collections
import hashlib
import os
import select
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

__all__ = ["ChannelError", "DesyncError", "PeerHungError", "Mesh", "op_label", "current_label",
           "HEADER", "wire_bytes", "tls_record_overhead", "hang_timeout_from_env",
           "DEFAULT_HANG_TIMEOUT", "DEFAULT_LINK_TIMEOUT"]

HEADER = struct.Struct("<4sQQ48s")
# frames with a payload up to this size are written as one buffer (header + payload copied
# together): one TLS write and record instead of two (a small message's write is mostly
# per-call cost); larger payloads are written from the tensor's memory without a copy
_COALESCE = 1 << 16
MAGIC = b"CDM1"
ABORT = b"CDMX"
HELLO = b"CDMH"
BEAT = b"CDMB"  # heartbeat: no payload, no message number
DEFAULT_HANG_TIMEOUT = 60.0  # s of total silence after which a peer is reported as hung
DEFAULT_LINK_TIMEOUT = 900.0  # s a receive waits for data while the peer only beats
TLS_RECORD = 16384  # max plaintext bytes per TLS record
TLS_RECORD_OVERHEAD = 22  # TLS 1.3: 5-byte header + content type + 16-byte AEAD tag


def tls_record_overhead(nbytes: int) -> int:
    """Bytes TLS 1.3 adds to one write of ``nbytes`` (full records of 16 KiB)."""
    return TLS_RECORD_OVERHEAD * max(1, -(-nbytes // TLS_RECORD))


def wire_bytes(payload: int) -> int:
    """Bytes one framed message of ``payload`` bytes puts on the wire (header + TLS records):
    one write of header and payload up to ``_COALESCE`` bytes of payload, else two."""
    if payload <= _COALESCE:
        return HEADER.size + payload + tls_record_overhead(HEADER.size + payload)
    return HEADER.size + payload + tls_record_overhead(HEADER.size) + tls_record_overhead(payload)


class ChannelError(RuntimeError):
    """A link failed: peer gone, authentication failure, tampering, timeout."""


class DesyncError(ChannelError):
    """The parties disagree on which message comes next (different branches taken)."""


class PeerHungError(ChannelError):
    """Party ``peer`` sent nothing, not even a heartbeat, for ``silent_for`` seconds while
    party ``rank`` waited on it: it is stopped (SIGSTOP), frozen, or its link is cut."""

    def __init__(self, rank: int, peer: int, silent_for: float, what: str, label: str):
        self.rank, self.peer, self.silent_for, self.label = rank, peer, silent_for, label
        super().__init__(
            f"party {peer} is not responding: party {rank} heard nothing from it (no message, "
            f"no heartbeat) for {silent_for:.0f} s during {what} at op {label!r}; the party is "
            f"stopped, frozen or its link is cut (the bound is hang_timeout, "
            f"$CIPHERDM_HANG_TIMEOUT)")


def hang_timeout_from_env(default: float = DEFAULT_HANG_TIMEOUT) -> float:
    """``$CIPHERDM_HANG_TIMEOUT`` in seconds (``default`` when unset)."""
    text = os.environ.get("CIPHERDM_HANG_TIMEOUT", "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"CIPHERDM_HANG_TIMEOUT must be a number of seconds > 0, got {text!r}")
    return value


def _ready(sock, write: bool = False, wait: float = 0.0) -> bool:
    """Whether ``sock`` can be read (or written) without blocking, within ``wait`` seconds."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT if write else select.POLLIN)
    return bool(poller.poll(int(wait * 1000)))


# how often a waiting send looks for arrived messages to read (seconds)
_SEND_POLL = 0.002


class _Blocked:
    """What a non-blocking TLS call needs before it can go on: the socket readable or
    writable."""

    def __init__(self, write: bool):
        self.write = write


_WANT_READ, _WANT_WRITE = _Blocked(False), _Blocked(True)


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


def staged(t: torch.Tensor) -> bool:
    """True when ``t`` lives on a device (a GPU): the channel moves it through host memory.

    Sockets read and write host memory only, so a device tensor is copied to the host before
    it is sent and a receive into one lands in a host buffer copied over on ``wait()``. The
    frame on the wire is the same either way (tested by forcing this on CPU tensors)."""
    return t.device.type != "cpu"


def _as_bytes_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    if not t.is_contiguous():
        raise ValueError("the channel sends and receives contiguous tensors only")
    if t.device.type != "cpu":
        raise ValueError("the channel moves CPU tensors; stage device tensors first")
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
        """Wait until the sender thread has written the message. Meanwhile read every message
        that has begun to arrive for a receive posted on this mesh: a send drains only while
        its peer reads, so three parties that each wait on a send to their successor before
        reading their predecessor (CrypTen's replication does) would otherwise stall for good
        once a message outgrows the socket buffers (8 MB on loopback)."""
        link = self.link
        if not self.done.wait(0.001):
            start = time.monotonic()
            link.waiting = ("send", self.label, start)
            try:
                while True:
                    link.mesh.read_arrived(self.label, start)
                    if self.done.wait(_SEND_POLL):
                        break
                    waited = time.monotonic() - start
                    if waited > link.timeout:
                        raise ChannelError(f"link to party {link.peer}: send timed out after "
                                           f"{link.timeout:.0f} s at op {self.label!r}")
                    if waited >= link.heartbeat:  # a long send: is the peer there at all?
                        link.watch(self.label, start)
            finally:
                link.waiting = None
        if self.error is not None:
            raise self.error
        return True


class _RecvWork(Work):
    target: Optional[torch.Tensor] = None  # the device tensor a staged receive lands in

    def wait(self, timeout=None):
        self.link.complete(self)
        if self.error is not None:
            raise self.error
        if self.target is not None:
            self.target.copy_(self.tensor)
            self.target = None
        return True


class Link:
    """The TLS connection to one peer, with its sender thread and posted receives.

    ``timeout``: how long a receive waits for data (heartbeats do not count) and a send for
    progress; ``hang_timeout``: how long the peer may be silent (no data, no heartbeat)
    while this party waits on it before :class:`PeerHungError`.
    """

    def __init__(self, mesh: "Mesh", peer: int, sock: ssl.SSLSocket, timeout: float,
                 hang_timeout: float = DEFAULT_HANG_TIMEOUT):
        self.mesh, self.peer, self.sock, self.timeout = mesh, peer, sock, timeout
        self.hang_timeout = hang_timeout
        self.heartbeat = hang_timeout / 4  # seconds between heartbeats while idle
        self.poll = min(1.0, self.heartbeat)  # how often waits check liveness
        sock.setblocking(False)  # waits happen in poll(), outside the TLS lock
        self._tls_lock = threading.Lock()  # one TLS call at a time (OpenSSL's rule)
        self.sent_msgs = self.recv_msgs = 0
        self.payload_sent = self.wire_sent = 0
        self.heartbeats_sent = self.heartbeats_received = 0
        self._queue: "queue.Queue" = queue.Queue()  # frames for the sender thread
        self._write_lock = threading.Lock()  # held while one frame (or a heartbeat) is written
        self._pending: "collections.deque[_RecvWork]" = collections.deque()
        self._read_lock = threading.Lock()
        self._broken: Optional[BaseException] = None
        now = time.monotonic()
        self._last_tx = now  # last write on the socket (heartbeats are sent when idle)
        self._heard = now  # last byte from the peer (or the start of the current wait)
        self._data_since = now  # last data byte (or the start of the current wait)
        self._hdr = bytearray(HEADER.size)  # the header being read, ``_hdr_pos`` bytes so far
        self._hdr_pos = 0
        self._stashed: Optional[tuple] = None  # a data header read ahead by :meth:`watch`
        self.waiting: Optional[Tuple[str, str, float]] = None  # (kind, label, since): for reports
        self._thread = threading.Thread(target=self._send_loop, daemon=True,
                                        name=f"cipherdm-send-{mesh.rank}to{peer}")
        self._thread.start()

    # -------------------------------------------------------------- sending
    def post_send(self, tensor: torch.Tensor, label: Optional[str] = None) -> _SendWork:
        """Send ``tensor`` (in order with every earlier send on this link).

        When nothing is queued for the sender thread, the caller writes the frame itself as far
        as the socket takes it without blocking (no thread hand-off for the usual small
        message); whatever does not fit goes to the sender thread, which resumes the same TLS
        write. Either way one writer at a time (``_write_lock``) and the frame order is the
        post order."""
        label = current_label() if label is None else label
        tensor = tensor.contiguous()
        if staged(tensor):
            tensor = tensor.to("cpu", copy=True)
        work = _SendWork(self, tensor, label)
        header = HEADER.pack(MAGIC, self.sent_msgs, tensor.numel() * tensor.element_size(),
                             _label_bytes(label))
        self.sent_msgs += 1
        recorder = self.mesh.recorder
        if recorder is not None:
            recorder.append(("sent", self.peer, label, tensor.clone()))
        payload = _as_bytes_view(tensor)
        if len(payload) <= _COALESCE:  # one TLS record (and write) for header and payload
            frame = [memoryview(header + payload.tobytes())]
        else:
            frame = [memoryview(header), payload]
        if (self._broken is None and self._queue.unfinished_tasks == 0
                and self._write_lock.acquire(blocking=False)):
            try:
                if self._queue.unfinished_tasks == 0:  # still nothing ahead of this frame
                    frame = self._write_some(frame)
                    if not frame:
                        self._count(len(payload))
                        work.done.set()
                        return work
            except BaseException as exc:
                self._fail(exc, work)
                return work
            finally:
                self._write_lock.release()
        self._queue.put((frame, len(payload), work))
        return work

    def _write_some(self, frame: List[memoryview]) -> List[memoryview]:
        """Write the frame's buffers without blocking; the part not written (same bytes, so a
        blocked TLS write is resumed exactly)."""
        for k, view in enumerate(frame):
            pos, n = 0, len(view)
            while pos < n:
                got = self._tls(self.sock.send, view[pos:])
                if isinstance(got, _Blocked):
                    return [view[pos:]] + frame[k + 1:]
                pos += got
                self._last_tx = time.monotonic()
        return []

    def _count(self, payload_len: int) -> None:
        self.payload_sent += payload_len
        self.wire_sent += wire_bytes(payload_len)

    def _fail(self, exc: BaseException, work: "_SendWork") -> None:
        err = exc if isinstance(exc, ChannelError) else self._error(exc, "send", work.label)
        self._broken = err
        work.error = err
        work.done.set()

    def _send_loop(self) -> None:
        while True:
            try:
                item = self._queue.get(
                    timeout=max(0.01, self._last_tx + self.heartbeat - time.monotonic()))
            except queue.Empty:
                if self._write_lock.acquire(blocking=False):  # else a frame is being written
                    try:
                        self._beat()
                    finally:
                        self._write_lock.release()
                continue
            if item is None:
                self._queue.task_done()
                return
            frame, payload_len, work = item
            try:
                with self._write_lock:
                    if self._broken is not None:
                        raise self._broken
                    for view in frame:
                        self._write(view, "send", work.label)
                self._count(payload_len)
                work.done.set()
            except BaseException as exc:  # report on wait(); later sends fail the same way
                self._fail(exc, work)
            finally:
                self._queue.task_done()

    def _write(self, data, what: str, label: str) -> None:
        """``sendall`` that tolerates a peer that is slow to read, up to ``timeout`` seconds.

        A TLS write that would block is repeated with the same bytes once the socket drains
        (OpenSSL resumes it), so no byte is lost or doubled; the socket draining counts as
        progress.
        """
        with memoryview(data) as raw, raw.cast("B") as view:
            pos, n = 0, len(view)
            last = time.monotonic()
            while pos < n:
                got = self._tls(self.sock.send, view[pos:])
                if isinstance(got, _Blocked):
                    if _ready(self.sock, got.write, self.poll):
                        last = time.monotonic()
                    elif time.monotonic() - last > self.timeout:
                        raise ChannelError(
                            f"link between parties {self.mesh.rank} and {self.peer}: no "
                            f"progress for {self.timeout:.0f} s during {what} at op {label!r} "
                            f"(party {self.peer} does not read)")
                    continue
                pos += got
                last = time.monotonic()
        self._last_tx = time.monotonic()

    def _tls(self, call: Callable, *args):
        """One TLS read or write under the link's lock: its result, or :class:`_Blocked`
        (what to wait for, outside the lock) when it would block."""
        with self._tls_lock:
            try:
                return call(*args)
            except ssl.SSLWantReadError:
                return _WANT_READ
            except ssl.SSLWantWriteError:
                return _WANT_WRITE

    def _beat(self) -> None:
        """Send one heartbeat, unless the link is broken or the peer's buffers are full."""
        self._last_tx = time.monotonic()
        if self._broken is not None:
            return
        try:
            if not _ready(self.sock, write=True):
                return  # the peer is not reading this link: it is not waiting on us either
            self._write(HEADER.pack(BEAT, self.heartbeats_sent, 0, bytes(48)), "a heartbeat",
                        "")
            self.heartbeats_sent += 1
        except BaseException as exc:  # the peer went away: later sends report it
            self._broken = exc if isinstance(exc, ChannelError) else self._error(
                exc, "a heartbeat", "")

    def send_abort(self, message: str) -> None:
        """Tell the peer this party stopped (best effort, bounded wait).

        Queued behind this link's pending sends, so the sender thread stays the only
        writer of the TLS socket and the abort frame is never interleaved with a payload.
        """
        data = torch.frombuffer(bytearray(message.encode("utf-8", "replace")[:4000]),
                                dtype=torch.uint8)
        work = _SendWork(self, data, current_label())
        header = HEADER.pack(ABORT, 0, data.numel(), _label_bytes(work.label))
        self._queue.put(([memoryview(header), _as_bytes_view(data)], data.numel(), work))
        work.done.wait(2.0)

    # -------------------------------------------------------------- receiving
    def post_recv(self, tensor: torch.Tensor, label: Optional[str] = None) -> _RecvWork:
        if not tensor.is_contiguous():
            raise ValueError("receive buffers must be contiguous")
        target = None
        if staged(tensor):
            target, tensor = tensor, torch.empty(tensor.shape, dtype=tensor.dtype)
        work = _RecvWork(self, tensor, current_label() if label is None else label)
        work.target = target
        self._pending.append(work)
        return work

    def complete(self, work: _RecvWork) -> None:
        """Read posted receives in order until ``work`` is filled."""
        with self._read_lock:
            if work.done.is_set():
                return
            now = time.monotonic()
            self._heard = self._data_since = now  # silence counts from the start of the wait
            self.waiting = ("receive", work.label, now)
            try:
                while not work.done.is_set():
                    self._complete_head()
            finally:
                self.waiting = None

    def _complete_head(self, header: Optional[tuple] = None) -> None:
        head = self._pending.popleft()
        try:
            self._read_into(head, header)
        except BaseException as exc:
            head.error = exc
            for w in self._pending:
                w.error = exc
                w.done.set()
            self._pending.clear()  # ``work`` was among them unless it was ``head``
        head.done.set()

    def watch(self, label: str, since: float) -> None:
        """While a send to the peer is stuck: read what the peer sent, check it is alive.

        Consumes heartbeats, and a message the peer has started sending if a receive is
        posted for it (so its heartbeats behind it can be seen), without ever waiting for a
        message that has not begun to arrive; raises :class:`PeerHungError` after
        ``hang_timeout`` seconds of total silence. Returns at once if another thread reads.
        """
        if not self._read_lock.acquire(blocking=False):
            return
        try:
            while self._stashed is None or self._pending:
                if self._stashed is not None:  # a message has begun: read it into its receive
                    header, self._stashed = self._stashed, None
                    self._heard = self._data_since = time.monotonic()
                    self._complete_head(header)
                    continue
                if not self._readable():
                    silent = time.monotonic() - max(self._heard, since)
                    if silent >= self.hang_timeout:
                        raise PeerHungError(self.mesh.rank, self.peer, silent, "a send",
                                            label)
                    return
                header = self._read_header(label, blocking=False)
                if header is not None and header[0] != BEAT:
                    if header[0] == ABORT:
                        self._raise_abort(header, label)
                    self._stashed = header
        finally:
            self._read_lock.release()

    def _readable(self) -> bool:
        try:
            with self._tls_lock:
                if self.sock.pending():
                    return True
            return _ready(self.sock)
        except (OSError, ValueError):
            return True  # let the read report what is wrong

    def _check_alive(self, what: str, label: str) -> None:
        """``poll`` s passed without a byte: raise if the wait has gone on too long."""
        now = time.monotonic()
        silent = now - self._heard
        if silent >= self.hang_timeout and not self._readable():
            raise PeerHungError(self.mesh.rank, self.peer, silent, what, label)
        if now - self._data_since >= self.timeout:
            raise ChannelError(f"link between parties {self.mesh.rank} and {self.peer}: no "
                               f"progress for {self.timeout:.0f} s during {what} at op "
                               f"{label!r} (party {self.peer} is alive, its heartbeats arrive, "
                               f"but it sends no data: it is stuck or still computing)")

    def _read_exact(self, view: memoryview, what: str, label: str, data: bool = True) -> None:
        pos, n = 0, len(view)
        while pos < n:
            try:
                k = self._tls(self.sock.recv_into, view[pos:], n - pos)
            except BaseException as exc:
                raise self._error(exc, what, label) from exc
            if isinstance(k, _Blocked):
                if not _ready(self.sock, k.write, self.poll):
                    self._check_alive(what, label)
                continue
            if k == 0:
                raise self._closed(what, label)
            pos += k
            self._heard = time.monotonic()
            if data:
                self._data_since = self._heard

    def _read_header(self, label: str, blocking: bool = True) -> Optional[tuple]:
        """The next frame header (heartbeats included); None if not ``blocking`` and only
        part of it has arrived (the rest is read next time)."""
        view = memoryview(self._hdr)
        if blocking:
            self._read_exact(view[self._hdr_pos:], "a message header", label, data=False)
        else:
            while self._hdr_pos < HEADER.size:
                if not self._readable():
                    return None
                try:
                    k = self._tls(self.sock.recv_into, view[self._hdr_pos:])
                except BaseException as exc:
                    raise self._error(exc, "a message header", label) from exc
                if isinstance(k, _Blocked):
                    return None
                if k == 0:
                    raise self._closed("a message header", label)
                self._hdr_pos += k
                self._heard = time.monotonic()
        self._hdr_pos = 0
        header = HEADER.unpack(bytes(self._hdr))
        if header[0] == BEAT:
            self.heartbeats_received += 1
        return header

    def _raise_abort(self, header: tuple, label: str) -> None:
        msg = bytearray(header[2])
        self._read_exact(memoryview(msg), "an abort message", label)
        raise DesyncError(f"party {self.mesh.rank} stopped at op {label!r}: party "
                          f"{self.peer} stopped the run ({msg.decode(errors='replace')})")

    def _read_into(self, work: _RecvWork, header: Optional[tuple] = None) -> None:
        if header is None and self._stashed is not None:
            header, self._stashed = self._stashed, None
        while header is None or header[0] == BEAT:
            header = self._read_header(work.label)
        self._data_since = time.monotonic()
        magic, seq, nbytes, peer_label = header
        peer_label = _label_str(peer_label)
        if magic == ABORT:
            self._raise_abort(header, work.label)
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

    def __init__(self, creds: Credentials, timeout: float = DEFAULT_LINK_TIMEOUT,
                 hang_timeout: Optional[float] = None):
        """``timeout``: seconds a receive waits for data while the peer sends only
        heartbeats (and a send for progress); ``hang_timeout``: seconds of total silence
        (no data, no heartbeat) after which a waiting party reports the peer as hung
        (:class:`PeerHungError`); default ``$CIPHERDM_HANG_TIMEOUT`` or 60 s. Each link
        sends a heartbeat every ``hang_timeout / 4`` seconds while it has nothing to send."""
        self.creds, self.rank, self.world_size = creds, creds.rank, creds.world_size
        self.timeout = timeout
        self.hang_timeout = hang_timeout_from_env() if hang_timeout is None else hang_timeout
        if not self.hang_timeout > 0:
            raise ValueError(f"hang_timeout must be > 0 seconds, got {hang_timeout!r}")
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
        self.links[peer] = Link(self, peer, sock, self.timeout, self.hang_timeout)

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

    def read_arrived(self, label: str, since: float) -> None:
        """Read each message that has begun to arrive for a posted receive, on every link
        (never waits for one that has not); see :meth:`_SendWork.wait`."""
        for link in list(self.links.values()):
            if link._pending:
                link.watch(label, since)

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
        """Messages only in ``payload_sent`` / ``wire_sent`` / ``messages_sent``; heartbeats
        (which carry no payload) apart, ``wire_bytes(0)`` each."""
        links = self.links.values()
        beats = sum(link.heartbeats_sent for link in links)
        return {"payload_sent": sum(link.payload_sent for link in links),
                "wire_sent": sum(link.wire_sent for link in links),
                "messages_sent": sum(link.sent_msgs for link in links),
                "heartbeats_sent": beats, "heartbeat_wire": beats * wire_bytes(0)}

    def waits(self) -> Dict[int, Tuple[str, str, float]]:
        """What this party waits on now: peer -> (receive | send, op label, seconds)."""
        now = time.monotonic()
        out = {}
        for peer, link in list(self.links.items()):
            w = link.waiting
            if w is not None:
                out[peer] = (w[0], w[1], now - w[2])
        return out

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.links.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
