"""CrypTen on secure links and keyed randomness (applied by every party at start-up).

Why: CrypTen sends shares over plain gloo, opens values with gloo collectives (a gloo
``reduce`` leaves fully reduced plaintext chunks at the non-receiving ranks), exchanges its
generator seeds in the clear and draws masks from ``torch.Generator`` (MT19937). This module
replaces all of that through public hooks, without editing CrypTen:

* :func:`install` turns this party's CrypTen communicator into a subclass whose send /
  receive / collectives run over the :class:`~cipherdm_torch.mpc.channel.Mesh` of mutually
  authenticated TLS links. Every collective is point-to-point: ``reduce(dst)`` has the
  other parties send their shares to ``dst`` only, so nothing is left at any other rank;
  ``all_reduce`` (an open to everyone) sends each share to every party.
* CrypTen's randomness helpers (``generate_random_ring_element`` /
  ``generate_kbit_random_tensor``, behind ``PRZS``, ``PRSS`` and its providers) draw from the
  pairwise AES-CTR streams when asked for CrypTen's "prev" / "next" generators and from the
  OS CSPRNG when asked for a local value. CrypTen's own seed exchange (in the clear, during
  ``crypten.init``) is thereby unused; its pairwise generators are re-seeded with fresh,
  never-sent OS randomness, so any code that still used them would desynchronise the
  parties and fail tests loudly instead of leaking.
"""

from __future__ import annotations

import os
import pickle
import socket
from typing import Optional

import torch
import torch.distributed as dist

from cipherdm_torch.mpc import prg
from cipherdm_torch.mpc.channel import DEFAULT_LINK_TIMEOUT, ChannelError, Mesh, PeerHungError
from cipherdm_torch.mpc.identity import Credentials

__all__ = ["setup", "install", "mesh", "is_secure", "patch_randomness"]

_MESH: Optional[Mesh] = None


def mesh() -> Mesh:
    """This party's mesh of secure links."""
    if _MESH is None:
        raise RuntimeError("secure links are not set up in this process")
    return _MESH


def is_secure() -> bool:
    return _MESH is not None


def _advertise_host() -> str:
    host = os.environ.get("CIPHERDM_HOST")
    if host:
        return host
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if master in ("127.0.0.1", "localhost", "::1") or os.environ.get("RENDEZVOUS", "").startswith(
            "file://"):
        return "127.0.0.1"
    return socket.gethostbyname(socket.gethostname())


def setup(creds: Credentials, timeout: float = 120.0,
          hang_timeout: Optional[float] = None) -> Mesh:
    """Open the TLS links of this party (after ``crypten.init``) and install everything.

    Addresses are public and exchanged through the process group (gloo); identities are
    checked by TLS against the pinned certificates before any share is sent. ``timeout``
    bounds the connection set-up. ``hang_timeout``: seconds of silence (no message, no
    heartbeat) after which a waiting party reports the peer as hung (default
    ``$CIPHERDM_HANG_TIMEOUT`` or 60 s); a receive that gets only heartbeats fails after
    ``$CIPHERDM_LINK_TIMEOUT`` seconds (default 900).
    """
    global _MESH
    rank, ws = dist.get_rank(), dist.get_world_size()
    if creds.rank != rank or creds.world_size != ws:
        raise ValueError(f"credentials are for party {creds.rank} of {creds.world_size}, but "
                         f"this process is rank {rank} of {ws}")
    m = Mesh(creds, timeout=float(os.environ.get("CIPHERDM_LINK_TIMEOUT", DEFAULT_LINK_TIMEOUT)),
             hang_timeout=hang_timeout)
    host = _advertise_host()
    bind = os.environ.get("CIPHERDM_BIND", host)
    _, port = m.listen(bind, int(os.environ.get("CIPHERDM_PORT", 0)))
    addresses = [None] * ws
    dist.all_gather_object(addresses, (host, port))
    m.connect(addresses, timeout=timeout)
    _MESH = m
    prg.install_streams(m.streams())
    patch_randomness()
    install(m)
    return m


def teardown() -> None:
    global _MESH
    if _MESH is not None:
        _MESH.close()
        _MESH = None
    prg.clear_streams()


