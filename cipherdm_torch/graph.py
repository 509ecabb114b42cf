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

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.utils._pytree import tree_flatten

from . import ops

__all__ = ["ModelGraph", "UnsupportedOpsError", "bind_inputs", "export_graph", "secret_nodes",
           "unsupported_ops", "where"]

DEFAULT_PUBLIC = ("timestep", "timesteps", "t", "noise_labels", "sigma", "c_noise",
                  "return_dict")


class UnsupportedOpsError(NotImplementedError):
    """The model uses ops on secret values that cannot be evaluated; ``problems`` lists them."""

    def __init__(self, problems: List[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} unsupported op use(s) on secret values:\n  "
                         + "\n  ".join(problems))


@dataclass
class ModelGraph:
    """One exported program plus what each placeholder is (secret state, constant, input)."""

    program: ExportedProgram
    input_order: List[str]  # keyword order the program was exported with
    state: Dict[str, str] = field(default_factory=dict)  # placeholder -> state-dict key (secret)
    constants: Dict[str, Any] = field(default_factory=dict)  # placeholder -> public value
    inputs: Dict[str, Tuple[str, int]] = field(default_factory=dict)  # placeholder -> (arg, leaf#)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph

    def nodes(self):
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


def export_graph(model: torch.nn.Module, inputs: Dict[str, Any]) -> ModelGraph:
    """``torch.export`` the model on named example ``inputs`` and classify its placeholders."""
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
        if spec.kind == InputKind.PARAMETER:
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
                    registry: Callable[[Any], Optional[ops.OpImpl]] = ops.lookup) -> List[str]:
    """Every secret node the registry cannot evaluate, as 'op at node (where): why' lines."""
    problems = []
    for n in g.nodes():
        if n.op in ("call_method", "call_module"):
            problems.append(f"{n.op} {n.target} at {n.name} ({where(n)})")
            continue
        if n.op != "call_function" or n.name not in secret:
            continue
        impl = registry(n.target)
        if impl is None:
            problems.append(f"{n.target} at {n.name} ({where(n)})")
        elif impl.check is not None:
            reason = impl.check(n)
            if reason:
                problems.append(f"{n.target} at {n.name} ({where(n)}): {reason}")
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
        if not sizes or len(set(sizes)) != 1:
            raise UnsupportedOpsError([f"secret integer input {g.inputs[n.name][0]!r} must only "
                                       f"index embedding tables (found uses {sizes})"])
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
