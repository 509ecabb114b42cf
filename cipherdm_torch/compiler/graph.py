"""A model's ATen graph: export, which values are secret, and the unsupported-op report.

CrypTen's own converter goes through ONNX, which is broken on current PyTorch and unfriendly to
diffusers models. Instead, :func:`export_graph` runs ``torch.export.export`` on the model with
its inputs bound by name, and :class:`ModelGraph` records which graph placeholder is what:
secret state (parameters and persistent buffers: the owner's), public constants (lifted
tensors, non-persistent buffers: computed by the code itself), and user inputs, secret unless
named public (the timestep). :func:`secret_nodes` propagates secrecy through the graph, so every
public-only subgraph (e.g. the sinusoidal embedding of a public timestep) is known to run in
plaintext, and :func:`unsupported_ops` lists every secret node that the op registry cannot
evaluate, with where it comes from, before any secret computation.
"""

from __future__ import annotations

import hashlib
import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.utils._pytree import tree_flatten

from cipherdm_torch.compiler import ops

__all__ = ["ModelGraph", "UnsupportedOpsError", "bind_inputs", "export_graph", "secret_nodes",
           "unsupported_ops", "where", "rewrite", "fold_state", "hints"]

# Input names that are public unless the caller says otherwise: the usual spellings of a
# diffusion model's noise level / timestep argument, and flags.
DEFAULT_PUBLIC = ("timestep", "timesteps", "t", "ts", "time", "times", "time_step", "time_steps",
                  "step", "steps", "noise_labels", "noise_label", "noise_level", "noise_levels",
                  "noise_cond", "sigma", "sigmas", "log_sigma", "c_noise", "return_dict")


class UnsupportedOpsError(NotImplementedError):
    """The model uses ops on secret values that cannot be evaluated; ``problems`` lists them.

    ``hints`` say what would make them supported (inputs to declare public with ``public=``,
    parameters public by nature to declare with ``public_params=``).
    """

    def __init__(self, problems: List[str], hints: Sequence[str] = ()):
        self.problems, self.hints = problems, list(hints)
        msg = (f"{len(problems)} unsupported op use(s) on secret values:\n  "
               + "\n  ".join(problems))
        if self.hints:
            msg += "\n" + "\n".join(self.hints)
        super().__init__(msg)


@dataclass
class ModelGraph:
    """One exported program plus what each placeholder is (secret state, constant, input)."""

    program: ExportedProgram
    input_order: List[str]  # keyword order the program was exported with
    state: Dict[str, str] = field(default_factory=dict)  # placeholder -> state-dict key (secret)
    constants: Dict[str, Any] = field(default_factory=dict)  # placeholder -> public value
    inputs: Dict[str, Tuple[str, int]] = field(default_factory=dict)  # placeholder -> (arg, leaf#)
    folded: Dict[str, Any] = field(default_factory=dict)  # folded state key -> owner's value

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph

    def nodes(self) -> Iterable[torch.fx.Node]:
        return self.program.graph.nodes

    def op_counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for n in self.nodes():
            if n.op == "call_function":
                counts[str(n.target)] = counts.get(str(n.target), 0) + 1
        return counts

    def fingerprint(self) -> list:
        """Public structure (ops, placeholder shapes), for checking parties agree on the model."""
        out = []
        for n in self.nodes():
            val = n.meta.get("val")
            shape = tuple(val.shape) if isinstance(val, torch.Tensor) else None
            out.append((n.op, n.name, str(n.target), shape))
        return out


def bind_inputs(model: torch.nn.Module, args: Sequence = (), kwargs: Optional[dict] = None
                ) -> Dict[str, Any]:
    """Bind positional and keyword inputs to ``model.forward``'s parameter names (ordered)."""
    sig = inspect.signature(model.forward)
    bound = sig.bind(*tuple(args), **dict(kwargs or {}))
    out = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            raise TypeError("models with *args in forward() are not supported; pass inputs by name")
        else:
            out[name] = value
    return out


