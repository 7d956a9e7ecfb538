import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compiler.prepare import MAX_NAME, converter_copy, parse_input_shapes, prepare
from edgec.errors import ModelLoadError, ShapeSpecError

from .models import LONG_NAME, awkward_names_model, dynamic_model, minus_one_dims_model, multi_input_model

SAFE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def test_parse_input_shapes():
    assert parse_input_shapes(["x=1,3,224,224", "ids=1,16"]) == {"x": [1, 3, 224, 224], "ids": [1, 16]}


@pytest.mark.parametrize("spec", ["x", "x=", "x=1,,2", "x=a,b", "=1,2", "x=1,0"])
def test_bad_shape_spec(spec):
    with pytest.raises(ShapeSpecError):
        parse_input_shapes([spec])


def test_dynamic_batch_is_fixed_and_names_sanitized(tmp_path):
    prepared = prepare(multi_input_model(tmp_path / "m.onnx"), {}, tmp_path)
    shapes = {t.name: t.shape for t in prepared.inputs}
    assert shapes == {"x": [1, 4], "ids": [1, 3], "scale": []}
    assert {t.name: t.dtype for t in prepared.inputs}["ids"] == "int64"
    outputs = {t.name: t.shape for t in prepared.outputs}
    assert outputs == {"scores": [1, 6], "total": [1]}
    saved = onnx.load(str(prepared.path))
    names = [n.name for n in saved.graph.node]
    assert len(set(names)) == len(names)
    assert all(name and name.replace("_", "").isalnum() for name in names)


def test_dynamic_inner_dimension_needs_a_shape(tmp_path):
    model = dynamic_model(tmp_path / "d.onnx")
    with pytest.raises(ShapeSpecError, match=r"'T' at axis 1.*--input-shape seq="):
        prepare(model, {}, tmp_path)
    prepared = prepare(model, {"seq": [1, 20, 8]}, tmp_path)
    assert prepared.inputs[0].shape == [1, 20, 8]
    assert prepared.outputs[0].shape == [1, 20, 8]


def test_shape_spec_must_fit_the_model(tmp_path):
    model = dynamic_model(tmp_path / "d.onnx")
    with pytest.raises(ShapeSpecError, match="rank"):
        prepare(model, {"seq": [1, 20]}, tmp_path)
    with pytest.raises(ShapeSpecError, match="fixes it at 8"):
        prepare(model, {"seq": [1, 20, 9]}, tmp_path)
    with pytest.raises(ShapeSpecError, match="does not have"):
        prepare(model, {"sequence": [1, 20, 8]}, tmp_path)


def test_truncated_model(tmp_path, digits):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes((digits / "model.onnx").read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        prepare(broken, {}, tmp_path)


def test_minus_one_dim_value_is_a_dynamic_axis(tmp_path):
    """paddle2onnx writes ``dim_value: -1`` for a dynamic axis: it is one, not a fixed -1."""
    model = minus_one_dims_model(tmp_path / "p.onnx")
    prepared = prepare(model, {"seq": [1, 20, 8]}, tmp_path)
    assert prepared.inputs[0].shape == [1, 20, 8]
    assert prepared.outputs[0].shape == [1, 20, 4]
    with pytest.raises(ShapeSpecError, match=r"dynamic dimension '-1' at axis 1.*--input-shape seq="):
        prepare(model, {}, tmp_path)
    with pytest.raises(ShapeSpecError, match="fixes it at 8"):
        prepare(model, {"seq": [1, 20, 9]}, tmp_path)


def test_minus_one_batch_axis_is_fixed_at_one(tmp_path):
    model = onnx.load(str(minus_one_dims_model(tmp_path / "p.onnx")))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 5  # only the batch axis is -1
    onnx.save(model, str(tmp_path / "batch.onnx"))
    prepared = prepare(tmp_path / "batch.onnx", {}, tmp_path)
    assert prepared.inputs[0].shape == [1, 5, 8]
    assert prepared.outputs[0].shape == [1, 5, 4]


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    names = {init.name for init in model.graph.initializer}
    for node in model.graph.node:
        names.update(n for n in [*node.input, *node.output] if n)
    return names


def test_tensor_names_converters_reject_are_renamed_and_mapped_back(tmp_path):
    source = awkward_names_model(tmp_path / "awkward.onnx")
    prepared = prepare(source, {}, tmp_path)
    saved = onnx.load(str(prepared.path))
    io = {"0", "out put", "387"}
    internal = _tensor_names(saved) - io
    assert all(SAFE.match(n) and len(n) <= MAX_NAME for n in internal), sorted(internal)
    assert all(SAFE.match(n.name) and len(n.name) <= MAX_NAME for n in saved.graph.node)
    # the model's inputs and outputs are the user's: unchanged
    assert [t.name for t in prepared.inputs] == ["0"]
    assert [t.name for t in prepared.outputs] == ["out put", "387"]
    # every renamed tensor and node maps back to its name in the source
    original = onnx.load(str(source))
    assert set(prepared.renamed_tensors.values()) == _tensor_names(original) - io - internal
    assert LONG_NAME in prepared.renamed_tensors.values()
    assert {"a:0", "/stem/conv", "wa/stem/conv", "pooled ä", "w:0"} <= set(prepared.renamed_tensors.values())
    assert "a__0" in internal  # a safe name stays; "a:0" no longer becomes it in onnx2tf
    renamed = {v: k for k, v in prepared.renamed_nodes.items()}
    assert prepared.node_label(renamed["stem/conv:0"]) == "stem_conv_0 (source: stem/conv:0)"
    assert renamed["1flatten"] == "n_1flatten"
    # the same graph: same results
    x = {"0": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    before = ort.InferenceSession(str(source)).run(None, x)
    after = ort.InferenceSession(str(prepared.path)).run(None, x)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_converter_copy_renames_inputs_and_outputs(tmp_path):
    prepared = prepare(awkward_names_model(tmp_path / "awkward.onnx"), {}, tmp_path)
    copy, names = converter_copy(prepared)
    assert set(names) == {"0", "out put", "387"}
    assert all(SAFE.match(new) and new[0].isalpha() for new in names.values())
    assert len(set(names.values())) == 3
    assert [vi.name for vi in copy.graph.input] == [names["0"]]
    assert [vi.name for vi in copy.graph.output] == [names["out put"], names["387"]]
    onnx.checker.check_model(copy)
    assert [vi.name for vi in prepared.model.graph.input] == ["0"]  # the prepared graph is untouched
