"""Test helper: a party's whole view, recorded below the communicator API.

The view is everything a party could look at: every payload it hands to a secure link
and every payload it receives (recorded by the link itself, after decryption / before
encryption, see ``cipherdm_torch.mpc.channel.Mesh.record``), plus every tensor passed to a
``torch.distributed`` data call (gloo), read back *after* the call returns, because a gloo
collective may leave other parties' data in the buffer (a ring reduce does).
"""

import torch
import torch.distributed as dist

from cipherdm_torch.mpc import secure_comm

GLOO_DATA_CALLS = ("send", "recv", "isend", "irecv", "broadcast", "all_reduce", "reduce",
                   "all_gather", "gather", "scatter", "reduce_scatter", "all_to_all")


def whole_view_recorder(include_sent=True):
    """Start recording this party's view; returns (list that fills up, stop function).

    List entries are tensors; ``gloo_calls`` (an attribute of the returned list) counts
    data calls that reached torch.distributed.
    """
    got = _View()
    mesh = secure_comm.mesh()
    mesh.recorder = []
    originals = {}
    for name in GLOO_DATA_CALLS:
        orig = getattr(dist, name, None)
        if orig is None:
            continue
        originals[name] = orig

        def wrapped(*args, _orig=orig, _name=name, **kwargs):
            out = _orig(*args, **kwargs)
            got.gloo_calls.append(_name)
            got.gloo_tensors.extend(tensors(list(args) + list(kwargs.values())))
            return out
        setattr(dist, name, wrapped)

    def stop():
        for name, orig in originals.items():
            setattr(dist, name, orig)
        for kind, _peer, _label, t in mesh.recorder or []:
            if include_sent or kind == "recv":
                got.append(t)
        got.extend(got.gloo_tensors)
        mesh.recorder = None
    return got, stop


def received_recorder():
    """The whole view (kept under its old name for the tests that use it)."""
    return whole_view_recorder()


class _View(list):
    def __init__(self):
        super().__init__()
        self.gloo_calls, self.gloo_tensors = [], []


def tensors(objs):
    out = []
    for o in objs:
        if torch.is_tensor(o):
            out.append(o)
        elif isinstance(o, (list, tuple)):
            out += tensors(o)
    return out