def export_graph(model: torch.nn.Module, inputs: Dict[str, Any],
                 public_state: Iterable[str] = ()) -> ModelGraph:
    """``torch.export`` the model on named example ``inputs`` and classify its placeholders.

    ``public_state``: parameter / buffer names that are public by nature (their values are
    graph constants, known to every party, and whatever depends only on them and on public
    inputs runs in plaintext).
    """
    public_state = set(public_state)
    program = torch.export.export(model, (), dict(inputs), strict=False)
    g = ModelGraph(program, list(inputs))
    leaf_names = []
    for name, value in inputs.items():
        leaves, _ = tree_flatten(value)
        leaf_names += [(name, i) for i in range(len(leaves))]
    user_i = 0
    persistent_buffers = set(program.state_dict)
    for spec, node in zip(program.graph_signature.input_specs,
                          [n for n in program.graph.nodes if n.op == "placeholder"]):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target in public_state \
                and spec.target in program.state_dict:
            g.constants[node.name] = program.state_dict[spec.target].detach()
        elif spec.kind == InputKind.PARAMETER:
            g.state[node.name] = spec.target
        elif spec.kind == InputKind.BUFFER:
            if spec.persistent is False or spec.target not in persistent_buffers:
                g.constants[node.name] = program.constants[spec.target]
            else:
                g.state[node.name] = spec.target
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            g.constants[node.name] = program.constants[spec.target]
        elif spec.kind == InputKind.USER_INPUT:
            g.inputs[node.name] = leaf_names[user_i]
            user_i += 1
        else:
            raise UnsupportedOpsError([f"graph input {node.name} of kind {spec.kind}"])
    return g


def where(node: torch.fx.Node) -> str:
    """Where a node comes from: module path (class) and the innermost source line."""
    parts = []
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        parts.append(f"{path or '<root>'} ({str(cls).rsplit('.', 1)[-1]})")
    trace = node.meta.get("stack_trace")
    if trace:
        files = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File")]
        lines = trace.strip().splitlines()
        if files:
            parts.append(files[-1] + (": " + lines[-1].strip() if lines else ""))
    return "; ".join(parts) if parts else "<unknown location>"


def secret_nodes(g: ModelGraph, public_inputs: Set[str]) -> Set[str]:
    """Names of the nodes whose value depends on a secret (state or non-public input)."""
    secret: Set[str] = set()
    for n in g.nodes():
        if n.op == "placeholder":
            if n.name in g.state:
                secret.add(n.name)
            elif n.name in g.inputs and g.inputs[n.name][0] not in public_inputs:
                val = n.meta.get("val")
                if isinstance(val, torch.Tensor):
                    secret.add(n.name)
        elif n.op in ("call_function", "call_method", "call_module"):
            if any(a.name in secret for a in n.all_input_nodes):
                secret.add(n.name)
    return secret


def unsupported_ops(g: ModelGraph, secret: Set[str],
                    registry: Callable[[Any], Optional[ops.OpImpl]] = ops.lookup,
                    names: Optional[List[str]] = None) -> List[str]:
    """Every secret node the registry cannot evaluate, as 'op at node (where): why' lines.

    ``names``: if given, the problem nodes' names are appended to it (for :func:`hints`)."""
    problems = []
    names = [] if names is None else names
    for n in g.nodes():
        if n.op in ("call_method", "call_module"):
            problems.append(f"{n.op} {n.target} at {n.name} ({where(n)})")
            names.append(n.name)
            continue
        if n.op != "call_function" or n.name not in secret:
            continue
        impl = registry(n.target)
        reason = None
        if n.meta.get("cipherdm_reason"):
            reason = n.meta["cipherdm_reason"]
        elif impl is None:
            reason = ""
        elif impl.check is not None:
            reason = impl.check(n)
        if reason is not None and (reason or impl is None):
            problems.append(f"{n.target} at {n.name} ({where(n)})" + (f": {reason}" if reason
                                                                      else ""))
            names.append(n.name)
    return problems


