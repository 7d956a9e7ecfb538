"""TensorRT backend: a TensorRT-ready ONNX graph, an operator preflight and a build plan.

An engine is specific to one GPU and one TensorRT version, so the bundle carries what the
device needs to build it: static shapes, the precision in the graph's own types (fp16
weights, or explicit symmetric Q/DQ for int8 — TensorRT 11 has no FP16/INT8 builder flags),
and ``build_plan.json``. When ``tensorrt`` imports and this machine's GPU has the
profile's compute capability, the engine is also built and verified here. Otherwise the
TensorRT-ready graph is checked with onnxruntime and the bundle is reported unverified.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx

from compiler.backends import BACKENDS, Artifact, CompileOptions
from compiler.backends._fp16 import fp16_runner, to_fp16
from compiler.backends._quantize import to_int8
from compiler.prepare import PreparedModel
from compiler.runtime import OnnxRuntimeRunner, Runner
from device_profiles import DeviceProfile
from edgec.errors import ConversionError, UnsupportedOperatorError
from edgec.manifest import Precision, TargetFormat
from edgec.trt_plan import PLAN_NAME, InputShapes, TensorRtPlan

__all__ = ["BACKEND", "OPERATOR_TABLE", "SUPPORTED_OPS", "TensorRtBackend", "preflight"]

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ENGINE_FILE = "model.plan"
OPERATOR_TABLE = "onnx-tensorrt operator matrix, TensorRT 8.5 (opset 17), plus 8.6 normalization ops"

# ONNX operators TensorRT's parser converts (the "Y" rows of the table named above). A
# TensorRT 10 parser takes all of these; an op missing here may still work on a newer one,
# and the device's build is the final word, but failing early names the nodes to look at.
SUPPORTED_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    Cast Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
    DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
    Floor Gather GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish Identity If
    ImageScaler InstanceNormalization IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
    LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
    ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu
    Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split
    Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample
    Where Xor
    """.split()
)


def _nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    found = []
    for node in graph.node:
        found.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found.extend(_nodes(attr.g))
    return found


def preflight(model: onnx.ModelProto) -> list[str]:
    """Each node TensorRT's parser would reject, as ``name (op): reason``."""
    problems = []
    zero_points = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in _nodes(model.graph):
        where = f"{node.name} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom domain {node.domain!r}")
        elif node.op_type not in SUPPORTED_OPS:
            problems.append(f"{where}: not in {OPERATOR_TABLE}")
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = zero_points.get(node.input[2])
            if zp is not None and np.any(zp != 0):
                problems.append(f"{where}: zero point must be 0 (symmetric quantization)")
    return problems


def _host_gpu() -> tuple[str, str] | None:
    """(name, compute capability) of this machine's first NVIDIA GPU, if it has one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()[0] if out.strip() else ""
    name, _, capability = first.rpartition(",")
    return (name.strip(), capability.strip()) if name else None


def _target_capability(profile: DeviceProfile) -> str | None:
    return next((a.cuda_compute_capability for a in profile.accelerators if a.cuda_compute_capability), None)


def _engine_blocker(profile: DeviceProfile) -> str | None:
    """Why the engine cannot be built and run here, or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed here: the device builds the engine from build_plan.json"
    gpu = _host_gpu()
    if gpu is None:
        return "no NVIDIA GPU here: the device builds the engine from build_plan.json"
    wanted = _target_capability(profile)
    if wanted and gpu[1] != wanted:
        return f"this machine's GPU {gpu[0]} (sm {gpu[1]}) is not the profile's (sm {wanted})"
    return None


