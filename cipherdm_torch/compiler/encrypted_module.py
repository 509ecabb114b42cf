"""Encrypted modules: any exported PyTorch UNet evaluated on three-party secret shares.

``encrypt(model, example_inputs)`` is called by every party with the same architecture:

* on the model owner's rank (``party().roles.owner``) ``model`` holds the real weights;
* on the other ranks ``model`` is the same architecture built from its config (any or meta
  weights): only its shapes and graph are used, its weights are replaced by zeros, and the
  owner's weights reach them solely as pseudo-random zero sharings (``crypten.cryptensor(w,
  src=owner)``: the owner adds its values to its own share, nothing is sent).

The model is exported once per input signature (:mod:`cipherdm_torch.compiler.graph`) and
interpreted node by node: public-only nodes (timestep embedding, shapes, constants) run in
plaintext torch, secret nodes through :mod:`cipherdm_torch.compiler.ops`, each node in the
cost-meter region of its op kind (opened here, and only here) so a
:class:`~cipherdm_torch.mpc.cost.CostMeter` around a forward gives the per-op breakdown. Secret
inputs are shared from the user's rank (:meth:`EncryptedModule.share_input`) and results go
back to the user only (:func:`reveal`).

Fixed point: ``precision_bits`` (CrypTen's encoder) is applied to every share and operation of
this module. Products of two secrets wrap around the 64-bit ring once ``|x*y| * 2^(2f)``
reaches ``2^63``; the owner runs a plaintext calibration pass of the exported graph on its
example inputs and warns when an activation comes within ``range_margin`` of that limit.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import hashlib
import warnings
from typing import Any, ContextManager, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from cipherdm_torch.mpc import cost
from cipherdm_torch.compiler import graph as graph_mod, ops
from cipherdm_torch.mpc.crypten_compat import crypten
from cipherdm_torch.mpc.channel import op_label
from cipherdm_torch.mpc.runtime import party
from cipherdm_torch.protocols import sharewise, side_by_side

__all__ = ["EncryptedModule", "FixedPointRangeWarning", "encrypt", "fixed_point_limit", "reveal"]


class FixedPointRangeWarning(UserWarning):
    """An activation comes close to the fixed-point range limit."""


def fixed_point_limit(precision_bits: int, ring_bits: int = 64) -> float:
    """Largest |x| whose square still fits the signed ring: x^2 * 2^(2f) < 2^(ring-1)."""
    return 2.0 ** ((ring_bits - 1 - 2 * precision_bits) / 2)


def reveal(x: Any, to: Optional[int] = None) -> Any:
    """Open secret ``x`` (a CrypTen tensor or a pytree of them) to party ``to`` only.

    ``to`` defaults to the user's rank. The other parties send their shares to ``to`` point to
    point over the secure links (CrypTen's ``reduce`` runs on
    :class:`cipherdm_torch.mpc.secure_comm.SecureCommunicator`: no gloo collective, so no
    partial sum or plaintext chunk is left at another rank) and get ``None``.
    """
    to = party().roles.user if to is None else to
    rank = crypten.communicator.get().get_rank()

    def one(v):
        if not ops.is_secret(v):
            return v
        plain = v.get_plain_text(dst=to)
        return plain if rank == to else None

    return tree_map(one, x)


class _Compiled:
    """One exported graph with what the interpreter needs precomputed."""

    def __init__(self, g: graph_mod.ModelGraph, secret: Set[str], one_hot: Dict[str, int]):
        self.g, self.secret, self.one_hot = g, secret, one_hot
        self.nodes = list(g.nodes())
        last: Dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last[a.name] = i
        self.free_after: Dict[int, List[str]] = {}
        for name, i in last.items():
            self.free_after.setdefault(i, []).append(name)


class EncryptedModule:
    """A model whose weights are secret-shared among the parties; call it like the model.

    Secret inputs are CrypTen tensors (see :meth:`share_input`), public ones (timestep, ...)
    plain values; the outputs are CrypTen tensors in the model's output structure.
    """

    def __init__(self, model: torch.nn.Module, example: Dict[str, Any], public: Set[str],
                 precision_bits: Optional[int], range_margin: Optional[float],
                 public_params: Iterable[str] = ()):
        info = party()
        self.roles = info.roles
        self.rank = info.rank
        self.is_owner = info.rank == info.roles.owner
        self.public = set(public)
        self.precision_bits = precision_bits
        self.range_margin = range_margin
        self._model = model
        self._graphs: Dict[Any, _Compiled] = {}
        self._weights: Dict[str, Any] = {}
        self.public_params = self._publish_params(public_params)
        # public Python ints (a timestep) become 0-d int64 tensors: one graph for every value.
        # (Floats stay constants: diffusers casts a float timestep to long, a tensor it keeps.)
        self._tensorize = {k for k, v in example.items() if k in self.public
                           and isinstance(v, int) and not isinstance(v, bool)}
        example = {k: (torch.tensor(v) if k in self._tensorize else v) for k, v in example.items()}
        self._dtypes = {k: v.dtype for k, v in example.items() if torch.is_tensor(v)}
        self.calibration: Dict[str, float] = {}  # owner only: max |activation| per node
        with self.fixed_point():
            compiled = self._compile(example)
            if self.is_owner and range_margin is not None:
                self._calibrate(compiled, example)
            self._share_weights(compiled)

    # ------------------------------------------------------------------ settings
    def fixed_point(self) -> ContextManager:
        """Context applying this model's fixed-point precision to CrypTen."""
        if self.precision_bits is None:
            return contextlib.nullcontext()
        return crypten.cfg.temp_override({"encoder.precision_bits": int(self.precision_bits)})

    @property
    def one_hot_inputs(self) -> Dict[str, int]:
        """Secret integer inputs (labels) -> number of classes they are one-hot encoded with."""
        out: Dict[str, int] = {}
        for c in self._graphs.values():
            out.update(c.one_hot)
        return out

    @property
    def graph(self) -> graph_mod.ModelGraph:
        """The first exported graph (for inspection)."""
        return next(iter(self._graphs.values())).g

    def _publish_params(self, patterns: Iterable[str]) -> List[str]:
        """Parameters / buffers declared public: the owner's values are sent to every party
        (they are public by declaration) and become graph constants. Returns their names."""
        patterns = list(patterns or ())
        if not patterns:
            return []
        named = dict(self._model.named_parameters())
        named.update(dict(self._model.named_buffers()))
        names = sorted(k for k in named if any(_matches(k, p) for p in patterns))
        unused = [p for p in patterns if not any(_matches(k, p) for k in named)]
        if unused:
            raise ValueError(f"public_params {unused} match no parameter or buffer of "
                             f"{type(self._model).__name__}")
        comm = crypten.communicator.get()
        values = {k: named[k].detach().clone() for k in names} if self.is_owner else None
        values = comm.broadcast_obj(values, self.roles.owner)
        if not self.is_owner:
            with torch.no_grad():
                for k in names:
                    named[k].copy_(values[k])
        return names

    # ------------------------------------------------------------------ export
    def _key(self, plain_inputs: Dict[str, Any]):
        """Cache key of an input signature (names, public or secret, shapes, dtypes)."""
        key = []
        for name, v in plain_inputs.items():
            if torch.is_tensor(v):
                key.append((name, name in self.public, tuple(v.shape), str(v.dtype)))
            else:
                key.append((name, "const", repr(v)))
        return tuple(key)

    def _compile(self, plain_inputs: Dict[str, Any]) -> _Compiled:
        key = self._key(plain_inputs)
        if key in self._graphs:
            return self._graphs[key]
        g = graph_mod.export_graph(self._model, plain_inputs, self.public_params)
        graph_mod.rewrite(g)
        secret = graph_mod.secret_nodes(g, self.public)
        graph_mod.fold_state(g, secret, g.program.state_dict if self.is_owner else None)
        names: List[str] = []
        problems = graph_mod.unsupported_ops(g, secret, names=names)
        if problems:
            raise graph_mod.UnsupportedOpsError(problems, graph_mod.hints(g, secret, names))
        one_hot = graph_mod.secret_integer_inputs(g, secret)
        self._check_same_model(g)
        compiled = _Compiled(g, secret, one_hot)
        self._graphs[key] = compiled
        return compiled

    def _check_same_model(self, g: graph_mod.ModelGraph) -> None:
        """All parties must hold the same architecture: compare a hash of the public structure."""
        digest = hashlib.sha256(repr(g.fingerprint()).encode()).hexdigest()
        comm = crypten.communicator.get()
        owner_digest = comm.broadcast_obj(digest, self.roles.owner)
        agree = torch.tensor([int(owner_digest == digest)])
        agree = comm.all_reduce(agree)
        if int(agree.item()) != comm.get_world_size():
            raise ValueError("parties exported different model graphs: every party must call "
                             "encrypt() with the same architecture and input shapes")

    # ------------------------------------------------------------------ weights
    def _share_weights(self, compiled: _Compiled) -> None:
        for placeholder, target in compiled.g.state.items():
            if target in self._weights:
                continue
            value = _state_value(compiled, placeholder)
            if not self.is_owner:
                value = torch.zeros(value.shape, dtype=value.dtype)  # only the size is used
            self._weights[target] = crypten.cryptensor(value.float(), src=self.roles.owner)

    # ------------------------------------------------------------------ calibration
    def _calibrate(self, compiled: _Compiled, example: Dict[str, Any]) -> None:
        """Owner only: plaintext pass on its example inputs; warn near the fixed-point limit."""
        values = {}
        for n in compiled.nodes:
            if n.op != "placeholder":
                continue
            if n.name in compiled.g.state:
                values[n.name] = _state_value(compiled, n.name)
            elif n.name in compiled.g.constants:
                values[n.name] = compiled.g.constants[n.name]
            else:
                name, leaf = compiled.g.inputs[n.name]
                values[n.name] = tree_flatten(example[name])[0][leaf]
        record: Dict[str, float] = {}
        _interpret(compiled, values, record=record)
        self.calibration = record
        bits = self.precision_bits or crypten.cfg.encoder.precision_bits
        limit = fixed_point_limit(bits)
        near = {k: v for k, v in record.items() if v > self.range_margin * limit}
        if near:
            where = {n.name: graph_mod.where(n) for n in compiled.nodes}
            worst = sorted(near.items(), key=lambda kv: -kv[1])[:5]
            lines = "; ".join(f"{k} max|x|={v:.3g} ({where[k]})" for k, v in worst)
            warnings.warn(f"{len(near)} activation(s) exceed {self.range_margin:g} of the "
                          f"fixed-point limit {limit:.3g} ({bits} fractional bits): {lines}",
                          FixedPointRangeWarning, stacklevel=3)

    # ------------------------------------------------------------------ inputs / outputs
    def share_input(self, name: str, value: Optional[torch.Tensor]) -> crypten.CrypTensor:
        """Secret-share input ``name`` from the user's rank (other ranks pass ``None``).

        Integer inputs that index an embedding (labels) are shared one-hot. The size is
        broadcast by the user (one small message), so the other ranks need not know it.
        """
        is_user = self.rank == self.roles.user
        if is_user:
            if value is None:
                raise ValueError(f"the user (rank {self.rank}) must provide input {name!r}")
            value = torch.as_tensor(value)
            classes = self.one_hot_inputs.get(name)
            if classes is not None:
                value = F.one_hot(value.long(), classes)
            value = value.float()
        with self.fixed_point():
            return crypten.cryptensor(value if is_user else torch.empty(0), src=self.roles.user,
                                      broadcast_size=True)

    def share_inputs(self, **inputs: Optional[torch.Tensor]) -> Dict[str, crypten.CrypTensor]:
        """:meth:`share_input` for several named inputs; returns a dict of shared tensors."""
        return {k: self.share_input(k, v) for k, v in inputs.items()}

    def reveal(self, x: Any, to: Optional[int] = None) -> Any:
        """Open ``x`` to the user (or ``to``) only; see :func:`reveal`."""
        with self.fixed_point():
            return reveal(x, to)

    # ------------------------------------------------------------------ forward
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = graph_mod.bind_inputs(self._model, args, kwargs)
        for name, v in inputs.items():
            secret_name = name not in self.public
            if secret_name and torch.is_tensor(v):
                raise TypeError(f"input {name!r} is secret: share it with share_input({name!r}, "
                                f"...) on the user's rank, or, if it is public (a timestep), "
                                f"declare it with encrypt(..., public=[..., {name!r}])")
            if not secret_name and ops.is_secret(v):
                raise TypeError(f"input {name!r} is public: pass a plain value")
            if not secret_name and isinstance(v, (int, float)) and not isinstance(v, bool) \
                    and name in self._dtypes:
                inputs[name] = torch.tensor(v, dtype=self._dtypes[name])
        with self.fixed_point():
            plain = self._plain_example(inputs)
            compiled = self._graphs.get(self._key(plain))
            if compiled is None:  # a new input signature (e.g. batch size): export it once
                compiled = self._compile(plain)
                self._share_weights(compiled)
            values = {}
            secrets = {}  # each secret weight / input once, keyed by what it is (graph order)
            for n in compiled.nodes:
                if n.op != "placeholder":
                    continue
                if n.name in compiled.g.state:
                    target = compiled.g.state[n.name]
                    values[n.name] = secrets[("weight", target)] = self._weights[target]
                elif n.name in compiled.g.constants:
                    values[n.name] = compiled.g.constants[n.name]
                else:
                    name, leaf = compiled.g.inputs[n.name]
                    values[n.name] = secrets[("input", name, leaf)] = \
                        tree_flatten(inputs[name])[0][leaf]
            # the backend may prepare the secrets' shares first (rss: replicas in one round)
            sharewise.prepare_for_products(_arithmetic_shares(secrets.values()))
            with torch.no_grad():
                return _interpret(compiled, values)

    def profile(self, *args: Any, **kwargs: Any) -> Tuple[Any, cost.CostMeter]:
        """Run one forward under a :class:`CostMeter`: (outputs, meter with one region per op
        kind)."""
        with cost.CostMeter() as meter:
            out = self.forward(*args, **kwargs)
        return out, meter

    def _plain_example(self, inputs: Dict[str, Any]) -> Dict[str, Any]:
        """Stand-in plaintext inputs with the shapes of ``inputs`` (to export a new signature)."""
        one_hot = self.one_hot_inputs
        out = {}
        for name, v in inputs.items():
            if ops.is_secret(v):
                shape = tuple(v.size())
                if name in one_hot:
                    shape = shape[:-1]
                out[name] = torch.zeros(shape, dtype=self._dtypes.get(name, torch.float32))
            else:
                out[name] = v
        return out