def secret_integer_inputs(g: ModelGraph, secret: Set[str]) -> Dict[str, int]:
    """Secret integer inputs (labels) -> table size of the embedding they index.

    A secret integer cannot index a table; it is shared one-hot instead, and the embedding
    becomes a product. Raises if such an input reaches anything but an embedding lookup
    through dtype casts.
    """
    out: Dict[str, int] = {}
    for n in g.nodes():
        if n.op != "placeholder" or n.name not in g.inputs or n.name not in secret:
            continue
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dtype.is_floating_point:
            continue
        sizes = _embedding_sizes(n)
        if not sizes or len(set(sizes)) != 1 or not all(isinstance(v, int) for v in sizes):
            arg = g.inputs[n.name][0]
            raise UnsupportedOpsError(
                [f"secret integer input {arg!r} must only index embedding tables (found uses "
                 f"{sizes})"],
                [f"hint: a secret integer is shared one-hot and can only select rows of an "
                 f"embedding table. If {arg!r} is public (a timestep), declare it: "
                 f"encrypt(model, example, public={sorted(set(DEFAULT_PUBLIC) | {arg})!r}); "
                 f"for secret labels use a model whose labels index an embedding "
                 f"(e.g. diffusers num_class_embeds=N, class_embed_type=None)."])
        out[g.inputs[n.name][0]] = sizes[0]
    return out


_CASTS = {torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype_layout,
          torch.ops.aten._assert_tensor_metadata.default}


def _embedding_sizes(node) -> List[Any]:
    sizes = []
    for user in node.users:
        if user.target is torch.ops.aten.embedding.default and user.args[1] is node:
            sizes.append(user.args[0].meta["val"].shape[0])
        elif user.target in _CASTS:
            if user.target is not torch.ops.aten._assert_tensor_metadata.default:
                sizes += _embedding_sizes(user)
        else:
            sizes.append(str(user.target))
    return sizes


# ------------------------------------------------------------------ graph rewrites
#
# Applied to every party's graph identically (they depend on the graph's structure only):
# in-place ops become their functional forms, eval-mode BatchNorm becomes a per-channel affine
# map whose scale and shift depend on the weights only (and are then folded by fold_state).

_VIEW_OPS = {"view", "reshape", "_unsafe_view", "slice", "select", "narrow", "transpose", "t",
             "permute", "unsqueeze", "squeeze", "expand", "alias", "as_strided", "unflatten",
             "flatten", "diagonal", "movedim", "unfold", "split", "chunk", "unbind",
             "split_with_sizes", "tensor_split", "detach", "getitem"}


def _op_name(target) -> Tuple[str, str]:
    schema = getattr(target, "_schema", None)
    if schema is None:
        return getattr(target, "__name__", str(target)), ""
    return schema.name.split("::", 1)[-1], target._overloadname


def _functional_of(target):
    name, overload = _op_name(target)
    if not name.endswith("_") or name.endswith("__") or getattr(target, "_schema", None) is None:
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    return getattr(packet, overload, None) if packet is not None else None


def _view_base(node):
    """The tensor a view-producing node aliases (None when ``node`` owns its memory)."""
    name, _ = _op_name(node.target) if node.op == "call_function" else ("", "")
    if name in _VIEW_OPS and node.args and isinstance(node.args[0], torch.fx.Node):
        return node.args[0]
    return None


def _meta_like(new, old, val=None) -> None:
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in old.meta:
            new.meta[key] = old.meta[key]
    if val is not None:
        new.meta["val"] = val


