"""Model export: ONNX with a dynamic batch axis, checked against the PyTorch model in onnxruntime."""
