"""CoreML backend: the SavedModel (from onnx2tf) -> coremltools ``mlprogram``.

fp16 compute by default, fp32, and int8 as weight-only compression (linear int8, or an
8-bit palette when the profile asks). ``MLModel.predict`` runs only on macOS: elsewhere the
package is checked as far as it can be (coremltools loads it, its inputs and outputs match
the source, every op converted for the profile's deployment target) and the bundle is
reported unverified; on a Mac it is run and verified like every other artifact.
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from bundle_runtime import TensorPort
from compiler._capture import call_quietly
from compiler.backends import BACKENDS, Artifact, CompileOptions
from compiler.backends._tf import saved_model_for
from compiler.layouts import artifact_spec
from compiler.prepare import PreparedModel
from compiler.runtime import Runner, RuntimeUnavailableError, first_line
from device_profiles import DeviceProfile
from edgec.errors import ConversionError
from edgec.manifest import Precision, TargetFormat, TensorSpec

__all__ = ["BACKEND", "CoreMlBackend"]

logger = logging.getLogger(__name__)
NOT_HERE = (
    "CoreML prediction needs macOS; checked here: the package loads in coremltools, its "
    "inputs and outputs match the source, and every op converted for the deployment target"
)
_DTYPES = {65568: "float32", 65552: "float16", 131104: "int32", 65600: "float64"}


def _convert(saved_model: Path, profile: DeviceProfile, precision: Precision) -> Any:
    import coremltools as ct

    target = getattr(ct.target, profile.coreml_deployment_target)
    compute = ct.precision.FLOAT32 if precision is Precision.FP32 else ct.precision.FLOAT16
    model = ct.convert(
        str(saved_model),
        source="tensorflow",
        convert_to="mlprogram",
        compute_precision=compute,
        minimum_deployment_target=target,
    )
    if precision is not Precision.INT8:
        return model
    from coremltools.optimize import coreml as opt

    if profile.coreml_int8_weights == "palettize":
        config = opt.OptimizationConfig(global_config=opt.OpPalettizerConfig(mode="kmeans", nbits=8))
        return opt.palettize_weights(model, config)
    config = opt.OptimizationConfig(
        global_config=opt.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8")
    )
    return opt.linear_quantize_weights(model, config)


def _io(package: Path, prepared: PreparedModel) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Load the package's description and line it up with the source's tensors."""
    import coremltools as ct

    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    described_in, described_out = list(spec.description.input), list(spec.description.output)
    if len(described_in) != len(prepared.inputs) or len(described_out) != len(prepared.outputs):
        raise ConversionError(
            f"the CoreML model has {len(described_in)} inputs and {len(described_out)} outputs, "
            f"the source {len(prepared.inputs)} and {len(prepared.outputs)}"
        )
    by_name = {d.name: d for d in described_in}

    def tensor(source: TensorSpec, described: Any) -> TensorSpec:
        array = described.type.multiArrayType
        dtype = _DTYPES.get(array.dataType, source.dtype)
        return artifact_spec(source, list(array.shape) or source.shape, dtype, described.name)

    inputs = [tensor(s, by_name.get(s.name, d)) for s, d in zip(prepared.inputs, described_in, strict=True)]
    outputs = [tensor(s, d) for s, d in zip(prepared.outputs, described_out, strict=True)]
    return inputs, outputs


class CoreMlRunner:
    """``MLModel.predict`` behind the verification harness (macOS only)."""

    def __init__(self, artifact: Artifact) -> None:
        import coremltools as ct

        self._model = ct.models.MLModel(str(artifact.path))
        self._inputs = [TensorPort.of(s) for s in artifact.inputs]  # the agent's tensor conversion
        self._outputs = [TensorPort.of(s) for s in artifact.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self._model.predict({p.key: p.to_artifact(feeds[p.name]) for p in self._inputs})
        return {p.name: p.to_source(np.asarray(result[p.key])) for p in self._outputs}


class CoreMlBackend:
    spec = BACKENDS[TargetFormat.COREML]

    def compile(
        self, prepared: PreparedModel, profile: DeviceProfile, options: CompileOptions, workdir: Path
    ) -> Artifact:
        tf_model = saved_model_for(prepared, options.calibration)
        package = workdir / self.spec.model_file
        run = call_quietly(lambda: _convert(tf_model.path, profile, options.precision).save(str(package)))
        if run.failure is not None:
            raise ConversionError(f"coremltools could not convert the model: {first_line(run.failure)}")
        inputs, outputs = _io(package, prepared)
        notes = [f"mlprogram for {profile.coreml_deployment_target}"]
        if options.precision is Precision.INT8:
            notes.append(f"weight-only int8 ({profile.coreml_int8_weights}), fp16 compute")
        return Artifact(
            format=TargetFormat.COREML,
            precision=options.precision,
            path=package,
            inputs=inputs,
            outputs=outputs,
            source_inputs=prepared.inputs,
            source_outputs=prepared.outputs,
            tool_versions=dict(tf_model.tool_versions, coremltools=version("coremltools")),
            notes=notes,
        )

    def open(self, artifact: Artifact) -> Runner:
        if sys.platform != "darwin":
            raise RuntimeUnavailableError(NOT_HERE)
        return CoreMlRunner(artifact)


BACKEND = CoreMlBackend()
