"""torch modules -> LifetimeGraph, through torch.export and the core ATen decompositions.

`torch.export.export(module, inputs).run_decompositions(table)` gives a functional
graph of core ATen ops with a fake tensor (shape, dtype) on every node. The
table is torch.export's default, less the element-wise activations that ATen
computes in one kernel with an out= variant (hardswish, hardsigmoid, silu, mish,
softplus, soft/hardshrink; `_KEPT_ACTIVATIONS`): decomposed, each would leave
3-4 full-size intermediates that no runtime allocates and ONNX does not have. Each
call_function node becomes one op; `getitem` nodes fold into the outputs of the
multi-output op they index; every tensor an op returns is one of its outputs,
read or not (max-pool's indices, BatchNorm's saved statistics), because the
kernel writes it all the same. Nodes that return nothing are run-time
assertions and are dropped. Parameters, buffers and constants become weights,
user inputs become inputs. A result is a view when the op's schema says it
aliases an argument (`Tensor(a)` returns that are not writes; every element of a
`Tensor(a)[]` list, as split returns), plus `aten._unsafe_view`, which shares
storage although its schema does not say so. Eval-mode modules first get the
inference rewrites of frontends.fx_inference (common subexpressions once, clones
of contiguous values dropped, BatchNorm folded into the preceding convolution,
unread max-pool indices not computed). A view that covers its root contiguously
(by its fake tensor's strides) is a full view: element-wise ops may work in
place through it (frontends.common).
A graph output that reshapes (view / _unsafe_view) a result nothing else reads
is written in its output shape by that result's op, which then carries
"result_shapes" (below): the output owns storage without a copy, as at run time,
where _unsafe_view exists for exactly this (a fresh mm result taking the
(batch, seq, vocab) shape of an LM head's logits).
FLOPs come from torch.utils.flop_counter's formulas (matmuls, convolutions and
their backward, attention); reductions and pooling count the elements of their
largest input or output, every other op its output elements, views zero.

attrs of every op, enough to replay it through ATen:
  {"target": "aten.convolution.default", "args": [...], "kwargs": {...},
   "results": [tuple position of each op output] or null for a single tensor,
   "result_shapes": [shape the kernel returns, or null where it is the tensor's own]
                    (only on ops that write a reshaped graph output)}
with tensors encoded as {"t": tensor id}, dtypes as {"dtype": "float32"},
devices / layouts / memory formats as {"device": "cpu"} / {"layout": ...} /
{"memory_format": ...}, non-finite floats as {"float": "inf"}.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Collection, Sequence
from typing import Any

from frontends.common import FrontendError, GraphBuilder, Lowered, json_float
from frontends.fx_inference import InferenceRewrites, NewWeight, rewrite

# storage-sharing ops whose schema carries no alias annotation
_UNANNOTATED_VIEWS = frozenset({"aten._unsafe_view.default"})
_RESHAPES = frozenset({"aten.view.default", "aten._unsafe_view.default"})
_KEPT_ACTIVATIONS = ("hardswish", "hardsigmoid", "silu", "mish", "softplus", "softshrink", "hardshrink")


def decomposition_table():
    """Core ATen, except the one-kernel activations (see the module docstring); training graphs
    (frontends.training) are traced through the same table, so lowering them decomposes nothing more."""
    import torch

    table = torch.export.default_decompositions()
    for name in _KEPT_ACTIVATIONS:
        table.pop(getattr(torch.ops.aten, name).default, None)
    return table


def _decompose(ep):
    return ep.run_decompositions(decomposition_table())


def lower_module(module, example_inputs: Sequence[Any], *, name: str | None = None,
                 elem_size: int | None = None, rewrites: InferenceRewrites | None = None) -> Lowered:
    """Lower an nn.Module called on `example_inputs` (positional) to a Lowered graph.

    `rewrites`: the inference rewrites (frontends.fx_inference); by default all of
    them for a module in eval mode and none in training mode, where asking for
    the inference-only ones is an error. `InferenceRewrites.none()` lowers the
    graph as exported.
    """
    import torch

    gname = name or type(module).__name__
    if rewrites is None:
        rewrites = InferenceRewrites.none() if module.training else InferenceRewrites()
    elif rewrites.inference_only() and module.training:
        raise FrontendError(f"{gname}: the module is in training mode; inference rewrites apply to eval "
                            "graphs only (call .eval() or pass InferenceRewrites.none())")
    try:
        ep = _decompose(torch.export.export(module, tuple(example_inputs)))
    except Exception as e:  # export errors are long; the first line names the problem
        raise FrontendError(f"{gname}: torch.export failed: {_first_line(e)}") from e
    return _lower_exported(ep, gname, elem_size, tuple(example_inputs), weight_inputs=set(), rewrites=rewrites)


def lower_graph_module(gm, example_inputs: Sequence[Any], *, name: str | None = None,
                       elem_size: int | None = None, weight_inputs: Collection[int] | None = None,
                       rewrites: InferenceRewrites | None = None, trace: bool = True) -> Lowered:
    """Lower an fx.GraphModule (e.g. from Dynamo or AOTAutograd) run on `example_inputs`.

    Dynamo passes parameters and buffers as graph inputs; the inputs at the
    positions `weight_inputs` (by default: every nn.Parameter and every tensor
    Dynamo marked static, `_dynamo_static_input_type`, as it does module
    parameters and buffers) become tensors of kind "weight", still listed in
    `inputs` in call order since the caller feeds them. No inference rewrites
    unless asked for (these graphs may be training graphs; BatchNorm is folded
    only into weights the graph owns, never into ones the caller feeds).
    trace=False lowers the graph as it is, without torch.export's two traces: for
    graphs that are already functional core ATen of `decomposition_table` with a
    fake value on every node and a list of returns (AOTAutograd's joint graphs
    traced through that table: frontends.training).
    """
    import torch

    gname = name or type(gm).__name__
    if weight_inputs is None:
        weight_inputs = {i for i, x in enumerate(example_inputs)
                         if isinstance(x, torch.nn.Parameter) or getattr(x, "_dynamo_static_input_type", None)}
    weight_inputs = set(weight_inputs)
    try:
        ep = _decompose(torch.export.export(gm, tuple(example_inputs))) if trace else _as_program(gm)
    except Exception as e:
        raise FrontendError(f"{gname}: {'torch.export' if trace else 'lowering'} failed: {_first_line(e)}") from e
    return _lower_exported(ep, gname, elem_size, tuple(example_inputs), weight_inputs,
                           rewrites or InferenceRewrites.none())


def _as_program(gm):
    """The parts of an ExportedProgram that _Lowering reads, for a graph taken as it is: every
    placeholder a user input, every return a user output; tensor attributes (get_attr: constants
    AOTAutograd lifted out of the trace, e.g. transformers' causal-mask bias) are weights."""
    from types import SimpleNamespace

    from torch.export.graph_signature import InputKind, OutputKind

    graph = gm.graph
    returns = next(n for n in graph.nodes if n.op == "output").args[0]
    if not isinstance(returns, (list, tuple)):
        raise FrontendError("a graph lowered without tracing must return a list")
    inputs = [SimpleNamespace(kind=InputKind.USER_INPUT, arg=SimpleNamespace(name=n.name), target=None)
              for n in graph.nodes if n.op == "placeholder"]
    outputs = [SimpleNamespace(kind=OutputKind.USER_OUTPUT, arg=getattr(v, "name", v)) for v in returns]
    signature = SimpleNamespace(input_specs=inputs, output_specs=outputs)
    return SimpleNamespace(graph=graph, graph_signature=signature, state_dict={}, constants={}, module=gm)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_vals(val) -> list[tuple[int | None, Any]]:
    """(position in the returned tuple or None for a lone tensor, fake tensor) of each tensor result."""
    import torch

    if isinstance(val, torch.Tensor):
        return [(None, val)]
    if isinstance(val, (tuple, list)):
        return [(i, v) for i, v in enumerate(val) if isinstance(v, torch.Tensor)]
    return []


class _Lowering:
    """One pass over an exported program's graph, filling a GraphBuilder."""

    def __init__(self, ep, name: str, elem_size: int | None, weight_inputs: set[int]) -> None:
        self.ep = ep
        self.gb = GraphBuilder(name, elem_size)
        self.weight_inputs = weight_inputs
        self.ids: dict[Any, int] = {}  # fx node, or (node, tuple position), -> tensor id
        self.weights: dict[str, Any] = {}
        self.inputs: list[int] = []
        self.extra_outputs: list[int] = []  # buffer mutations: written back, not returned
        self.specs = {s.arg.name: s for s in ep.graph_signature.input_specs if hasattr(s.arg, "name")}
        self.reshaped: dict[Any, Any] = {}  # result node -> the output reshape its op writes directly
        self.contiguous: dict[int, bool] = {}  # root tensor id -> its fake tensor is contiguous

    def find_output_reshapes(self) -> None:
        """User outputs that view / _unsafe_view a result nothing else reads (see the module docstring)."""
        import torch.fx
        from torch.export.graph_signature import OutputKind

        out_node = next(n for n in self.ep.graph.nodes if n.op == "output")
        for spec, value in zip(self.ep.graph_signature.output_specs, out_node.args[0]):
            if spec.kind != OutputKind.USER_OUTPUT or not isinstance(value, torch.fx.Node) \
                    or str(value.target) not in _RESHAPES:
                continue
            src = value.args[0]
            if len(src.users) == 1 and src not in self.reshaped and _owns_storage(src):
                self.reshaped[src] = value

    def constant_of(self, node) -> tuple[str, Any] | None:
        """(name, value) of a placeholder that is a parameter, buffer or lifted constant; else None."""
        from torch.export.graph_signature import InputKind

        s = self.specs.get(node.name) if node.op == "placeholder" else None
        if s is None or s.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            return None
        return s.target, self.ep.state_dict[s.target] if s.target in self.ep.state_dict else self.ep.constants[s.target]

    def add_placeholders(self, example_inputs: Sequence[Any], new_weights: dict[str, NewWeight]) -> None:
        from torch.export.graph_signature import InputKind

        nodes = {n.name: n for n in self.ep.graph.nodes if n.op == "placeholder"}
        user_index = 0
        for pname, node in nodes.items():
            if pname in new_weights:  # made by an inference rewrite (a folded convolution weight)
                w = new_weights[pname]
                tid = self.gb.tensor(w.name, w.value.shape, _dtype_name(w.value.dtype), "weight")
                self.ids[node] = tid
                self.weights[self.gb.tensor_name(tid)] = w.value
                continue
            s = self.specs[pname]
            val = node.meta.get("val")
            if s.kind == InputKind.USER_INPUT:
                if not hasattr(val, "shape"):
                    raise FrontendError(f"{self.gb.name}: input {pname!r} is not a tensor ({type(val).__name__})")
                kind = "weight" if user_index in self.weight_inputs else "input"
                tid = self.gb.tensor(pname, val.shape, _dtype_name(val.dtype), kind)
                self.contiguous[tid] = val.is_contiguous()
                if kind == "weight":
                    self.weights[self.gb.tensor_name(tid)] = example_inputs[user_index]
                self.ids[node] = tid
                self.inputs.append(tid)
                user_index += 1
            elif s.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                if not node.users:  # never read (e.g. BatchNorm's num_batches_tracked): not part of the plan
                    continue
                target, value = self.constant_of(node)
                tid = self.gb.tensor(target, value.shape, _dtype_name(value.dtype), "weight")
                self.ids[node] = tid
                self.weights[self.gb.tensor_name(tid)] = value
            elif node.users:
                raise FrontendError(f"{self.gb.name}: input {pname!r} of kind {s.kind.name} is not supported")

    def add_attribute(self, node) -> None:
        """A tensor attribute of a graph taken as it is (trace=False): a weight the graph owns."""
        import torch

        value = getattr(self.ep, "module", None)
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        if not isinstance(value, torch.Tensor):
            raise FrontendError(f"{self.gb.name}: node {node.name!r} reads attribute {node.target!r}, "
                                "which is not a tensor; expected lifted parameters")
        if node.users:
            tid = self.gb.tensor(str(node.target), value.shape, _dtype_name(value.dtype), "weight")
            self.ids[node] = tid
            self.weights[self.gb.tensor_name(tid)] = value.detach()

    def add_call(self, node) -> None:
        import torch

        target = node.target
        if target is operator.getitem or node in self.ids:
            return  # folded: its tensor was created with the producer (a getitem, or a reshaped output)
        if not isinstance(target, torch._ops.OpOverload):
            raise FrontendError(f"{self.gb.name}: node {node.name!r} calls {target!r}, which is not an ATen op")
        schema = target._schema
        op_name = str(target)
        results = _tensor_vals(node.meta.get("val"))
        if not results:
            if node.meta.get("val") is None and not node.users:
                return  # a run-time assertion (aten._assert_tensor_metadata, ...): no data, nothing to plan
            raise FrontendError(f"{self.gb.name}: node {node.name!r} ({op_name}) returns no tensor")
        getitems = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        in_ids = [self.ids[a] for a in node.all_input_nodes if a in self.ids]
        outs, result_shapes, layouts = [], [], []
        for pos, val in results:
            alias = self._aliased_input(node, schema, op_name, 0 if pos is None else pos)
            tname = node.name if pos is None else getattr(getitems.get(pos), "name", f"{node.name}_{pos}")
            reshape = self.reshaped.get(node if pos is None else getitems.get(pos))
            shape = val.shape if reshape is None else reshape.meta["val"].shape
            # a contiguous view at offset 0 of a root laid out contiguously covers it in order (if sizes match)
            full = alias is not None and self.contiguous.get(self.gb.root(alias), False) \
                and val.is_contiguous() and val.storage_offset() == 0
            tid = self.gb.tensor(tname, shape, _dtype_name(val.dtype), "activation", alias, full_view=full)
            if alias is None:
                self.contiguous[tid] = val.is_contiguous()
            self.ids[node if pos is None else (node, pos)] = tid
            if reshape is not None:
                self.ids[reshape] = tid
            result_shapes.append(None if reshape is None else list(val.shape))
            layouts.append(_dense_strides(val) if alias is None and reshape is None else None)
            outs.append(tid)
        for user in node.users:
            if user.target is operator.getitem and (node, user.args[1]) in self.ids:  # else a None result
                self.ids[user] = self.ids[(node, user.args[1])]
        is_view = all(self.gb.kind(t) == "activation" and self.gb.root(t) != t for t in outs)
        attrs = {
            "target": op_name,
            "args": _encode(node.args, self.ids),
            "kwargs": _encode(dict(node.kwargs), self.ids),
            "results": None if results[0][0] is None else [pos for pos, _ in results],
        }
        if any(shape is not None for shape in result_shapes):
            attrs["result_shapes"] = result_shapes
        if any(layouts):  # outputs ATen lays out permuted (SDPA's (B, S, H, D) memory): the executor does too
            attrs["strides"] = layouts
        on_device = any(getattr(a.meta.get("val"), "device", None) is not None
                        and a.meta["val"].device.type != "cpu" for a in node.all_input_nodes)
        runtime_device = _RUNTIME_DEVICE_RESULTS.get(op_name, ())
        host = [k for k, (pos, val) in enumerate(results)
                if on_device and (val.device.type in ("cpu", "meta") or pos in runtime_device)]
        if host:  # results whose device the kernel picks at run time: kept as it returns them
            attrs["host_outputs"] = host
        if torch.Tag.nondeterministic_seeded in target.tags:  # recomputed with its first run's numbers
            attrs["random"] = True
        self.gb.op(node.name, op_name, in_ids, outs,
                   flops=0.0 if is_view else _flops(node, target, results),
                   elementwise=torch.Tag.pointwise in target.tags or op_name == "aten.hardswish.default",
                   attrs=attrs)

    def _aliased_input(self, node, schema, op_name: str, pos: int) -> int | None:
        """Tensor id of the argument result `pos` is a view of, or None when it owns storage."""
        if op_name in _UNANNOTATED_VIEWS:
            return self.ids[node.args[0]]
        if pos >= len(schema.returns):  # a single list return (split): every element shares its alias set
            pos = 0
        info = schema.returns[pos].alias_info
        if info is None:
            return None
        if info.is_write:
            raise FrontendError(f"{self.gb.name}: node {node.name!r} ({op_name}) mutates its input; "
                                "only functional graphs can be planned")
        # Tensor(a)[] (split, unbind): Python sees the list's empty alias set, not its elements' "a"
        is_list = str(schema.returns[pos].type).startswith("List")
        for i, arg in enumerate(schema.arguments):
            a = arg.alias_info
            if a is not None and (a.before_set & info.before_set or (is_list and not info.before_set
                                                                     and not a.is_write)):
                value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                if value in self.ids:
                    return self.ids[value]
        return None

    def add_outputs(self) -> tuple[tuple[int, ...], dict[int, Any]]:
        """User output tensor ids in return order, and the non-tensor returns by position."""
        from torch.export.graph_signature import OutputKind

        out_node = next(n for n in self.ep.graph.nodes if n.op == "output")
        values = out_node.args[0]
        user: list[int] = []
        constants: dict[int, Any] = {}
        position = 0
        for spec, value in zip(self.ep.graph_signature.output_specs, values):
            if spec.kind == OutputKind.USER_OUTPUT:
                if value in self.ids:
                    user.append(self.ids[value])
                elif value is None or isinstance(value, (bool, int, float)):
                    constants[position] = value
                elif getattr(value, "meta", {}).get("val", 0) is None:  # a getitem of a result left out (no grad)
                    constants[position] = None
                else:
                    raise FrontendError(f"{self.gb.name}: output {spec.arg} is neither a tensor nor a constant")
                position += 1
            elif value in self.ids:  # a buffer mutation (BatchNorm in training mode): written back too
                self.extra_outputs.append(self.ids[value])
            else:
                raise FrontendError(f"{self.gb.name}: {spec.kind.name} output {spec.arg} is not a tensor")
        return tuple(user), constants


def _lower_exported(ep, name: str, elem_size: int | None, example_inputs: tuple,
                    weight_inputs: set[int], rewrites: InferenceRewrites) -> Lowered:
    lw = _Lowering(ep, name, elem_size, weight_inputs)
    new_weights = rewrite(ep.graph, lw.constant_of, rewrites) if rewrites.any() else {}
    lw.add_placeholders(example_inputs, new_weights)
    lw.find_output_reshapes()
    for node in ep.graph.nodes:
        if node.op == "call_function":
            lw.add_call(node)
        elif node.op == "get_attr":
            lw.add_attribute(node)
    user_outputs, constants = lw.add_outputs()

    def copy_op(src: int, dst: int) -> tuple[str, dict[str, Any]]:
        return "aten.clone.default", {"target": "aten.clone.default", "args": [{"t": src}], "kwargs": {},
                                      "results": None}

    graph, outputs = lw.gb.finish([*user_outputs, *lw.extra_outputs], copy_op)
    return Lowered(graph, lw.weights, tuple(lw.inputs), outputs[:len(user_outputs)], "fx", constants)


# Result positions whose device the kernel picks at run time: fused attention's dropout seed and offset
# are host tensors (device ones only under CUDA-graph capture) that the backward reads on the host, while
# fake tensors report the inputs' device for them (the list torch._subclasses.fake_utils.is_sdpa_error has).
_RUNTIME_DEVICE_RESULTS = {
    "aten._scaled_dot_product_flash_attention.default": (6, 7),
    "aten._flash_attention_forward.default": (6, 7),
    "aten._scaled_dot_product_efficient_attention.default": (2, 3),
    "aten._efficient_attention_forward.default": (2, 3),
    "aten._scaled_dot_product_cudnn_attention.default": (6, 7),
}


def _dense_strides(val) -> list[int] | None:
    """The strides of a result that is dense but not contiguous (a permuted layout), else None."""
    if val.is_contiguous():
        return None
    expected = 1  # a permutation of a contiguous layout: strides, sorted, are running products of sizes
    for size, stride in sorted(((sz, st) for sz, st in zip(val.shape, val.stride()) if sz != 1),
                               key=lambda d: d[1]):
        if stride != expected:
            return None
        expected *= size
    return list(val.stride())


def _owns_storage(node) -> bool:
    """Whether an fx node's value is a tensor result of its own (not a view, input or weight)."""
    import torch

    parent, pos = (node.args[0], node.args[1]) if node.target is operator.getitem else (node, 0)
    if parent.op != "call_function" or not isinstance(parent.target, torch._ops.OpOverload) \
            or str(parent.target) in _UNANNOTATED_VIEWS or not isinstance(node.meta.get("val"), torch.Tensor):
        return False
    returns = parent.target._schema.returns
    return bool(returns) and returns[min(pos, len(returns) - 1)].alias_info is None


def _encode(value, ids: dict[Any, int]):
    """An fx argument as JSON (see the module docstring)."""
    import torch
    import torch.fx

    if isinstance(value, torch.fx.Node):
        if value not in ids:
            raise FrontendError(f"argument {value.name!r} has no tensor")
        return {"t": ids[value]}
    if isinstance(value, (list, tuple)):
        return [_encode(v, ids) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v, ids) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return json_float(value)
    if isinstance(value, torch.dtype):
        return {"dtype": _dtype_name(value)}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value)}
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise FrontendError(f"symbolic value {value} in a graph argument; export with static shapes")
    raise FrontendError(f"graph argument of type {type(value).__name__} cannot be encoded")


