"""Why onnx2tf failed, from what it printed: the node(s), their op type(s), and what to try.

onnx2tf reports a failure in its log, between lines that say nothing about it: TensorFlow's
start-up noise (CUDA probes, oneDNN notes), its own INFO and WARNING lines, and advice it
prints after every failure. What it does say:

- ``ERROR: <Op> OP is not yet implemented.``: it has no converter for that op type;
- ``ERROR: onnx_op_name: <node>``: the node whose conversion raised, after a traceback whose
  last line is the exception (also what ``onnx2tf.convert`` raised).

``explain`` turns that into one typed error naming the converter, the nodes (as prepare named
them, with their source names), their op types, the cause and what to try; the error keeps
the whole log for the build report.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

from compiler._capture import is_noise, plain, report_log
from compiler.prepare import PreparedModel, graph_nodes
from edgec.errors import ConversionError, UnsupportedOperatorError

__all__ = ["explain"]

_NOT_IMPLEMENTED = re.compile(r"(\w+) OP is not yet implemented")
_FAILED_NODE = re.compile(r"onnx_op_name:\s*(\S+)")
# What onnx2tf prints around every failure, and traceback frames: never the cause itself.
_BOILERPLATE = re.compile(
    r"^(ERROR:\s*)?(The trace log is below|input_onnx_file_path:|onnx_op_name:|Read this and deal with it"
    r"|Alternatively, if the input OP|If the input OP of ONNX|Also, for models that include"
    r"|Traceback \(most recent call last\)|File \"|in user code:|Call arguments received|•|[~^]+$)"
)
_SHOWN = 5  # nodes named in the message; all are in ``nodes``
_CAUSE_CHARS = 300


def _onnx2tf_version() -> str:
    try:
        return version("onnx2tf")
    except PackageNotFoundError:  # pragma: no cover - the backend needs it installed
        return "?"


def _cause_lines(text: str) -> list[str]:
    """Lines that may state the cause: no noise, no boilerplate, no traceback source lines."""
    kept, after_frame = [], False
    for raw in plain(text).splitlines():
        line = raw.strip()
        if after_frame and raw.startswith("    "):  # the source line a traceback frame quotes
            after_frame = False
            continue
        after_frame = line.startswith('File "')
        if not line or _BOILERPLATE.search(line) or is_noise(raw):
            continue
        kept.append(line.removeprefix("ERROR:").strip())
    return kept


def _cause(failure: BaseException | None, log: str) -> str:
    """The exception's own words, else the last thing the log says before the advice."""
    if failure is not None and not isinstance(failure, SystemExit):
        lines = _cause_lines(str(failure))
        if lines:
            head = type(failure).__name__
            text = " | ".join(lines[:2])
            return (text if text.startswith(head) else f"{head}: {text}")[:_CAUSE_CHARS]
    lines = _cause_lines(log)
    return lines[-1][:_CAUSE_CHARS] if lines else "it wrote no SavedModel"


def _listed(nodes: list[str], prepared: PreparedModel) -> str:
    if not nodes:
        return "(none in the graph by that name)"
    shown = ", ".join(prepared.node_label(n) for n in nodes[:_SHOWN])
    return shown + (f" and {len(nodes) - _SHOWN} more" if len(nodes) > _SHOWN else "")


def explain(failure: BaseException | None, log: str, prepared: PreparedModel) -> ConversionError:
    """One error for a failed onnx2tf run: converter, node(s), op type(s), cause, what to try."""
    op_types = {node.name: node.op_type for node in graph_nodes(prepared.model)}
    text = plain(log)
    raised = f"\n[raised] {type(failure).__name__}: {failure}\n" if failure is not None else ""
    kept = report_log(log + raised)  # what it printed, and what it raised (not always printed)
    tool = f"onnx2tf {_onnx2tf_version()}"
    report = "the full onnx2tf log is the target's converter_log in the build report (--json)"
    missing = sorted(set(_NOT_IMPLEMENTED.findall(text)))
    if isinstance(failure, ModuleNotFoundError) and failure.name and failure.name.startswith("onnx2tf.ops."):
        missing = sorted({*missing, failure.name.rsplit(".", 1)[-1]})
    if missing:
        nodes = [name for name, op in op_types.items() if op in missing]
        return UnsupportedOperatorError(
            f"{tool} cannot convert node(s) {_listed(nodes, prepared)} (op {', '.join(missing)}): it has no "
            f"converter for {', '.join(missing)}; try --format onnx for this target, or re-export the "
            f"model without {', '.join(missing)}; {report}",
            nodes,
            kept,
        )
    # prepare gave every node a [A-Za-z0-9_] name, which onnx2tf keeps (a leading "/" it would
    # have made "wa/")
    failed = [re.sub(r"^wa/", "", name) for name in _FAILED_NODE.findall(text)]
    nodes = [name for name in dict.fromkeys(failed) if name in op_types]
    cause = _cause(failure, log)
    if nodes:
        ops = sorted({op_types[n] for n in nodes})
        return UnsupportedOperatorError(
            f"{tool} failed at node(s) {_listed(nodes, prepared)} (op {', '.join(ops)}): {cause}; try "
            "--format onnx for this target, or re-export the model with static shapes (onnxsim folds "
            "shape computations; onnx2tf's parameter replacement file can patch a node: "
            f"https://github.com/PINTO0309/onnx2tf#parameter-replacement); {report}",
            nodes,
            kept,
        )
    return ConversionError(f"{tool} failed: {cause}; try --format onnx for this target; {report}", kept)
