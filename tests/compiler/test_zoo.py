"""Real models that other people published, one per source format, built to int8 ONNX and
TFLite within the default gates and judged against the source on held-out evaluation images
(issue 13). The corpus comes from ``make zoo`` (samples/zoo/fetch_zoo.py); where it has not
been fetched these tests skip and say so."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from compiler.build import BuildRequest, build
from edgec.manifest import BundleStatus, OutputKind, Precision, TargetFormat, read_manifest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "samples" / "zoo"))

from fetch_zoo import CORPUS, zoo_dir  # noqa: E402

pytestmark = pytest.mark.slow

# one model per source format, each with outputs of a different kind
MODELS = {
    "onnx": "ddddocr-det",  # YOLOX: one detection head [1, 3549, 6] (nudenet's YOLOv8 fails in onnx2tf)
    "tflite": "mediapipe-face-detection",  # BlazeFace: boxes [1, 896, 16] and scores [1, 896, 1]
    "pytorch": "deepsort-mobilenetv2",  # re-identification: a 1280-d embedding
}
KINDS = {
    "ddddocr-det": {OutputKind.DETECTION},
    "mediapipe-face-detection": {OutputKind.DETECTION},
    "deepsort-mobilenetv2": {OutputKind.DENSE},
}


def _corpus_model(name: str) -> dict:
    return next(m for m in json.loads(CORPUS.read_text())["models"] if m["name"] == name)


def _request(name: str, fmt: TargetFormat, out: Path) -> BuildRequest:
    model = _corpus_model(name)
    zoo = zoo_dir()
    files = [zoo / model["file"], zoo / f"{name}-calibration.npz", zoo / f"{name}-evaluation.npz"]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        pytest.skip(f"the real-model corpus is not fetched ({', '.join(missing)}): run make zoo")
    shapes = {}
    for spec in model.get("input_shape", []):
        key, _, dims = spec.partition("=")
        shapes[key] = [int(d) for d in dims.split(",")]
    return BuildRequest(
        model=files[0],
        targets=["x86-64-cpu"],
        out=out,
        format=fmt,
        precision=Precision.INT8,
        calibration=files[1],
        eval=files[2],
        input_shapes=shapes,
        name=name,
        cache=None,
    )


def _no_shared_sample(calibration: Path, evaluation: Path) -> bool:
    with np.load(calibration) as cal, np.load(evaluation) as ev:
        key = cal.files[0]
        seen = {bytes(s.tobytes()) for s in cal[key]}
        return not any(bytes(s.tobytes()) in seen for s in ev[key])


@pytest.mark.parametrize("fmt", [TargetFormat.ONNX, TargetFormat.TFLITE], ids=["onnx", "tflite"])
@pytest.mark.parametrize("source", list(MODELS), ids=list(MODELS))
def test_real_model_builds_to_int8_within_the_gate(source, fmt, tmp_path):
    name = MODELS[source]
    request = _request(name, fmt, tmp_path)
    assert request.calibration is not None
    assert request.eval is not None
    assert _no_shared_sample(request.calibration, request.eval), "calibration and evaluation overlap"

    result = build(request)

    (bundle,) = result.bundles
    assert bundle.status is BundleStatus.OK, bundle.error or bundle.gate_failures
    assert bundle.precision is Precision.INT8
    manifest = read_manifest(Path(bundle.path))
    assert manifest.verification.data == "eval"  # judged on the held-out images
    assert manifest.verification.gate_failures == []
    metrics = manifest.verification.metrics
    assert metrics is not None
    assert metrics.samples == _corpus_model(name)["evaluation"]
    assert {o.kind for o in metrics.outputs} == KINDS[name]
    assert {o.kind for o in manifest.outputs} == KINDS[name]
    # the figures the gate judged are there, and met the profile's int8 thresholds
    for output in metrics.outputs:
        assert output.cosine is not None
        assert output.cosine >= 0.97
    if KINDS[name] == {OutputKind.DETECTION}:
        scored = [o.anchor_agreement for o in metrics.outputs if o.anchor_agreement is not None]
        assert scored, "a detector is judged on its confident anchors"
        assert min(scored) >= 0.9
    # int8 is smaller than the float source
    source_bytes = request.model.stat().st_size
    assert bundle.size_bytes is not None
    assert bundle.size_bytes < source_bytes
