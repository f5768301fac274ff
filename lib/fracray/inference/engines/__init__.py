"""What runs a bundle's network forward (see docs/inference-engine.md): choice.py (which engine and
precision), fast_gate.py (when fast may run), factory.py (make_engine), base.py (the engines' common
contract), export.py (the cached ONNX export), torch_engine.py, onnxruntime_engine.py,
openvino_engine.py (the runtimes), int8.py (INT8 quantisation)."""
