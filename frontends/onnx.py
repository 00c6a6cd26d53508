"""ONNX files -> LifetimeGraph.

The file is read without its external data (a model whose weight file was
deleted still plans). `onnx_fold.resolve` gives every value a static shape and
removes the nodes that only compute constants; what remains becomes ops:
  - initializers, the TorchScript exporter's Identity copies of them, and
    folded constants too large for attrs become weights;
  - Transpose, Split, Identity and inference-mode Dropout outputs are views of
    their data input, and so are Reshape / Flatten / Squeeze / Unsqueeze outputs
    where ATen's view would be (onnx_layout tracks strides; a reshape of a
    permuted tensor is a copy, as in core ATen);
  - constants an op still reads go into its attrs, not into tensors;
  - with fuse=True (the default) MatMul + bias Add and the GELU / SiLU
    decompositions become single ops again (onnx_fuse).
FLOPs: Conv / ConvTranspose / MatMul / Gemm by formula (2 per multiply-add,
as torch.utils.flop_counter counts), views zero, every other op its output's
element count.

attrs of every op, enough to replay it through ATen kernels:
  {"onnx_op": "Conv", "attributes": {...}, "const_inputs": {"1": {"value": [...],
   "dtype": "int64", "shape": [2]}}, "input_positions": [ONNX input index of each
   op input], "output_positions": [ONNX output index of each op output]}
with non-finite floats encoded as {"float": "inf"}.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, helper, numpy_helper

from frontends import onnx_fuse
from frontends.common import FrontendError, GraphBuilder, Lowered, json_float
from frontends.onnx_fold import FOLD_LIMIT, StaticGraph, Value, base_dir_of, resolve
from frontends.onnx_layout import view_nodes

ELEMENTWISE_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "Asin", "Asinh", "Atan", "Atanh", "BitShift", "Ceil", "Celu", "Clip",
    "Cos", "Cosh", "Div", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "LeakyRelu", "Log",
    "Max", "Mean", "Min", "Mish", "Mod", "Mul", "Neg", "Not", "Or", "Pow", "PRelu", "Reciprocal", "Relu", "Round",
    "Selu", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Sub", "Sum", "Swish", "Tan", "Tanh",
    "ThresholdedRelu", "Where", "Xor",
})
_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                         "Multinomial", "Bernoulli", "Dropout"})


def lower_onnx(path: str | Path, *, input_shapes: dict[str, tuple[int, ...]] | None = None,
               elem_size: int | None = None, name: str | None = None, load_weights: bool = False,
               fuse: bool = True) -> Lowered:
    """Lower an ONNX file; `input_shapes` fixes symbolic input dims ({"input0": (1, 3, 224, 224)}).

    fuse=True undoes the exporter's decompositions of linear layers and GELU / SiLU (see onnx_fuse).
    """
    where = str(path)
    model = load(path)
    if load_weights:
        _load_data(model, where)
    static = resolve(model, input_shapes, where, base_dir_of(where))
    if fuse:
        static = onnx_fuse.fuse(static, static.opset)
    return _Lowering(static, name or Path(where).stem, elem_size, load_weights, where).run()


def onnx_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Every initializer of an ONNX file as a numpy array (its data must be present)."""
    model = load(path)
    _load_data(model, str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def load(path: str | Path) -> onnx.ModelProto:
    """The model proto without external data; FrontendError for a missing or non-ONNX file."""
    p = Path(path)
    if not p.is_file():
        raise FrontendError(f"{path}: no such file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise FrontendError(f"{path}: not an ONNX model ({type(e).__name__})") from e
    if model.ir_version == 0 or not model.opset_import or not model.graph.output:
        raise FrontendError(f"{path}: not an ONNX model (no IR version, opset or graph outputs)")
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    return model


def _load_data(model: onnx.ModelProto, where: str) -> None:
    """Read the external weight data of `model` in place; FrontendError when it is gone."""
    try:
        onnx.external_data_helper.load_external_data_for_model(model, base_dir_of(where))
    except (OSError, onnx.checker.ValidationError) as e:
        lines = str(e).strip().splitlines()
        raise FrontendError(f"{where}: weight data is missing ({lines[0] if lines else type(e).__name__})") from e


def dtype_name(elem_type: int) -> str:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name


class _Lowering:
    def __init__(self, static: StaticGraph, name: str, elem_size: int | None, load_weights: bool,
                 where: str) -> None:
        self.s = static
        self.gb = GraphBuilder(name, elem_size)
        self.load_weights = load_weights
        self.where = where
        self.ids: dict[str, int] = {}  # value name -> tensor id (weights are created on first use)
        self.weights: dict[str, Any] = {}

    def run(self) -> Lowered:
        v = self.s.values
        inputs = tuple(self.gb.tensor(x, v[x].shape, dtype_name(v[x].elem_type), "input") for x in self.s.inputs)
        self.ids.update(zip(self.s.inputs, inputs))
        self.views = view_nodes(self.s)
        for i, kept in enumerate(self.s.nodes):
            self._add(kept.node, kept.name, kept.fused_from, i in self.views.nodes)
        outs = [self._tensor_of(x) for x in self.s.outputs]

        def copy_op(src: int, dst: int) -> tuple[str, dict[str, Any]]:
            return "Identity", {"onnx_op": "Identity", "attributes": {}, "const_inputs": {},
                                "input_positions": [0], "output_positions": [0]}

        graph, outputs = self.gb.finish(outs, copy_op)
        return Lowered(graph, self.weights, inputs, outputs, "onnx")

    def _tensor_of(self, x: str) -> int:
        """Tensor id of value `x`; weights (and constants read as tensors) get theirs here."""
        if x in self.ids:
            return self.ids[x]
        val = self.s.values[x]
        wname = val.weight or x
        if wname not in self.ids:
            tid = self.gb.tensor(wname, val.shape, dtype_name(val.elem_type), "weight")
            self.ids[wname] = tid
            if val.const is not None and val.weight is None:
                self.weights[self.gb.tensor_name(tid)] = val.const
            elif self.load_weights and wname in self.s.initializers:
                self.weights[self.gb.tensor_name(tid)] = numpy_helper.to_array(self.s.initializers[wname])
        self.ids[x] = self.ids[wname]
        return self.ids[x]

    def _add(self, node: onnx.NodeProto, name: str, fused_from: tuple[str, ...], is_view: bool) -> None:
        v = self.s.values
        in_ids, positions, consts = [], [], {}
        for pos, x in enumerate(node.input):
            if not x:
                continue
            val = v[x]
            if val.const is not None and val.weight is None and val.const.size <= FOLD_LIMIT:
                consts[str(pos)] = encode_array(val.const)
            else:
                in_ids.append(self._tensor_of(x))
                positions.append(pos)
        op = node.op_type
        view_of = in_ids[0] if positions[:1] == [0] and is_view else None
        out_ids, out_positions = [], []
        for pos, x in enumerate(node.output):
            if not x:
                continue
            tid = self.gb.tensor(x, v[x].shape, dtype_name(v[x].elem_type), "activation", view_of,
                                 full_view=x in self.views.contiguous)
            self.ids[x] = tid
            out_ids.append(tid)
            out_positions.append(pos)
        attrs = {"onnx_op": op, "attributes": encode_attributes(node, name, self.where), "const_inputs": consts,
                 "input_positions": positions, "output_positions": out_positions}
        if node.domain not in ("", "ai.onnx"):
            attrs["domain"] = node.domain
        if fused_from:
            attrs["fused_from"] = list(fused_from)
        if view_of is None and op in _RANDOM_OPS:  # recomputed with its first run's numbers (planner.runtime.rng)
            attrs["random"] = True
        flops = 0.0 if view_of is not None else _flops(node, [v[x] if x else None for x in node.input],
                                                       v[node.output[0]])
        self.gb.op(name, op, in_ids, out_ids, flops=flops, elementwise=op in ELEMENTWISE_OPS, attrs=attrs)


def _flops(node: onnx.NodeProto, ins: list[Value | None], out: Value) -> float:
    """2 per multiply-add for Conv / ConvTranspose / MatMul / Gemm, else the output's element count."""
    op, n_out = node.op_type, math.prod(out.shape)
    if op == "Conv" and ins[1] is not None:
        return 2.0 * n_out * math.prod(ins[1].shape[1:])
    if op == "ConvTranspose" and ins[1] is not None:
        return 2.0 * math.prod(ins[0].shape) * math.prod(ins[1].shape[1:])
    if op == "MatMul":
        return 2.0 * n_out * ins[0].shape[-1]
    if op == "MatMulAdd":  # memplan::MatMulAdd = MatMul + bias Add
        return 2.0 * n_out * ins[0].shape[-1] + n_out
    if op == "Attention" and len(ins) >= 3:  # Q K^T and P V (frontends.onnx_attention): 4-D inputs
        q, k, v = (x.shape for x in ins[:3])
        return 2.0 * math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])
    if op == "Gemm":
        trans_a = any(a.name == "transA" and a.i for a in node.attribute)
        return 2.0 * n_out * ins[0].shape[0 if trans_a else 1]
    return float(n_out)


def encode_array(a: np.ndarray) -> dict[str, Any]:
    """A constant as JSON: nested lists, the dtype name and the shape."""
    values = a.tolist()
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
        values = _map_floats(values)
    return {"value": values, "dtype": a.dtype.name, "shape": list(a.shape)}


def _map_floats(x):
    return [_map_floats(e) for e in x] if isinstance(x, list) else json_float(x)


def encode_attributes(node: onnx.NodeProto, name: str, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise FrontendError(f"{where}: node {name!r} has a subgraph attribute {a.name!r}; not supported")
        value = helper.get_attribute_value(a)
        out[a.name] = _encode_attr(value)
    return out


def _encode_attr(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float):
        return json_float(value)
    if isinstance(value, TensorProto):
        return encode_array(numpy_helper.to_array(value))
    if isinstance(value, (list, tuple)):
        return [_encode_attr(v) for v in value]
    return value