def _arithmetic_shares(values: Iterable[Any]) -> List[torch.Tensor]:
    """This party's shares of the arithmetic secrets among ``values``, in order (the list and
    its order follow the graph, the same on every party: no object identity involved)."""
    return [v.share for v in values
            if ops.is_secret(v) and getattr(v, "ptype", None) == crypten.mpc.arithmetic]


def _node_label(index: int, name: str) -> str:
    """The desync detector's label of a graph node: its index and (the end of) its name."""
    head = f"#{index} "
    room = 48 - len(head)
    return head + (name if len(name) <= room else "~" + name[-(room - 1):])


def _interpret(compiled: _Compiled, values: Dict[str, Any], record: Optional[dict] = None):
    """Evaluate the graph: plaintext for public nodes, the op registry for secret ones.

    Secret ops that do not depend on each other run side by side when they come one after the
    other in the graph (:func:`_next_group`: an attention's q, k and v projections, a ResNet
    block's second convolution and its shortcut, its first convolution and the time-embedding
    projection): their rounds are shared (:func:`cipherdm_torch.protocols.side_by_side.run_together`;
    one after the other on CrypTen's own backends). With ``record`` (activation ranges) every
    node runs on its own, in order.
    """
    env: Dict[str, Any] = {}
    fetch = lambda a: env[a.name]  # noqa: E731
    nodes = compiled.nodes
    i = 0
    while i < len(nodes):
        n = nodes[i]
        if n.op == "placeholder":
            env[n.name] = values[n.name]
            done = [i]
        elif n.op == "call_function" and record is None:
            members, done = _next_group(nodes, i, env)
            if len(members) == 1:
                j, node, impl, args, kwargs = members[0]
                env[node.name] = _secret_call(j, node, impl, args, kwargs)
            elif members:
                outs = side_by_side.run_together(
                    *[functools.partial(_secret_call, *m) for m in members])
                for m, out in zip(members, outs):
                    env[m[1].name] = out
            done = done + [m[0] for m in members]
        elif n.op == "call_function":
            args = torch.fx.node.map_arg(n.args, fetch)
            kwargs = torch.fx.node.map_arg(n.kwargs, fetch)
            if ops.any_secret(*args, **kwargs):
                out = _secret_call(i, n, ops.lookup(n.target), args, kwargs)
            else:
                with cost.region("public"):
                    out = n.target(*args, **kwargs)
            env[n.name] = out
            if torch.is_tensor(out) and out.is_floating_point() and out.numel():
                record[n.name] = float(out.detach().abs().max())
            done = [i]
        elif n.op == "output":
            flat = torch.fx.node.map_arg(n.args[0], fetch)
            flat = list(flat) if isinstance(flat, (list, tuple)) else [flat]
            try:
                return tree_unflatten(flat, compiled.g.program.call_spec.out_spec)
            except Exception:  # an output container pytree does not know
                return tuple(flat) if len(flat) > 1 else flat[0]
        else:
            raise graph_mod.UnsupportedOpsError([f"graph node {n.op} {n.target}"])
        for k in done:
            for name in compiled.free_after.get(k, ()):
                env.pop(name, None)
        i = max(done) + 1
    raise RuntimeError("graph has no output node")


