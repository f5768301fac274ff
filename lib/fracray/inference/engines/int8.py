"""INT8 quantisation for the fast precision: ONNX Runtime's static post-training quantisation
(QDQ, per-channel weights) of the cached export, calibrated on a slice of the training images,
the high-resolution front left in float (what ``fracray validate-fast-mode --kind int8`` stores
in a bundle as FAST_GRAPH_FILE)."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import numpy as np

__all__ = ["quantize_int8", "float_front", "FLOAT_FRONT_STRIDE"]


# Quantised only where the feature maps are at most 1/FLOAT_FRONT_STRIDE of the input: the
# full-resolution front (the stem and the stages at stride 2 and 4, where a hairline fracture is a
# few pixels wide) stays float32. Measured on the 384 px FracAtlas bundle: INT8 everywhere moved
# probabilities by 0.07 on average (AUROC -0.006, gate failed), most of it from quantising the
# normalised image itself at the stem; with the front in float the mean change was 0.01.
FLOAT_FRONT_STRIDE = 8
# Calibration inputs run through the graph at a time: ORT keeps every activation of every input
# it has been given until it computes ranges (percentile calibration on 128 inputs at 384 px was
# killed for memory on a 24 GiB machine).
CALIBRATION_STRIDE_MAX = 16


def float_front(graph_path: str | os.PathLike, sample: np.ndarray, stride: int = FLOAT_FRONT_STRIDE) -> list[str]:
    """The nodes of the ONNX graph at ``graph_path`` whose outputs are feature maps taller than
    1/``stride`` of the input (``sample``, one N x C x H x W input): the high-resolution front
    that INT8 leaves in float. The sizes are measured by running the graph once on ``sample``
    with every node's output exposed (static shape inference cannot follow the 'same' padding
    that timm computes from the input's shape)."""
    import onnx
    import onnxruntime

    model = onnx.load(str(graph_path))
    graph = model.graph
    known = {o.name for o in graph.output}
    outputs = [out for node in graph.node for out in node.output if out and out not in known]
    graph.output.extend(onnx.ValueInfoProto(name=out) for out in outputs)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    shapes = {name: np.shape(value) for name, value in zip(names, session.run(names, {graph.input[0].name: sample}))}
    height = sample.shape[2]
    return [node.name for node in graph.node
            if any(len(shapes.get(out, ())) == 4 and shapes[out][2] * stride > height for out in node.output)]


def quantize_int8(float_graph: str | os.PathLike, calibration: Callable[[], Any], out_path: str | os.PathLike,
                  *, method: str = "minmax") -> dict[str, Any]:
    """ONNX Runtime's static post-training quantisation of ``float_graph`` (the cached float
    export) into ``out_path``: QDQ format, INT8 weights per output channel, UINT8 activations
    whose ranges come from running ``calibration()`` (an iterable of float32 N x C x H x W
    model inputs, as BundleModel prepares them) through the graph, a few inputs at a time;
    ``method``: "minmax", "percentile" or "entropy". The high-resolution front
    (:func:`float_front`) stays float32. Returns what a record keeps of it."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise ValueError(f"Unknown calibration method {method!r}; choose one of {', '.join(methods)}")
    # The inputs are small (an image each); the activations they make are not, hence the stride.
    inputs = [np.ascontiguousarray(x[i:i + 1], dtype=np.float32) for x in calibration() for i in range(len(x))]
    if not inputs:
        raise ValueError("No calibration images: INT8 quantisation needs model inputs to measure activation ranges")
    # ORT's strided calibration wants the count divisible by the stride: the largest divisor <= the cap.
    stride = max(d for d in range(1, min(CALIBRATION_STRIDE_MAX, len(inputs)) + 1) if len(inputs) % d == 0)

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self.position, self.end = 0, len(inputs)

        def __len__(self):
            return len(inputs)

        def set_range(self, start_index: int, end_index: int):
            self.position, self.end = start_index, end_index

        def get_next(self):
            if self.position >= min(self.end, len(inputs)):
                return None
            self.position += 1
            return {"image": inputs[self.position - 1]}

    with tempfile.TemporaryDirectory(prefix="fracray-int8-") as tmp:
        prepared = os.path.join(tmp, "prepared.onnx")
        # ONNX shape inference and graph clean-up first, as ORT advises; not its symbolic shape
        # inference, which cannot follow the fracture-map fusion (and writes a temporary file to cwd).
        quant_pre_process(str(float_graph), prepared, skip_symbolic_shape=True)
        kept_float = float_front(prepared, inputs[0])
        quantize_static(prepared, str(out_path), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[method], nodes_to_exclude=kept_float,
                        extra_options={"CalibStridedMinMax": stride})
    import onnxruntime

    return {"method": method, "per_channel": True, "format": "QDQ", "weights": "int8", "activations": "uint8",
            "float_front_stride": FLOAT_FRONT_STRIDE, "float_nodes": len(kept_float),
            "calibration_inputs": len(inputs), "onnxruntime": onnxruntime.__version__}

