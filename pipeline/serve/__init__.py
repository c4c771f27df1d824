"""Serving export: ONNX and int8 variants of a registered student, checked before they are registered.

- ``onnx_export.py``: export (PyTorch's dynamo exporter), int8 dynamic quantisation, ONNX Runtime sessions.
- ``gate.py``: parity with PyTorch, masked-token accuracy on the prepared validation split, batch-1 latency.
- ``text_model.py``: the served MLflow pyfunc (text in, a transformers-pipeline-shaped answer out); it imports
  nothing from distil, so a served model needs only onnxruntime, transformers and numpy.

The stage that drives them is pipeline/stages/export.py (``jobs.export``).
"""