# op kinds that never communicate (share-wise and public work): run at once, never grouped;
# every communicating kind is grouped, a nonlinear op's own side-by-side parts merging into the
# group's rounds (nested lockstep branches, stop 19; before, nonlinear kinds ran alone)
_LOCAL_KINDS = ("add", "shape")


def _next_group(nodes, start: int, env: Dict[str, Any]):
    """From node ``start`` on: the secret ops to run side by side, and the local nodes run
    meanwhile. Scans consecutive ``call_function`` nodes; a public or share-wise node whose
    inputs are ready is evaluated at once (it never communicates, so running it early changes
    no party's messages), a communicating secret op joins the group; the scan stops at the
    first node that needs a group member's output (or at a non-call node).
    Returns (members [(index, node, impl, args, kwargs)], indices evaluated at once)."""
    fetch = lambda a: env[a.name]  # noqa: E731
    members, done, pending = [], [], set()
    for i in range(start, len(nodes)):
        n = nodes[i]
        if n.op != "call_function" or any(a.name in pending for a in n.all_input_nodes):
            break
        args = torch.fx.node.map_arg(n.args, fetch)
        kwargs = torch.fx.node.map_arg(n.kwargs, fetch)
        if not ops.any_secret(*args, **kwargs):
            with cost.region("public"):
                env[n.name] = n.target(*args, **kwargs)
            done.append(i)
            continue
        impl = ops.lookup(n.target)
        if impl.kind in _LOCAL_KINDS:
            env[n.name] = _secret_call(i, n, impl, args, kwargs)
            done.append(i)
            continue
        members.append((i, n, impl, args, kwargs))
        pending.add(n.name)
    return members, done


