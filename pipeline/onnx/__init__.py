"""The exported graphs: tf2onnx conversion, the row fill, the CUDA rewrites, ONNX-vs-Keras checks."""