def _functionalize(graph: torch.fx.Graph) -> None:
    """``x.add_(y)`` -> ``x' = x + y`` with every later use of ``x`` reading ``x'``.

    An in-place op on a view whose base is read again later would need the base updated as
    well; such a node is left as it is and reported (``meta['cipherdm_reason']``) when it
    acts on a secret.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        functional = _functional_of(node.target)
        if functional is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        target = node.args[0]
        i = order[node]
        base, aliased = _view_base(target), False
        while base is not None:
            if any(order.get(u, -1) > i for u in base.users):
                aliased = True
                break
            base = _view_base(base)
        if aliased:
            node.meta["cipherdm_reason"] = ("in-place op on a view of a tensor that is read "
                                            "again (rewrite the model out of place)")
            continue
        with graph.inserting_after(node):
            new = graph.call_function(functional, node.args, node.kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        for use in list(target.users):
            if use is not new and order.get(use, -1) > i:
                use.replace_input_with(target, new)
        graph.erase_node(node)
        order[new] = i


def _decompose_batch_norm(graph: torch.fx.Graph) -> None:
    """Eval-mode ``batch_norm(x, w, b, mean, var)`` -> ``x * scale + shift`` per channel,
    ``scale = w * rsqrt(var + eps)``, ``shift = b - mean * scale`` (functions of the weights
    only: folded into shared constants by :func:`fold_state`, never computed on shares)."""
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.batch_norm.default:
            continue
        x, w, b, mean, var, training = node.args[:6]
        eps = node.args[7] if len(node.args) > 7 else node.kwargs.get("eps", 1e-5)
        if training or mean is None or var is None:
            node.meta["cipherdm_reason"] = ("BatchNorm in training mode or without running "
                                            "statistics (call model.eval())")
            continue
        c = mean.meta["val"].shape[0]
        ndim = x.meta["val"].dim()
        shape = [1, c] + [1] * (ndim - 2)
        vec = torch.empty(c)

        def call(op, *args, val=vec):
            n = graph.call_function(op, args)
            _meta_like(n, node, val)
            return n

        with graph.inserting_before(node):
            scale = call(aten.rsqrt.default, call(aten.add.Tensor, var, float(eps)))
            if w is not None:
                scale = call(aten.mul.Tensor, scale, w)
            shifted = call(aten.mul.Tensor, mean, scale)
            shift = call(aten.sub.Tensor, b, shifted) if b is not None else \
                call(aten.neg.default, shifted)
            s4 = call(aten.view.default, scale, shape, val=torch.empty(shape))
            h4 = call(aten.view.default, shift, shape, val=torch.empty(shape))
            y = call(aten.mul.Tensor, x, s4, val=node.meta.get("val"))
            out = call(aten.add.Tensor, y, h4, val=node.meta.get("val"))
        node.replace_all_uses_with(out)
        graph.erase_node(node)


# common-subexpression elimination in rewrite(); off only to measure the graph without it
# (bench/bench_unet_forward.py --no-cse). Every party must use the same value.
CSE = True


def _cse_key(value) -> Any:
    """A hashable stand-in of a node argument: nodes by identity, scalars by type and repr."""
    if isinstance(value, torch.fx.Node):
        return ("node", value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_cse_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _cse_key(v)) for k, v in value.items())))
    if isinstance(value, (bool, int, float, str, type(None), torch.dtype, torch.device,
                          torch.layout, torch.memory_format)):
        return (type(value).__name__, repr(value))
    return None  # a tensor constant or anything else: not compared, never merged


def _pure(target) -> bool:
    """A call whose result depends on its arguments only: no randomness, no mutation."""
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags or \
            torch.Tag.nondeterministic_bitwise in target.tags:
        return False
    schema = target._schema
    if schema.is_mutable or any(a.alias_info is not None and a.alias_info.is_write
                                for a in schema.arguments):
        return False
    name = target.name()
    return not any(word in name for word in ("rand", "dropout", "bernoulli", "normal",
                                             "empty", "uniform", "multinomial", "poisson"))


def eliminate_common_subexpressions(graph: torch.fx.Graph) -> int:
    """Compute identical pure nodes on identical inputs once (in place); returns how many
    nodes were merged.

    Two ``call_function`` nodes with the same target and the same arguments (the same nodes
    after this pass, equal scalars) give the same value when the op is deterministic and does
    not mutate (:func:`_pure`), so later ones are replaced by the first: e.g. a UNet's
    ``silu(temb)`` recomputed in every ResNet block runs once. A rewrite of the public graph:
    every party exports the same graph and takes the same decision.
    """
    seen: Dict[Any, torch.fx.Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not _pure(node.target) or \
                node.meta.get("cipherdm_reason"):
            continue
        args, kwargs = _cse_key(node.args), _cse_key(dict(node.kwargs))
        if _unhashable(args) or _unhashable(kwargs):
            continue
        key = (node.target, args, kwargs)
        first = seen.get(key)
        if first is None:
            seen[key] = node
            continue
        node.replace_all_uses_with(first)
        graph.erase_node(node)
        merged += 1
    return merged


def _unhashable(key) -> bool:
    if key is None:
        return True
    if isinstance(key, tuple):
        return any(_unhashable(k) for k in key)
    return False


def rewrite(g: ModelGraph) -> ModelGraph:
    """Functional in-place ops, eval-mode BatchNorm as a per-channel affine map, common
    subexpressions computed once (in place)."""
    _functionalize(g.graph)
    _decompose_batch_norm(g.graph)
    if CSE:
        eliminate_common_subexpressions(g.graph)
    return g


def fold_state(g: ModelGraph, secret: Set[str], state_values: Optional[Dict[str, Any]]) -> int:
    """Replace every subgraph that depends only on the weights (and constants) by one new
    weight: the owner computes it in plaintext (``state_values``: its state dict; ``None`` on
    the other parties, which only need shapes), and it is shared like any weight. E.g. the
    BatchNorm scale ``w * rsqrt(var + eps)`` costs no secure rsqrt. Returns how many."""
    graph = g.graph
    state_only: Set[torch.fx.Node] = set()
    for n in graph.nodes:
        if n.op != "call_function" or n.name not in secret:
            continue
        if not isinstance(n.meta.get("val"), torch.Tensor):
            continue
        ok = all(a in state_only or (a.op == "placeholder" and (a.name in g.state
                                                                 or a.name in g.constants))
                 for a in n.all_input_nodes)
        if ok and n.all_input_nodes:
            state_only.add(n)
    frontier = [n for n in graph.nodes if n in state_only
                and any(u not in state_only for u in n.users)]
    if not frontier:
        return 0
    values: Dict[str, Any] = {}
    if state_values is not None:
        env: Dict[str, Any] = {}
        for n in graph.nodes:
            if n.op == "placeholder":
                if n.name in g.state:
                    env[n.name] = state_values[g.state[n.name]].detach()
                elif n.name in g.constants:
                    env[n.name] = g.constants[n.name]
            elif n in state_only:
                args = torch.fx.node.map_arg(n.args, lambda a: env[a.name])
                kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a.name])
                with torch.no_grad():
                    env[n.name] = n.target(*args, **kwargs)
        values = {n.name: env[n.name] for n in frontier}
    first = next(n for n in graph.nodes if n.op != "placeholder")
    for n in frontier:
        key = f"folded::{n.name}::{_structure_digest(n, g, state_only)}"
        with graph.inserting_before(first):
            ph = graph.placeholder(f"folded_{n.name}")
        _meta_like(ph, n, n.meta["val"])
        n.replace_all_uses_with(ph)
        g.state[ph.name] = key
        g.folded[key] = values.get(n.name)
        secret.add(ph.name)
    for n in reversed(list(graph.nodes)):
        if n in state_only and not n.users:
            graph.erase_node(n)
            secret.discard(n.name)
    return len(frontier)


def _structure_digest(node, g: ModelGraph, state_only) -> str:
    memo: Dict[str, str] = {}

    def desc(n) -> str:
        if n.name in memo:
            return memo[n.name]
        if n.op == "placeholder":
            out = g.state.get(n.name) or f"const:{n.name}"
        else:
            args = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: desc(a))
            out = f"{n.target}{args!r}"
        memo[n.name] = out
        return out

    return hashlib.sha1(desc(node).encode()).hexdigest()[:12]


def _secret_sources(node, g: ModelGraph, secret: Set[str]) -> Tuple[Set[str], Set[str]]:
    """(secret input names, state keys) that ``node`` depends on."""
    inputs, state, seen, stack = set(), set(), set(), [node]
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.op == "placeholder":
            if n.name in g.state and n.name in secret:
                state.add(g.state[n.name])
            elif n.name in g.inputs and n.name in secret:
                inputs.add(g.inputs[n.name][0])
        stack.extend(a for a in n.all_input_nodes if a.name in secret)
    return inputs, state


def hints(g: ModelGraph, secret: Set[str], problem_nodes: Sequence[str]) -> List[str]:
    """What would make the problem nodes public: inputs for ``public=`` or parameters that
    may be public by nature for ``public_params=``."""
    by_name = {n.name: n for n in g.nodes()}
    inputs, state_only = set(), set()
    for name in problem_nodes:
        if name not in by_name:
            continue
        ins, st = _secret_sources(by_name[name], g, secret)
        if ins:
            inputs |= ins
        else:
            state_only |= st
    out = []
    if inputs:
        names = sorted(inputs)
        out.append(f"hint: these ops act on secret input(s) {names}. If an input is public "
                   f"(a timestep / noise level), declare it: encrypt(model, example, "
                   f"public={sorted(set(DEFAULT_PUBLIC) | set(names))!r}).")
    if state_only:
        names = sorted(state_only)
        out.append(f"hint: these ops depend on secret parameter(s) {names} and public values "
                   f"only. If those parameters are public by nature (a Fourier feature "
                   f"projection, a positional table), declare them: encrypt(model, example, "
                   f"public_params={names!r}).")
    return out
