"""CLIP encoders: the backend contract, lazily loaded towers, ONNX Runtime and torch backends, image decoding."""