def _secret_call(i: int, n, impl, args, kwargs):
    """One secret op, in its cost region and desync label, shape-checked."""
    try:  # the node's one cost region: its kind (see compiler.ops.registry)
        with cost.region(impl.kind), op_label(_node_label(i, n.name)):
            out = impl.fn(*args, **kwargs)
    except Exception as exc:
        raise RuntimeError(f"secret {n.target} at {n.name} ({graph_mod.where(n)}) "
                           f"failed: {type(exc).__name__}: {exc}") from exc
    _check_shape(n, out)
    return out


def _check_shape(node, out) -> None:
    """A secret result must have the shape the export recorded (catches a wrong op mapping)."""
    val = node.meta.get("val")
    if ops.is_secret(out) and isinstance(val, torch.Tensor):
        expect = tuple(val.shape)
        got = tuple(out.size())
        if got != expect and not (got[:-1] == expect and val.dtype in _INT_DTYPES):
            raise RuntimeError(f"{node.target} at {node.name} ({graph_mod.where(node)}) gave "
                               f"shape {got}, expected {expect}")


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _matches(name: str, pattern: str) -> bool:
    """``public_params`` entries: exact names, module prefixes or glob patterns."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def _state_value(compiled: _Compiled, placeholder: str) -> torch.Tensor:
    """A secret state placeholder's plaintext value: the owner's weight or folded constant
    (zeros of the right shape elsewhere, where only the size is used)."""
    g = compiled.g
    target = g.state[placeholder]
    if target in g.folded:
        value = g.folded[target]
        if value is None:
            node = next(n for n in compiled.nodes if n.name == placeholder)
            value = torch.zeros(tuple(node.meta["val"].shape))
        return value.detach()
    return g.program.state_dict[target].detach()


def _shadow(model: torch.nn.Module) -> torch.nn.Module:
    """A non-owner's stand-in: same architecture and code constants, zero secret state."""
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.is_meta for t in tensors):
        model = model.to_empty(device="cpu")
    else:
        model = copy.deepcopy(model)
    state_keys = set(model.state_dict())
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name in state_keys:
                t.zero_()
    return model


