"""Tensor conversion between the source's tensors and the artifact's (layout, int8 scaling)."""

from __future__ import annotations

import numpy as np
import pytest

from bundle_runtime import TensorPort, channels_last_axes, is_channels_last_of
from compiler.layouts import artifact_spec
from edgec.errors import ConversionError
from edgec.manifest import Layout, TensorSpec


def _spec(shape, source_shape=None, dtype="float32", **extra) -> TensorSpec:
    return TensorSpec(name="x", shape=list(shape), dtype=dtype, source_shape=source_shape, **extra)


@pytest.mark.parametrize(
    ("source", "artifact"),
    [([2, 3, 5], [2, 5, 3]), ([1, 3, 4, 5], [1, 4, 5, 3]), ([1, 2, 3, 4, 5], [1, 3, 4, 5, 2])],
)
def test_channels_last_artifacts_get_the_channel_axis_moved_last(source, artifact):
    port = TensorPort.of(_spec(artifact, source))
    x = np.arange(np.prod(source), dtype=np.float32).reshape(source)
    moved = port.to_artifact(x)
    assert moved.shape == tuple(artifact)
    assert moved.flags.c_contiguous  # runtimes take the buffer as it lies
    np.testing.assert_array_equal(moved[0, ..., 1], x[0, 1])  # channel 1 of sample 0, same values
    np.testing.assert_array_equal(port.to_source(moved), x)


def test_a_shape_that_is_its_own_channels_last_form_is_not_transposed():
    """[1, 3, 3, 3] reads the same both ways: the compiler records it unmoved, so nothing moves."""
    spec = artifact_spec(_spec([1, 3, 3, 3]), [1, 3, 3, 3], "float32")
    assert spec.source_shape is None
    x = np.arange(27, dtype=np.float32).reshape(1, 3, 3, 3)
    np.testing.assert_array_equal(TensorPort.of(spec).to_artifact(x), x)


def test_axes_of_size_one_added_or_dropped_only_reshape():
    port = TensorPort.of(_spec([1, 10], [10]))
    x = np.arange(10, dtype=np.float32)
    assert port.to_artifact(x).shape == (1, 10)
    np.testing.assert_array_equal(port.to_source(port.to_artifact(x)), x)


def test_the_compiler_refuses_a_shape_no_conversion_explains():
    with pytest.raises(ConversionError, match="changed tensor 'x'"):
        artifact_spec(_spec([1, 3, 8, 8]), [1, 8, 3, 8], "float32")


def test_the_compiler_records_the_channels_last_layout_the_port_follows():
    spec = artifact_spec(_spec([1, 3, 8, 8], layout=Layout.NCHW), [1, 8, 8, 3], "float32", "serving_x")
    assert spec.layout is Layout.NHWC
    assert spec.source_shape == [1, 3, 8, 8]
    port = TensorPort.of(spec)
    assert port.key == "serving_x"
    assert port.transpose == channels_last_axes(4) == (0, 2, 3, 1)


def test_int8_inputs_are_rounded_to_the_grid_and_clipped():
    port = TensorPort.of(_spec([4], dtype="int8", scale=0.5, zero_point=-3))
    q = port.to_artifact(np.array([0.0, 1.8, 1000.0, -1000.0], np.float32))
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q, [-3, 1, 127, -128])  # 1.8 / 0.5 - 3 = 0.6: rounded, not cut


def test_int8_outputs_are_dequantized_to_float32():
    port = TensorPort.of(_spec([3], dtype="int8", scale=0.25, zero_point=10))
    out = port.to_source(np.array([10, 14, -128], np.int8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 1.0, -34.5])


def test_uint8_scaling_uses_the_uint8_range():
    port = TensorPort.of(_spec([3], dtype="uint8", scale=1.0, zero_point=128))
    np.testing.assert_array_equal(port.to_artifact(np.array([-500.0, 0.0, 500.0])), [0, 128, 255])


def test_a_scale_without_a_zero_point_is_not_quantization():
    port = TensorPort.of(_spec([2], dtype="float32", scale=0.5))
    assert not port.quantized
    np.testing.assert_array_equal(port.to_artifact(np.array([1.0, 2.0])), [1.0, 2.0])


@pytest.mark.parametrize(
    ("shape", "source", "expected"),
    [
        ([1, 8, 8, 3], [1, 3, 8, 8], True),
        ([1, 3, 8, 8], [1, 3, 8, 8], False),
        ([8, 3], [3, 8], False),  # rank 2 has no channel axis to move
        ([1, 8, 8, 3], [1, 3, 8], False),
    ],
)
def test_is_channels_last_of(shape, source, expected):
    assert is_channels_last_of(shape, source) is expected
