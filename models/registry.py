"""The model registry: `build(name, **params) -> (nn.Module, example_inputs)`.

Model modules register builders with `@register(name, small=...)`. A builder is
a function of keyword parameters (batch, res / seq, depth, ...) returning
(module, example_inputs). `small` holds the parameters the CI tests use; the
builder's own defaults are the published, full-size configuration.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_REGISTRY: dict[str, ModelSpec] = {}
_UNAVAILABLE: dict[str, str] = {}  # name -> why it cannot be built here (a missing optional extra)


class ModelSpecError(ValueError):
    """An unknown model name or parameter; the message lists what exists."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., tuple[Any, tuple]]  # (**params) -> (nn.Module, example_inputs)
    small: dict[str, Any] = field(default_factory=dict)  # parameters for quick tests
    family: str = "cnn"  # cnn | video | segmentation | transformer | nas | randwire | hf | synthetic
    description: str = ""

    def defaults(self) -> dict[str, Any]:
        sig = inspect.signature(self.builder)
        return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def register(name: str, *, small: dict[str, Any] | None = None, family: str = "cnn", description: str = ""):
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelSpec(name, fn, dict(small or {}), family, description or (fn.__doc__ or "").strip())
        return fn

    return deco


def unavailable(name: str, reason: str) -> None:
    """Declare a model that this installation cannot build: `spec(name)` raises ModelSpecError(reason)
    and `names()` leaves it out (models/hf.py without transformers)."""
    _UNAVAILABLE[name] = reason


def spec(name: str) -> ModelSpec:
    _load_all()
    if name in _UNAVAILABLE and name not in _REGISTRY:
        raise ModelSpecError(_UNAVAILABLE[name])
    if name not in _REGISTRY:
        raise ModelSpecError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def names(family: str | None = None) -> list[str]:
    _load_all()
    return sorted(n for n, s in _REGISTRY.items() if family is None or s.family == family)


def build(name: str, **params):
    """Build a registry model in eval mode with a fixed seed: (nn.Module, example_inputs)."""
    import torch

    s = spec(name)
    known = s.defaults()
    unknown = set(params) - set(known)
    if unknown:
        raise ModelSpecError(f"model {name!r} has no parameter {', '.join(sorted(unknown))}; "
                             f"parameters: {', '.join(f'{k}={v}' for k, v in known.items())}")
    torch.manual_seed(0)
    module, inputs = s.builder(**params)
    return module.eval(), tuple(inputs)


def build_small(name: str, **overrides):
    return build(name, **{**spec(name).small, **overrides})


def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """'zoo:resnet50:batch=32,res=224' -> ('resnet50', {'batch': 32, 'res': 224})."""
    body = text[4:] if text.startswith("zoo:") else text
    name, _, rest = body.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ModelSpecError(f"parameter {item!r} in {text!r} is not key=value")
        params[key.strip()] = _parse_value(value.strip())
    spec(name)  # unknown names fail here with the list of known ones
    return name, params


def _parse_value(v: str) -> Any:
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def export_onnx(name: str, path: str, *, weights: bool = True, **params) -> str:
    """Export a registry model to ONNX (TorchScript exporter: fast, and the Identity
    weight copies it emits are what real-world files look like). With weights=False
    the initializers go to external data that is then deleted: enough for planning."""
    import os

    import onnx
    import torch

    module, inputs = build(name, **params)
    with torch.no_grad():
        torch.onnx.export(module, inputs, path, dynamo=False, opset_version=17,
                          input_names=[f"input{i}" for i in range(len(inputs))])
    if not weights:
        model = onnx.load(path)
        data = os.path.basename(path) + ".data"
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data)
        os.remove(os.path.join(os.path.dirname(path) or ".", data))
    return path


_LOADED = False


def _load_all() -> None:
    """Import every model module once so that their @register calls run."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib
    import pkgutil

    import models

    for m in pkgutil.iter_modules(models.__path__):
        if m.name not in ("registry",) and not m.name.startswith("_"):
            importlib.import_module(f"models.{m.name}")
