"""One-off tools: the ONNX export and the random-weights model builder (need the export extra: torch, transformers)."""
