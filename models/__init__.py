"""Benchmark networks defined in code (random init, nothing downloaded) and graph generators."""

from models.registry import ModelSpecError, build, build_small, export_onnx, names, parse_spec, spec

__all__ = ["build", "build_small", "names", "spec", "parse_spec", "export_onnx", "ModelSpecError"]