# ---------------------------------------------------------------- randomness

_ORIG_RNG: dict = {}


def _which(generator) -> Optional[str]:
    import crypten

    for name in ("prev", "next", "local"):
        if any(generator is g for g in crypten.generators.get(name, {}).values()):
            return name
    return None


def _random_ring_element(size, ring_size=(2 ** 64), generator=None, **kwargs):
    which = "local" if generator is None else _which(generator)
    if which is None or ring_size != 2 ** 64:
        return _ORIG_RNG["ring"](size, ring_size=ring_size, generator=generator, **kwargs)
    size = tuple(size) if isinstance(size, (tuple, list, torch.Size)) else (size,)
    device = kwargs.get("device")
    if which == "local":
        return prg.local_ring(size, device=device)
    return prg.stream(which).ring(size, device=device)


def _kbit_random_tensor(size, bitlength=None, generator=None, **kwargs):
    if bitlength is None or bitlength == 64:
        return _random_ring_element(size, generator=generator, **kwargs)
    which = "local" if generator is None else _which(generator)
    if which is None:
        return _ORIG_RNG["kbit"](size, bitlength=bitlength, generator=generator, **kwargs)
    size = tuple(size) if isinstance(size, (tuple, list, torch.Size)) else (size,)
    device = kwargs.get("device")
    if which == "local":
        return prg.local_ring(size, device=device, bits=bitlength)
    return prg.stream(which).ring(size, device=device) & ((1 << bitlength) - 1)


def patch_randomness() -> None:
    """Route CrypTen's random helpers to keyed streams / the OS CSPRNG (idempotent)."""
    import crypten
    import crypten.common.rng as rng
    from crypten.mpc.primitives import arithmetic, binary
    from crypten.mpc.provider import tfp_provider

    if not _ORIG_RNG:
        _ORIG_RNG["ring"] = rng.generate_random_ring_element
        _ORIG_RNG["kbit"] = rng.generate_kbit_random_tensor
        for module in (rng, arithmetic, tfp_provider):
            module.generate_random_ring_element = _random_ring_element
        for module in (rng, binary, tfp_provider):
            module.generate_kbit_random_tensor = _kbit_random_tensor
    # CrypTen's seeds for these were exchanged in the clear: re-seed them privately so that
    # nothing can use a stream another party knows (they stay only as identity tokens).
    for name in ("prev", "next", "local"):
        for gen in crypten.generators.get(name, {}).values():
            gen.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


# ---------------------------------------------------------------- communicator

def _combine(op, tensors):
    out = tensors[0].clone()
    for t in tensors[1:]:
        if op == dist.ReduceOp.SUM:
            out += t
        elif op == dist.ReduceOp.BXOR:
            out ^= t
        else:
            raise ValueError(f"secure links support SUM and BXOR reductions, not {op}")
    return out