def _build_engine(onnx_path: Path, plan: TensorRtPlan, engine_path: Path) -> None:
    import tensorrt as trt

    logger_ = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger_)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger_)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConversionError(f"TensorRT's ONNX parser rejected the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    config.builder_optimization_level = plan.builder_optimization_level
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConversionError("TensorRT could not build an engine from the graph")
    engine_path.write_bytes(bytes(serialized))


class TensorRtRunner:
    """Runs a serialized engine with CUDA buffers from PyTorch (used only where both exist)."""

    def __init__(self, engine_path: Path) -> None:
        import tensorrt as trt

        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        self._context = self._engine.create_execution_context()
        self._trt = trt

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        buffers, outputs = [], {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = self._trt.nptype(self._engine.get_tensor_dtype(name))
            if self._engine.get_tensor_mode(name) == self._trt.TensorIOMode.INPUT:
                tensor = torch.from_numpy(np.ascontiguousarray(feeds[name], dtype=dtype)).cuda()
            else:
                shape = tuple(self._context.get_tensor_shape(name))
                tensor = torch.from_numpy(np.empty(shape, dtype=dtype)).cuda()
                outputs[name] = tensor
            buffers.append(tensor)
            self._context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream()
        self._context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}


class TensorRtBackend:
    spec = BACKENDS[TargetFormat.TENSORRT]

    def compile(
        self, prepared: PreparedModel, profile: DeviceProfile, options: CompileOptions, workdir: Path
    ) -> Artifact:
        folder = workdir / self.spec.model_file
        folder.mkdir()
        graph = folder / ONNX_FILE
        notes = [f"operator preflight against {OPERATOR_TABLE}: passed"]
        if options.precision is Precision.FP32:
            shutil.copyfile(prepared.path, graph)
        elif options.precision is Precision.FP16:
            notes = to_fp16(prepared.path, graph, options.fp16_fp32_nodes) + notes
        else:
            notes += to_int8(prepared.path, graph, options, workdir, tensorrt=True)
            notes.append(f"int8 as explicit symmetric Q/DQ (zero points 0): {options.int8.label()}")
        problems = preflight(onnx.load(str(graph)))
        if problems:
            nodes = [p.split(" ", 1)[0] for p in problems]
            raise UnsupportedOperatorError(
                f"TensorRT cannot take {len(problems)} node(s): {'; '.join(problems[:8])}", nodes
            )
        plan = TensorRtPlan(
            onnx_file=ONNX_FILE,
            precision=options.precision,
            inputs=[InputShapes(name=t.name, min=t.shape, opt=t.shape, max=t.shape) for t in prepared.inputs],
            workspace_bytes=min(profile.ram_bytes // 8, 2 << 30),
            target_compute_capability=_target_capability(profile),
            operator_table=OPERATOR_TABLE,
        )
        (folder / PLAN_NAME).write_text(plan.model_dump_json(indent=2) + "\n", encoding="utf-8")
        blocker = _engine_blocker(profile)
        tools = {"onnx": version("onnx"), "onnxruntime": version("onnxruntime")}
        if blocker is None:
            _build_engine(graph, plan, folder / ENGINE_FILE)
            tools["tensorrt"] = version("tensorrt")
            notes.append("engine built and verified on this machine's GPU")
        else:
            notes.append(f"engine not built: {blocker}")
        return Artifact(
            format=TargetFormat.TENSORRT,
            precision=options.precision,
            path=folder,
            inputs=prepared.inputs,
            outputs=prepared.outputs,
            source_inputs=prepared.inputs,
            source_outputs=prepared.outputs,
            tool_versions=tools,
            notes=notes,
            qdq_graph=graph if options.precision is Precision.INT8 else None,
            unverified_reason=None
            if blocker is None
            else f"{blocker}; figures are onnxruntime's on the TensorRT-ready graph",
        )

    def open(self, artifact: Artifact) -> Runner:
        engine = artifact.path / ENGINE_FILE
        if engine.exists():
            return TensorRtRunner(engine)
        if artifact.precision is Precision.FP16:  # TensorRT computes in float16: so does the check
            return fp16_runner(artifact.path / ONNX_FILE, artifact.path.parent, artifact.notes)
        return OnnxRuntimeRunner(artifact.path / ONNX_FILE)


BACKEND = TensorRtBackend()
