"""Test helper: what one party receives (every tensor or object through its communicator)."""

import torch

from cipherdm_torch.crypten_compat import crypten


def received_recorder():
    """Wrap this party's communicator so every tensor / object it receives is kept."""
    comm = crypten.communicator.get()
    got = []

    def wrap(method, result_is_received=True):
        orig = getattr(comm, method)

        def run(*args, **kwargs):
            out = orig(*args, **kwargs)
            if method in ("recv", "irecv"):
                got.append(args[0])  # filled in place (irecv: once waited on)
            elif method in ("broadcast", "all_reduce", "all_gather", "reduce", "scatter",
                            "broadcast_obj", "recv_obj", "gather"):
                got.append(out)
            return out
        setattr(comm, method, run)
        return orig

    names = ["recv", "irecv", "broadcast", "all_reduce", "all_gather", "reduce", "scatter",
             "broadcast_obj", "recv_obj", "gather"]
    originals = {m: wrap(m) for m in names}

    def restore():
        for m, f in originals.items():
            setattr(comm, m, f)
    return got, restore


def tensors(objs):
    out = []
    for o in objs:
        if torch.is_tensor(o):
            out.append(o)
        elif isinstance(o, (list, tuple)):
            out += tensors(o)
    return out
