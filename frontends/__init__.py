"""Frontends: ONNX files and torch modules lowered to planner.graph.LifetimeGraph.

`load_model` is the one entry point the CLI and the driver use:
  - a path ending in .onnx            -> frontends.onnx.lower_onnx
  - "zoo:NAME[:k=v,...]"              -> models.build, then fx (or, via="onnx",
                                         models.export_onnx to a temp file, then ONNX)
  - an nn.Module with example_inputs  -> frontends.fx.lower_module
Eval-mode torch modules get the fx inference rewrites (frontends.fx_inference)
unless `rewrites` says otherwise (InferenceRewrites.none(): the graph as exported).
training=True lowers one training step instead (frontends.training: forward and
backward of the module in train mode and the mean of its output), fx only.
torch and onnx are imported only when a frontend that needs them runs.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from frontends.common import FrontendError, Lowered, with_elem_size

__all__ = ["FrontendError", "Lowered", "load_model", "with_elem_size"]


def load_model(source: Any, *, input_shapes: dict[str, tuple[int, ...]] | None = None,
               elem_size: int | None = None, via: str = "fx", example_inputs=None,
               name: str | None = None, rewrites=None, training: bool = False) -> Lowered:
    """Lower an ONNX path, a "zoo:" model spec or an nn.Module (with example_inputs).

    `rewrites`: a frontends.fx_inference.InferenceRewrites for torch models lowered
    through fx (None: lower_module's default); ONNX lowerings ignore it.
    `training`: the joint forward + backward graph of a training step
    (frontends.training.lower_training; torch models through fx only).
    """
    if via not in ("fx", "onnx"):
        raise FrontendError(f"via must be 'fx' or 'onnx', not {via!r}")
    if training:
        if not (_is_module(source) or str(source).startswith("zoo:")):
            raise FrontendError(f"{source}: training graphs come from torch models (a zoo: spec or an "
                                "nn.Module), not from ONNX files")
        if via != "fx" or rewrites is not None:
            what = source if isinstance(source, str) else type(source).__name__
            raise FrontendError(f"{what}: training graphs are lowered through fx only "
                                "(via='fx', no inference rewrites)")
    if isinstance(source, str) and source.startswith("zoo:"):
        return _load_zoo(source, input_shapes, elem_size, via, name, rewrites, training)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not path.lower().endswith(".onnx"):
            hint = " (or a zoo:NAME model spec)" if isinstance(source, str) else ""
            raise FrontendError(f"{path}: unknown model format; expected a .onnx file{hint}")
        from frontends.onnx import lower_onnx

        return lower_onnx(path, input_shapes=input_shapes, elem_size=elem_size, name=name)
    if _is_module(source):
        if example_inputs is None:
            raise FrontendError(f"{type(source).__name__}: an nn.Module needs example_inputs")
        _no_input_shapes(input_shapes, type(source).__name__)
        if training:
            from frontends.training import lower_training

            return lower_training(source, tuple(example_inputs), name=name, elem_size=elem_size).lowered
        from frontends.fx import lower_module

        return lower_module(source, tuple(example_inputs), name=name, elem_size=elem_size, rewrites=rewrites)
    raise FrontendError(f"cannot load a model from a {type(source).__name__}; "
                        "pass a .onnx path, a zoo:NAME spec or an nn.Module")


def _load_zoo(spec: str, input_shapes, elem_size: int | None, via: str, name: str | None, rewrites,
              training: bool = False) -> Lowered:
    import models

    try:
        model_name, params = models.parse_spec(spec)
    except models.ModelSpecError as e:
        raise FrontendError(str(e)) from e
    _no_input_shapes(input_shapes, spec)
    if via == "onnx":
        from frontends.onnx import lower_onnx

        with tempfile.TemporaryDirectory(prefix="memplan-") as tmp:
            path = os.path.join(tmp, f"{model_name}.onnx")
            try:
                models.export_onnx(model_name, path, weights=False, **params)
            except models.ModelSpecError as e:
                raise FrontendError(str(e)) from e
            except Exception as e:  # the exporter's own failures are long; keep their first line
                first = (str(e).strip().splitlines() or [""])[0]
                raise FrontendError(f"{spec}: ONNX export failed: {type(e).__name__}: {first}") from e
            return lower_onnx(path, elem_size=elem_size, name=name or spec)
    from frontends.fx import lower_module

    try:
        module, inputs = models.build(model_name, **params)
    except models.ModelSpecError as e:
        raise FrontendError(str(e)) from e
    if training:
        from frontends.training import lower_training

        return lower_training(module.train(), inputs, name=name or spec, elem_size=elem_size).lowered
    return lower_module(module, inputs, name=name or spec, elem_size=elem_size, rewrites=rewrites)


def _is_module(obj: Any) -> bool:
    import sys

    torch = sys.modules.get("torch")  # a module can only exist if torch was imported
    return torch is not None and isinstance(obj, torch.nn.Module)


def _no_input_shapes(input_shapes, what: str) -> None:
    if input_shapes:
        raise FrontendError(f"{what}: input shapes apply to ONNX files; a torch model takes its shapes "
                            "from its example inputs (or zoo parameters such as batch=, res=, seq=)")