def encrypt(model: torch.nn.Module,
            example_inputs: Union[Dict[str, Any], Sequence[Any], torch.Tensor], *,
            public: Iterable[str] = graph_mod.DEFAULT_PUBLIC,
            precision_bits: Optional[int] = None, range_margin: Optional[float] = 0.25,
            public_params: Iterable[str] = ()) -> EncryptedModule:
    """Convert ``model`` into an :class:`EncryptedModule` (call in every party).

    ``example_inputs``: a tuple of positional inputs or a dict of named ones, with the shapes
    of a typical call (their values matter only on the owner, for the range calibration).
    ``public``: names of inputs that are public (timestep, ...); every other tensor input is
    secret. ``precision_bits``: fixed-point fractional bits for this model (CrypTen's default
    when ``None``). ``range_margin``: warn when an activation of the owner's plaintext
    calibration pass exceeds this fraction of :func:`fixed_point_limit` (``None``: no pass).
    ``public_params``: parameters / buffers that are public by nature (names, module prefixes
    or glob patterns, e.g. ``["time_proj"]`` for diffusers' Gaussian Fourier projection): the
    owner's values are sent to every party and whatever depends only on them and on public
    inputs runs in plaintext. Never list real weights here.
    Raises :class:`~cipherdm_torch.compiler.graph.UnsupportedOpsError` listing every unsupported op
    before any secret is shared.
    """
    info = party()
    if isinstance(example_inputs, dict):
        example = graph_mod.bind_inputs(model, (), example_inputs)
    else:
        if not isinstance(example_inputs, (tuple, list)):
            example_inputs = (example_inputs,)
        example = graph_mod.bind_inputs(model, tuple(example_inputs))
    model = model.eval()
    if info.rank != info.roles.owner:
        model = _shadow(model)
    return EncryptedModule(model, example, set(public), precision_bits, range_margin,
                           public_params)
