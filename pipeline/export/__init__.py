"""The trained models outside the pipeline: ONNX graphs, onnxruntime backends, parity.

* :mod:`.graphs`: what is exported (the PVEN and the parser with their input
  normalisation inside the graph, uint8 in, features or logits out, dynamic batch),
  :func:`~.graphs.export_onnx` (written under a temporary name, then renamed) and the
  preprocessing record a consumer needs (:func:`~.graphs.preprocessing`);
* :mod:`.runtime`: onnxruntime sessions behind the same call signatures as the torch
  models (a :data:`pipeline.reid.embed.Forward` for the PVEN, logits for the parser), so
  embedding and search run on either backend through one code path;
* :func:`~.graphs.max_relative_difference`: the parity figure of the export stage.
"""
