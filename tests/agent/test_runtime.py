"""Loading bundles into their runtimes, checking inputs, and the self-test on golden data."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from agent.runtime import (
    DamagedBundleError,
    InputError,
    LoadError,
    NotRunnableHereError,
    RuntimeModel,
    check_inputs,
    load_bundle,
    self_test,
)
from edgec.errors import BundleError
from edgec.manifest import TensorSpec, read_manifest, sha256_file
from tests.agent.conftest import copy_bundle


def _golden(bundle):
    with np.load(bundle / "golden.npz") as npz:
        return {k: npz[k] for k in npz.files}


def _rehash(bundle, path: str) -> None:
    """Rewrite the manifest's entry for ``path`` so the damaged file passes the file check."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == path:
            entry["sha256"] = sha256_file(bundle / path)
            entry["length"] = (bundle / path).stat().st_size
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("profile", ["x86-64-cpu", "raspberry-pi-4"])
def test_bundle_loads_and_passes_its_self_test(digits_bundles, profile):
    model = load_bundle(digits_bundles[profile])
    result = self_test(model, digits_bundles[profile] / "golden.npz")
    assert result.passed, result.reason
    assert result.samples == 8
    assert result.top1_agreement == 1.0
    assert result.cosine is not None
    assert result.cosine >= result.limits["min_cosine"]
    assert result.max_abs_err is not None
    assert result.max_abs_err <= result.limits["max_abs_err"]
    model.close()


def test_onnx_bundle_answers_as_the_source_model_does(digits_bundles, digits):
    bundle = digits_bundles["x86-64-cpu"]
    golden = _golden(bundle)
    source = ort.InferenceSession(str(digits / "model.onnx"), providers=["CPUExecutionProvider"])
    model = load_bundle(bundle)
    x = golden["inputs/x"][3]
    outputs = model.infer({"x": x})
    assert list(outputs) == ["logits"]
    np.testing.assert_allclose(outputs["logits"], source.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outputs["logits"], golden["outputs/logits"][3], rtol=1e-5, atol=1e-5)


def test_tflite_bundle_takes_the_source_layout(digits_bundles):
    """The artifact is channels-last [1, 8, 8, 1]; callers give the source's [1, 1, 8, 8]."""
    bundle = digits_bundles["raspberry-pi-4"]
    spec = read_manifest(bundle).inputs[0]
    assert spec.shape == [1, 8, 8, 1]
    assert spec.source_shape == [1, 1, 8, 8]
    model = load_bundle(bundle)
    assert model.inputs[0].shape == (1, 1, 8, 8)
    golden = _golden(bundle)
    got = np.stack([model.infer({"x": x})["logits"] for x in golden["inputs/x"]])
    want = golden["outputs/logits"]
    assert got.shape == want.shape
    assert (got.argmax(-1) == want.argmax(-1)).all()
    # a transposed feed would scramble the image: fed right, it is close to the source's logits
    assert np.abs(got - want).max() < 1.0


def test_int8_io_bundle_quantizes_inputs_and_dequantizes_outputs(digits_int8_io_bundle):
    manifest = read_manifest(digits_int8_io_bundle)
    assert manifest.inputs[0].dtype == "int8"
    assert manifest.inputs[0].scale is not None
    model = load_bundle(digits_int8_io_bundle)
    assert model.inputs[0].dtype == "float32"
    assert model.outputs[0].dtype == "float32"
    golden = _golden(digits_int8_io_bundle)
    logits = model.infer({"x": golden["inputs/x"][0]})["logits"]
    assert logits.dtype == np.float32
    assert logits.shape == (1, 10)
    out = manifest.outputs[0]
    steps = logits / out.scale + out.zero_point  # dequantized values sit on the int8 grid
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    assert logits.argmax() == golden["outputs/logits"][0].argmax()
    result = self_test(model, digits_int8_io_bundle / "golden.npz")
    assert result.passed, result.reason


def test_altered_golden_outputs_fail_the_self_test_with_the_reason(digits_bundles, tmp_path):
    bundle = copy_bundle(digits_bundles["x86-64-cpu"], tmp_path)
    golden = _golden(bundle)
    golden["outputs/logits"] = golden["outputs/logits"][::-1].copy()  # answers of other samples
    np.savez(bundle / "golden.npz", **golden)
    result = self_test(_load_skipping_files(bundle), bundle / "golden.npz")
    assert not result.passed
    assert result.reason is not None
    assert "cosine" in result.reason
    assert "max abs err" in result.reason
    assert result.cosine is not None
    assert result.cosine < 0.9999


