"""Serving a trained model: the complete saved model of any method (`saved_model`), prediction on image files
(`predict`), the serialized predict function (`export`, jax.export) and the ONNX graph (`onnx_graph`)."""
