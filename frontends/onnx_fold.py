"""Static shapes for every ONNX value: constant folding plus per-node shape inference.

Real transformer exports compute shapes at run time (Shape -> Gather -> Concat ->
Reshape / Expand / Slice / Range / Where), and ONNX's whole-model shape
inference leaves hundreds of values unknown. Once the graph inputs have static
shapes, one pass in program order settles every value:
  1. Constant, and any deterministic node whose inputs all have known values, is
     evaluated with onnx.reference (numpy) and disappears from the op list;
  2. Shape and Size of a value with a known shape are constants;
  3. Identity of a weight is that weight (the TorchScript exporter's copies);
  4. every other node gets its output types from ONNX's per-node inference,
     fed the static input shapes and the values of its constant inputs.
A value whose shape is still not fully static is an error naming its node.

Known values come from Constant nodes, folded nodes, and integer / bool
initializers of at most FOLD_LIMIT elements (shape data; read even when stored
as external data, if the file is there). Float initializers are always weights,
so the same file plans the same with or without its weight data.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from frontends.common import FrontendError

FOLD_LIMIT = 4096  # elements: larger constants become weights instead of attrs
_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                         "Multinomial", "Bernoulli"})
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})


@dataclass(frozen=True)
class Value:
    shape: tuple[int, ...]
    elem_type: int  # onnx.TensorProto data type
    const: np.ndarray | None = None  # known value (folded or constant data)
    weight: str | None = None  # name of the initializer / constant this value is (Identity copies share it)


@dataclass(frozen=True)
class KeptNode:
    node: onnx.NodeProto
    name: str  # node.name, or OpType_index when the file leaves it empty
    fused_from: tuple[str, ...] = ()  # names of the exported nodes this one replaces (onnx_fuse)


@dataclass(frozen=True)
class StaticGraph:
    values: dict[str, Value]  # every value name in the graph -> its static description
    nodes: tuple[KeptNode, ...]  # nodes that remain ops, in program order
    inputs: tuple[str, ...]  # graph inputs (initializers excluded), in call order
    outputs: tuple[str, ...]
    initializers: dict[str, TensorProto]  # name -> initializer (data possibly external / absent)
    folded: int  # nodes removed by constant folding (Identity copies of weights included)
    opset: int  # default-domain opset of the model


def resolve(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None, where: str,
            base_dir: str) -> StaticGraph:
    """Static shapes, dtypes and constant values for every value of `model` (see module docstring)."""
    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise FrontendError(f"{where}: no default-domain opset import")
    inits = {t.name: t for t in g.initializer}
    values: dict[str, Value] = {}
    for t in g.initializer:
        values[t.name] = Value(tuple(t.dims), t.data_type, _initializer_const(t, base_dir), t.name)
    inputs = tuple(i.name for i in g.input if i.name not in inits)
    values.update(_input_values(g, inputs, dict(input_shapes or {}), where))

    kept: list[KeptNode] = []
    folded = 0
    for index, node in enumerate(g.node):
        name = node.name or f"{node.op_type}_{index}"
        for x in node.input:
            if x and x not in values:
                raise FrontendError(f"{where}: node {name!r} ({node.op_type}) reads {x!r}, "
                                    "which no earlier node or input produces")
        if node.domain not in ("", "ai.onnx"):
            raise FrontendError(f"{where}: node {name!r} uses operator {node.domain}::{node.op_type}, "
                                "which is outside the standard ONNX domain")
        if node.op_type in _CONTROL_FLOW:
            raise FrontendError(f"{where}: node {name!r} is control flow ({node.op_type}); not supported")
        ins = [values[x] if x else None for x in node.input]
        if _fold(node, name, ins, values, opset, where):
            folded += 1
            continue
        for out, typ in _infer(node, name, ins, opset, where, model.ir_version).items():
            values[out] = typ
        kept.append(KeptNode(node, name))
    for o in g.output:
        if o.name not in values:
            raise FrontendError(f"{where}: graph output {o.name!r} is never produced")
    return StaticGraph(values, tuple(kept), inputs, tuple(o.name for o in g.output), inits, folded, opset)


def _initializer_const(t: TensorProto, base_dir: str) -> np.ndarray | None:
    """The value of a small integer / bool initializer (shape data), else None."""
    if t.data_type not in _INDEX_TYPES or math.prod(t.dims) > FOLD_LIMIT:
        return None
    if t.data_location == TensorProto.EXTERNAL:
        t = _copy(t)
        try:
            onnx.external_data_helper.load_external_data_for_tensor(t, base_dir)
        except (OSError, onnx.checker.ValidationError):
            return None  # data deleted: the initializer stays a plain weight
    return numpy_helper.to_array(t)


def _copy(t: TensorProto) -> TensorProto:
    c = TensorProto()
    c.CopyFrom(t)
    return c


_INDEX_TYPES = frozenset({TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8,
                          TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
                          TensorProto.BOOL})


def _input_values(g: onnx.GraphProto, inputs: tuple[str, ...], given: dict[str, tuple[int, ...]],
                  where: str) -> dict[str, Value]:
    unknown = set(given) - set(inputs)
    if unknown:
        raise FrontendError(f"{where}: --input-shape names {', '.join(sorted(unknown))}, but the graph inputs "
                            f"are {', '.join(inputs)}")
    out = {}
    for i in g.input:
        if i.name not in inputs:
            continue
        tt = i.type.tensor_type
        if not i.type.HasField("tensor_type") or not tt.HasField("shape"):
            if i.name not in given:
                raise FrontendError(f"{where}: input {i.name!r} has no shape; pass --input-shape "
                                    f"{i.name}:1,3,224,224 (its real shape)")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if i.name in given:
            shape = tuple(int(d) for d in given[i.name])
            if tt.HasField("shape") and (len(shape) != len(dims) or
                                         any(d is not None and d != s for d, s in zip(dims, shape))):
                shown = ",".join("?" if d is None else str(d) for d in dims)
                raise FrontendError(f"{where}: input {i.name!r} has shape [{shown}], which the given shape "
                                    f"{list(shape)} does not fit")
        elif None in dims:
            shown = ",".join(str(d) if d is not None else (x.dim_param or "?") for d, x in zip(dims, tt.shape.dim))
            raise FrontendError(f"{where}: input {i.name!r} has symbolic shape [{shown}]; pass --input-shape "
                                f"{i.name}:{','.join(str(d) if d is not None else '1' for d in dims)} "
                                "with the sizes to plan for")
        else:
            shape = tuple(dims)
        out[i.name] = Value(shape, tt.elem_type)
    return out


def _fold(node: onnx.NodeProto, name: str, ins: list[Value | None], values: dict[str, Value], opset: int,
          where: str) -> bool:
    """Settle `node` without keeping it as an op when its outputs are constants or weight copies."""
    op = node.op_type
    real = [v for v in ins if v is not None]
    if op == "Identity" and real[0].const is None and real[0].weight is not None:
        values[node.output[0]] = real[0]  # an exporter's copy of a weight is that weight
        return True
    if op in ("Shape", "Size"):
        shape = real[0].shape
        if op == "Size":
            result = np.array(math.prod(shape), dtype=np.int64)
        else:
            attrs = {a.name: a.i for a in node.attribute}
            start, end = attrs.get("start", 0), attrs.get("end", len(shape))
            result = np.array(shape[start:end] if "end" in attrs else shape[start:], dtype=np.int64)
        values[node.output[0]] = Value(result.shape, TensorProto.INT64, result)
        return True
    if op in _RANDOM_OPS or any(v.const is None for v in real):
        return False
    feeds = {x: values[x].const for x in node.input if x}
    try:
        results = evaluate(node, feeds, opset)
    except Exception as e:  # the reference kernels reject some inputs; say which node
        raise FrontendError(f"{where}: node {name!r} ({op}) has constant inputs but cannot be evaluated: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    for out, r in zip(node.output, results):
        if out:
            arr = np.asarray(r)
            values[out] = Value(arr.shape, helper.np_dtype_to_tensor_dtype(arr.dtype), arr, None)
    return True


def evaluate(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opset: int) -> list[np.ndarray]:
    """Run one node with onnx.reference's numpy kernels at the model's opset.

    The node is wrapped in a one-node model: ReferenceEvaluator given a bare
    NodeProto ignores `opsets` and applies the newest semantics (Unsqueeze's
    axes attribute of opset 11 is then rejected)."""
    from onnx.reference import ReferenceEvaluator

    if node.op_type == "GatherElements":  # onnx.reference's kernel fails past 64 entries along the axis
        return [_gather_elements(node, feeds)]

    def untyped(names):
        return [helper.make_tensor_value_info(x, TensorProto.UNDEFINED, None) for x in names if x]

    graph = helper.make_graph([node], "node", untyped(node.input), untyped(node.output))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, feeds)


def _gather_elements(node: onnx.NodeProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """ONNX GatherElements: out[i][j][k] = data[i][index[i][j][k]][k] (axis 1); index may be shorter than
    data along the other axes, and negative indices count from the end."""
    data, index = (feeds[x] for x in node.input)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % data.ndim
    data = data[tuple(slice(None) if d == axis else slice(0, n) for d, n in enumerate(index.shape))]
    index = np.where(index < 0, index + data.shape[axis], index)
    return np.take_along_axis(data, index, axis=axis)


def _infer(node: onnx.NodeProto, name: str, ins: list[Value | None], opset: int, where: str,
           ir_version: int) -> dict[str, Value]:
    """Output shapes and types of a kept node from ONNX's per-node inference."""
    types, data = {}, {}
    for x, v in zip(node.input, ins):
        if v is None:
            continue
        types[x] = helper.make_tensor_type_proto(v.elem_type, list(v.shape))
        if v.const is not None:
            data[x] = numpy_helper.from_array(v.const, x)
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        inferred = shape_inference.infer_node_outputs(schema, node, types, data,
                                                      opset_imports=[helper.make_opsetid("", opset)],
                                                      ir_version=ir_version)
    except Exception as e:  # unknown op, or inputs the schema rejects
        raise FrontendError(f"{where}: node {name!r} ({node.op_type}): shape inference failed: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    out = {}
    for x in node.output:
        if not x:
            continue
        typ = inferred.get(x)
        tt = typ.tensor_type if typ is not None and typ.HasField("tensor_type") else None
        if tt is None or not tt.HasField("shape") or not tt.elem_type or \
                any(not d.HasField("dim_value") for d in tt.shape.dim):
            raise FrontendError(f"{where}: node {name!r} ({node.op_type}): the shape of output {x!r} "
                                "cannot be determined statically")
        out[x] = Value(tuple(d.dim_value for d in tt.shape.dim), tt.elem_type)
    return out


def base_dir_of(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))
