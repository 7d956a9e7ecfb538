import onnx
import pytest

from compiler.prepare import parse_input_shapes, prepare
from edgec.errors import ModelLoadError, ShapeSpecError

from .models import dynamic_model, multi_input_model


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
