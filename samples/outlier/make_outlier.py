"""The outlier sample: the digits CNN with one activation channel scaled up 400x.

Large language and vision models grow a few activation channels whose values are orders of
magnitude above the rest ("outlier features"); per-tensor int8 activations then spend their
256 levels on the outliers and round every other channel to nothing. This sample builds that
situation exactly and without training: in the digits CNN, the first convolution's most
active output channel (on the calibration set) is multiplied by ``SCALE`` (its weights and
bias) and the second convolution's weights that read that channel are divided by it. ReLU
commutes with a positive scale, so the float model computes the same function (to
rounding); its int8 build does not: naive int8 falls from 98% to about 30% accuracy.

Writes ``model.onnx`` next to this script. Calibration and eval data are the digits
sample's (``samples/digits/calib.npz``, ``eval.npz``).

Run:  python samples/outlier/make_outlier.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

HERE = Path(__file__).parent
DIGITS = HERE.parent / "digits" / "model.onnx"
SCALE = 400.0
FIRST_RELU = "/features/features.1/Relu_output_0"


def most_active_channel(model: onnx.ModelProto) -> int:
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(FIRST_RELU, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    images = np.load(HERE.parent / "digits" / "calib.npz")["x"]
    (activations,) = session.run([FIRST_RELU], {"x": images})
    return int(activations.mean(axis=(0, 2, 3)).argmax())


def main() -> None:
    model = onnx.load(str(DIGITS))
    channel = most_active_channel(model)
    weights = {init.name: init for init in model.graph.initializer}

    def scale(name: str, factor: np.ndarray) -> None:
        array = numpy_helper.to_array(weights[name]) * factor
        weights[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))

    up = np.ones((16, 1, 1, 1), np.float32)
    up[channel] = SCALE
    scale("features.0.weight", up)
    scale("features.0.bias", up.reshape(16))
    down = np.ones((1, 16, 1, 1), np.float32)
    down[0, channel] = 1.0 / SCALE
    scale("features.2.weight", down)
    onnx.save(model, str(HERE / "model.onnx"))
    print(f"wrote {HERE / 'model.onnx'}: channel {channel} of the first conv scaled by {SCALE:g}")


if __name__ == "__main__":
    main()