def _flops(node, target, results) -> float:
    """torch.utils.flop_counter's formula where one exists; reductions and pooling (forward and
    backward) count the elements of their largest input or output; every other op its output's."""
    import torch
    from torch.utils import flop_counter

    formula = flop_counter.flop_registry.get(target.overloadpacket)
    if formula is not None:
        def val(v):
            return v.meta.get("val") if isinstance(v, torch.fx.Node) else v
        args = torch.utils._pytree.tree_map(val, node.args)
        kwargs = torch.utils._pytree.tree_map(val, dict(node.kwargs))
        try:
            return float(formula(*args, out_val=node.meta.get("val"), **kwargs))
        except Exception:  # a formula that rejects these arguments: fall back to the element count
            pass
    if target.name().startswith(("aten::_scaled_dot_product_flash_attention_for_cpu",  # flop_counter: GPU only
                                 "aten::scaled_dot_product_attention")):  # fused by frontends.fx_attention
        shapes = [a.meta["val"].shape for a in node.args[:4] if isinstance(a, torch.fx.Node)]
        if target.name().endswith("_backward"):
            return float(flop_counter.sdpa_backward_flop_count(*shapes[:4]))
        return float(flop_counter.sdpa_flop_count(*shapes[:3]))
    out = float(math.prod(results[0][1].shape))
    if torch.Tag.reduction in target.tags or "pool" in target.name():  # every input element is read
        sizes = [math.prod(a.meta["val"].shape) for a in node.all_input_nodes
                 if isinstance(a.meta.get("val"), torch.Tensor)]
        return max([out, *map(float, sizes)])
    return out
