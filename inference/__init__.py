"""Models and decoding: GGUF weights, the ONNX graph, ONNX Runtime sessions, tokenizers."""