def _secure_class(base):
    class SecureCommunicator(base):
        """CrypTen's communicator with every message on the authenticated TLS links."""

        _cipherdm_secure = True

        def _mesh(self) -> Mesh:
            return self._cipherdm_mesh

        def _others(self):
            return [r for r in range(self.get_world_size()) if r != self.get_rank()]

        def send(self, tensor, dst):
            self._mesh().send(tensor.data.contiguous(), dst)

        def recv(self, tensor, src=None):
            if src is None:
                raise ValueError("secure links need an explicit source rank")
            result = tensor.clone().contiguous()
            return self._mesh().recv(result.data, src)

        def isend(self, tensor, dst):
            return self._mesh().isend(tensor.data.contiguous(), dst)

        def irecv(self, tensor, src=None):
            if src is None:
                raise ValueError("secure links need an explicit source rank")
            return self._mesh().irecv(tensor.data, src)

        def _exchange(self, sends, recvs):
            m = self._mesh()
            works = [m.isend(t, d) for t, d in sends] + [m.irecv(t, s) for t, s in recvs]
            for w in works[::-1]:  # receives first: the sender threads write meanwhile
                w.wait()

        def broadcast(self, input, src, group=None, batched=False):
            tensors = input if batched else [input]
            if self.get_rank() == src:
                self._exchange([(t.data.contiguous(), r) for t in tensors for r in self._others()],
                               [])
            else:
                bufs = [t.data if t.is_contiguous() else torch.empty(t.shape, dtype=t.dtype)
                        for t in tensors]  # empty_like would keep a view's strides
                self._exchange([], [(b, src) for b in bufs])
                for t, b in zip(tensors, bufs):
                    if b is not t.data:
                        t.data.copy_(b)
            return input

        def _gather_all(self, tensor, dst=None):
            """Every party's tensor at ``dst`` (or at all parties when None), point to point."""
            rank = self.get_rank()
            mine = tensor.data.contiguous()
            sends = [] if dst == rank else [(mine, r) for r in ([dst] if dst is not None
                                                                  else self._others())]
            bufs = {r: torch.empty_like(mine) for r in self._others()} \
                if dst is None or dst == rank else {}
            self._exchange(sends, [(b, r) for r, b in bufs.items()])
            if not bufs:
                return None
            return [mine if r == rank else bufs[r] for r in range(self.get_world_size())]

        def reduce(self, input, dst, op=dist.ReduceOp.SUM, batched=False):
            items = input if batched else [input]
            out = []
            for t in items:
                parts = self._gather_all(t, dst)
                out.append(None if parts is None else _combine(op, parts))
            if self.get_rank() != dst:
                return None
            return out if batched else out[0]

        def all_reduce(self, input, op=dist.ReduceOp.SUM, batched=False):
            items = input if batched else [input]
            out = [_combine(op, self._gather_all(t)) for t in items]
            return out if batched else out[0]

        def gather(self, tensor, dst):
            parts = self._gather_all(tensor, dst)
            return parts if self.get_rank() == dst else [None]

        def all_gather(self, tensor):
            return self._gather_all(tensor)

        def scatter(self, scatter_list, src, size=None, device=None):
            rank = self.get_rank()
            if rank == src:
                self._exchange([(scatter_list[r].data.contiguous(), r) for r in self._others()],
                               [])
                return scatter_list[rank]
            if size is None:
                size = scatter_list[rank].size()
            tensor = torch.empty(size=size, dtype=torch.long)
            self._exchange([], [(tensor, src)])
            return tensor

        def barrier(self):
            token = torch.zeros(1, dtype=torch.uint8)
            self._exchange([(token, r) for r in self._others()],
                           [(torch.empty(1, dtype=torch.uint8), r) for r in self._others()])

        def _obj_tensor(self, obj):
            buf = pickle.dumps(obj)
            return torch.tensor([len(buf)], dtype=torch.long), \
                torch.frombuffer(bytearray(buf), dtype=torch.uint8)

        @staticmethod
        def _loads(data):
            from crypten.common import serial

            return serial.restricted_loads(bytes(data.numpy().tobytes()))

        def send_obj(self, obj, dst, group=None):
            size, data = self._obj_tensor(obj)
            self._exchange([(size, dst), (data, dst)], [])

        def recv_obj(self, src, group=None):
            size = torch.empty(1, dtype=torch.long)
            self._exchange([], [(size, src)])
            data = torch.empty(int(size.item()), dtype=torch.uint8)
            self._exchange([], [(data, src)])
            return self._loads(data)

        def broadcast_obj(self, obj, src, group=None):
            if self.get_rank() == src:
                if obj is None:
                    raise ValueError("the source party must provide the object to broadcast")
                size, data = self._obj_tensor(obj)
                self._exchange([(size, r) for r in self._others()]
                               + [(data, r) for r in self._others()], [])
                return obj
            return self.recv_obj(src)

    SecureCommunicator.__name__ = f"Secure{base.__name__}"
    return SecureCommunicator


def install(m: Mesh) -> None:
    """Put this party's CrypTen communicator on the mesh (before the cost meter wraps it)."""
    import crypten.communicator as comm

    instance = comm.get()
    if getattr(type(instance), "_cipherdm_metered", False):
        raise RuntimeError("install the secure links before the cost meter")
    if not getattr(type(instance), "_cipherdm_secure", False):
        instance.__class__ = _secure_class(type(instance))
    instance._cipherdm_mesh = m


__all__ += ["ChannelError", "PeerHungError", "teardown"]
