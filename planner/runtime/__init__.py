"""Plan replay: the arena executor (executor), ATen and ONNX kernels (aten_ops, onnx_ops), `memplan
replay` (replay) and the torch.compile backend "memplan" (backend). Imported lazily: torch only."""