def _load_skipping_files(bundle):
    _rehash(bundle, "golden.npz")
    return load_bundle(bundle)


def test_slightly_off_outputs_fail_only_the_abs_error_limit(digits_bundles, tmp_path):
    """The fp32 build measured an exact match: 1e-3 off passes cosine and top-1, not max abs err."""
    bundle = copy_bundle(digits_bundles["x86-64-cpu"], tmp_path)
    golden = _golden(bundle)
    golden["outputs/logits"] = golden["outputs/logits"] + np.float32(1e-3)
    np.savez(bundle / "golden.npz", **golden)
    result = self_test(_load_skipping_files(bundle), bundle / "golden.npz")
    assert not result.passed
    assert result.reason is not None
    assert result.reason.startswith("max abs err")
    assert result.limits["max_abs_err"] == pytest.approx(1e-4)
    assert result.top1_agreement == 1.0


def test_golden_file_without_the_model_outputs_fails_the_self_test(digits_bundles, tmp_path):
    bundle = copy_bundle(digits_bundles["x86-64-cpu"], tmp_path)
    golden = _golden(bundle)
    np.savez(bundle / "golden.npz", **{"inputs/x": golden["inputs/x"]})
    result = self_test(_load_skipping_files(bundle), bundle / "golden.npz")
    assert not result.passed
    assert result.reason == "golden.npz has no outputs/logits"


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"x": np.zeros((1, 1, 8, 8), np.float32), "y": np.zeros(1)},
            "unknown input 'y': the model takes 'x'",
        ),
        ({}, "missing input 'x' (float32 [1, 1, 8, 8])"),
        (
            {"x": np.zeros((1, 8, 8), np.float32)},
            "input 'x' has shape [1, 8, 8], the model takes [1, 1, 8, 8]",
        ),
        ({"x": np.zeros((2, 1, 8, 8), np.float32)}, "input 'x' has shape [2, 1, 8, 8]"),
        ({"x": np.zeros((1, 1, 8, 8), bool)}, "input 'x' is bool, the model takes float32"),
        ({"x": np.full((1, 1, 8, 8), "a")}, "input 'x' is <U1, the model takes float32"),
        ({"x": np.full((1, 1, 8, 8), 1e300)}, "input 'x' holds values too large for float32"),
    ],
)
def test_bad_inputs_raise_input_error_naming_the_problem(digits_bundles, inputs, message):
    model = load_bundle(digits_bundles["x86-64-cpu"])
    with pytest.raises(InputError) as caught:
        model.infer(inputs)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_json_numbers_convert_to_the_declared_dtype(digits_bundles):
    model = load_bundle(digits_bundles["x86-64-cpu"])
    x = _golden(digits_bundles["x86-64-cpu"])["inputs/x"][0]
    from_float64 = model.infer({"x": x.astype(np.float64)})["logits"]
    np.testing.assert_array_equal(from_float64, model.infer({"x": x})["logits"])
    assert model.infer({"x": np.zeros((1, 1, 8, 8), np.int64)})["logits"].dtype == np.float32
    inf = np.zeros((1, 1, 8, 8))
    inf[0, 0, 0, 0] = np.inf  # infinities are values float32 holds, not an overflow
    assert model.infer({"x": inf})["logits"].shape == (1, 10)


def _manifest_with(digits_bundles, *inputs: TensorSpec):
    manifest = read_manifest(digits_bundles["x86-64-cpu"])
    return manifest.model_copy(update={"inputs": list(inputs)})


def test_a_dynamic_batch_axis_takes_any_batch(digits_bundles):
    manifest = _manifest_with(digits_bundles, TensorSpec(name="ids", shape=[-1, 3], dtype="int64"))
    for batch in (1, 5):
        checked = check_inputs(manifest, {"ids": np.ones((batch, 3), np.int64)})
        assert checked["ids"].shape == (batch, 3)
    with pytest.raises(
        InputError, match=r"input 'ids' has shape \[2, 4\], the model takes \[-1, 3\] \(-1: any size\)"
    ):
        check_inputs(manifest, {"ids": np.ones((2, 4), np.int64)})


@pytest.mark.parametrize(
    ("value", "converted", "message"),
    [
        (np.array([[1.0, 2.0, 3.0]]), np.array([[1, 2, 3]], np.int64), None),
        (np.array([[1, 2, 3]], np.int32), np.array([[1, 2, 3]], np.int64), None),
        (np.array([[1.5, 2.0, 3.0]]), None, "input 'ids' holds non-integer values, the model takes int64"),
        (np.array([[True, False, True]]), None, "input 'ids' is bool, the model takes int64"),
    ],
)
def test_integer_inputs_take_whole_numbers_only(digits_bundles, value, converted, message):
    manifest = _manifest_with(digits_bundles, TensorSpec(name="ids", shape=[1, 3], dtype="int64"))
    if message is None:
        checked = check_inputs(manifest, {"ids": value})["ids"]
        assert checked.dtype == np.int64
        np.testing.assert_array_equal(checked, converted)
    else:
        with pytest.raises(InputError, match=f"^{message}$"):
            check_inputs(manifest, {"ids": value})


def test_integer_inputs_out_of_range_are_refused(digits_bundles):
    manifest = _manifest_with(digits_bundles, TensorSpec(name="q", shape=[2], dtype="uint8"))
    assert check_inputs(manifest, {"q": np.array([0, 255])})["q"].dtype == np.uint8
    with pytest.raises(InputError, match=r"input 'q' holds values outside the uint8 range \[0, 255\]"):
        check_inputs(manifest, {"q": np.array([-1, 3])})


def test_damaged_model_file_is_refused(digits_bundles, tmp_path):
    bundle = copy_bundle(digits_bundles["x86-64-cpu"], tmp_path)
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(DamagedBundleError, match=r"is damaged: model\.onnx: sha256 mismatch"):
        load_bundle(bundle)


def test_truncated_and_missing_files_are_refused(digits_bundles, tmp_path):
    bundle = copy_bundle(digits_bundles["raspberry-pi-4"], tmp_path)
    (bundle / "model.tflite").write_bytes((bundle / "model.tflite").read_bytes()[:1000])
    (bundle / "golden.npz").unlink()
    with pytest.raises(DamagedBundleError) as caught:
        load_bundle(bundle)
    assert "golden.npz: missing" in str(caught.value)
    assert "model.tflite: length 1000 !=" in str(caught.value)


@pytest.mark.parametrize(
    ("profile", "name"), [("x86-64-cpu", "model.onnx"), ("raspberry-pi-4", "model.tflite")]
)
def test_a_model_file_its_runtime_cannot_read_is_a_load_error(digits_bundles, tmp_path, profile, name):
    """Signed garbage (the manifest agrees with it) still fails cleanly, in the runtime."""
    bundle = copy_bundle(digits_bundles[profile], tmp_path)
    (bundle / name).write_bytes(b"not a model at all" * 100)
    _rehash(bundle, name)
    with pytest.raises(LoadError, match=f"cannot load {name}"):
        load_bundle(bundle)


@pytest.mark.parametrize("fmt", ["coreml", "tensorrt"])
def test_formats_without_a_runtime_here_are_refused_clearly(digits_bundles, tmp_path, fmt):
    bundle = copy_bundle(digits_bundles["x86-64-cpu"], tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format"] = fmt
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NotRunnableHereError, match=f"is a {fmt} bundle: not runnable here") as caught:
        load_bundle(bundle)
    assert isinstance(caught.value, BundleError)  # the command line's exit 2


def test_a_folder_without_a_manifest_is_a_bundle_error(tmp_path):
    with pytest.raises(BundleError, match="is not a bundle"):
        load_bundle(tmp_path)


def test_runtime_model_is_a_loaded_model_for_the_slot(digits_bundles):
    from agent.slot import ModelSlot

    model = load_bundle(digits_bundles["x86-64-cpu"], threads=2)
    assert isinstance(model, RuntimeModel)
    slot = ModelSlot()
    slot.swap(model)
    answered, outputs = slot.infer({"x": np.zeros((1, 1, 8, 8), np.float32)})
    assert answered is model
    assert outputs["logits"].shape == (1, 10)
    model.close()
    with pytest.raises(RuntimeError, match="closed"):
        model.infer({"x": np.zeros((1, 1, 8, 8), np.float32)})


def test_edgec_agent_self_test_exit_codes(digits_bundles, tmp_path, edgec_cli):
    good = edgec_cli("agent", "self-test", digits_bundles["raspberry-pi-4"])
    assert good.returncode == 0, good.stderr
    assert "cosine" in good.stdout
    assert "top-1 agreement" in good.stdout

    bundle = copy_bundle(digits_bundles["x86-64-cpu"], tmp_path)
    golden = _golden(bundle)
    golden["outputs/logits"] = -golden["outputs/logits"]
    np.savez(bundle / "golden.npz", **golden)
    _rehash(bundle, "golden.npz")
    bad = edgec_cli("agent", "self-test", bundle)
    assert bad.returncode == 3
    assert "self-test failed: cosine" in bad.stderr
