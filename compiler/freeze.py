"""Freezing inputs: ``--freeze NAME=VALUE`` replaces a model input by a constant and folds
what that decides.

A deployment often fixes an input the model keeps general (a sample rate, a mode flag).
Once it is a constant, the nodes computed from it alone are evaluated (onnx's reference
evaluator) and stored as initializers, and an ``If`` whose condition became constant is
replaced by the branch it takes: the branch's nodes are inlined, its initializers moved
out, its outputs wired to the ``If``'s output names, its references to outer tensors kept.
Control flow decided by the frozen value disappears, so converters without ``If`` (onnx2tf
to TFLite) can take the graph. Nodes that do not depend on a frozen input are left alone.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bundle_runtime import session_options
from edgec.errors import FreezeSpecError

__all__ = ["fold_frozen", "fold_shape_decided_ifs", "freeze_inputs", "parse_freeze", "used_names"]

logger = logging.getLogger(__name__)
_SPEC = re.compile(r"^(?P<name>[^=]+)=(?P<value>.+)$")
MAX_FROZEN_ELEMENTS = 4096  # a frozen input is a setting given on the command line, not data
MAX_FOLDED_ELEMENTS = 1 << 20  # a folded tensor larger than this stays a computation
_NOT_FOLDED = {  # not deterministic, or with subgraphs (If is inlined instead)
    "Bernoulli",
    "Multinomial",
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "If",
    "Loop",
    "Scan",
    "SequenceMap",
}
_TRUE = {"1", "true", "True"}
_FALSE = {"0", "false", "False"}


def parse_freeze(specs: Sequence[str]) -> dict[str, str]:
    """``["sr=16000", "w=0.5,1"]`` -> ``{"sr": "16000", "w": "0.5,1"}``; the values are typed
    against the model's inputs by ``freeze_inputs``. Raises ``FreezeSpecError``."""
    frozen: dict[str, str] = {}
    for spec in specs:
        match = _SPEC.match(spec.strip())
        if not match:
            raise FreezeSpecError(
                f"bad --freeze {spec!r}: expected NAME=VALUE with a number or a comma list, e.g. sr=16000"
            )
        name = match["name"].strip()
        if name in frozen:
            raise FreezeSpecError(f"--freeze gives {name!r} twice")
        frozen[name] = match["value"].strip()
    return frozen


def _shape(vi: onnx.ValueInfoProto, given: list[int] | None, count: int, spec: str) -> list[int]:
    """The frozen tensor's shape: ``--input-shape`` where given, else the declared one with a
    dynamic axis taking what the value's count leaves (the others 1)."""
    dims = vi.type.tensor_type.shape.dim
    if given is not None:
        if len(given) != len(dims):
            raise FreezeSpecError(
                f"--input-shape {vi.name}={','.join(map(str, given))} has rank {len(given)}, "
                f"the model's input {vi.name!r} has rank {len(dims)}"
            )
        shape = list(given)
    else:
        fixed = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in dims]
        dynamic = [axis for axis, d in enumerate(fixed) if d is None]
        shape = [1 if d is None else d for d in fixed]
        if dynamic:
            known = math.prod(shape)
            if known == 0 or count % known:
                raise FreezeSpecError(
                    f"--freeze {spec}: {count} value(s) do not fill the input {vi.name!r} of shape "
                    f"{_declared(vi)}"
                )
            shape[dynamic[-1]] = count // known
    if math.prod(shape) != count:
        raise FreezeSpecError(
            f"--freeze {spec}: {count} value(s), the input {vi.name!r} of shape {shape} takes "
            f"{math.prod(shape)}"
        )
    return shape


def _declared(vi: onnx.ValueInfoProto) -> str:
    dims = vi.type.tensor_type.shape.dim
    return (
        "["
        + ", ".join(
            d.dim_param or str(d.dim_value) if d.HasField("dim_value") or d.dim_param else "?" for d in dims
        )
        + "]"
    )


def _value(text: str, dtype: np.dtype, spec: str) -> list[object]:
    values: list[object] = []
    for item in (part.strip() for part in text.split(",")):
        try:
            if dtype.kind == "b":
                if item not in _TRUE | _FALSE:
                    raise ValueError(item)
                values.append(item in _TRUE)
            elif dtype.kind in "iu":
                number = int(item)
                info = np.iinfo(dtype)
                if not info.min <= number <= info.max:
                    raise ValueError(item)
                values.append(number)
            elif dtype.kind == "f":
                values.append(float(item))
            else:
                raise FreezeSpecError(f"--freeze {spec}: cannot freeze an input of type {dtype}")
        except ValueError:
            raise FreezeSpecError(f"--freeze {spec}: {item!r} is not a {dtype} value") from None
    return values


def freeze_inputs(
    model: onnx.ModelProto,
    inputs: Sequence[onnx.ValueInfoProto],
    frozen: Mapping[str, str],
    shapes: Mapping[str, list[int]],
) -> dict[str, np.ndarray]:
    """Replace each frozen input of ``model`` by an initializer holding its value.

    ``inputs`` are the model's real inputs. Returns ``{name: value}``. Raises
    ``FreezeSpecError`` for an unknown input, a wrong count or a value the dtype cannot hold.
    """
    by_name = {vi.name: vi for vi in inputs}
    unknown = [n for n in frozen if n not in by_name]
    if unknown:
        raise FreezeSpecError(
            f"--freeze names {', '.join(map(repr, unknown))}, which the model does not have; "
            f"its inputs are {', '.join(map(repr, by_name))}"
        )
    if len(frozen) == len(by_name):
        raise FreezeSpecError("--freeze leaves the model no input; keep at least one")
    values: dict[str, np.ndarray] = {}
    for name, text in frozen.items():
        vi = by_name[name]
        spec = f"{name}={text}"
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        items = _value(text, dtype, spec)
        if len(items) > MAX_FROZEN_ELEMENTS:
            raise FreezeSpecError(f"--freeze {name}: {len(items)} values, at most {MAX_FROZEN_ELEMENTS}")
        shape = _shape(vi, shapes.get(name), len(items), spec)
        values[name] = np.array(items, dtype=dtype).reshape(shape)
    kept = [vi for vi in model.graph.input if vi.name not in values]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model.graph.initializer.extend(numpy_helper.from_array(v, n) for n, v in values.items())
    return values


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {o.domain or "": o.version for o in model.opset_import}


# a constant tensor: an initializer is converted to an array only when a fold reads it
_Known = dict[str, "np.ndarray | onnx.TensorProto"]


def _array(value: np.ndarray | onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else value


def _evaluate(node: onnx.NodeProto, feeds: _Known, opsets: dict[str, int]) -> list[np.ndarray] | None:
    from onnx.reference import ReferenceEvaluator

    try:
        evaluator = ReferenceEvaluator(node, opsets=opsets)
        results = evaluator.run(None, {n: _array(feeds[n]) for n in node.input if n})
    except Exception as e:  # the reference evaluator raises whatever its op kernels raise
        logger.debug("not folding %s (%s): %s", node.name, node.op_type, e)
        return None
    arrays = [np.asarray(r) for r in results]
    if any(a.dtype == object or a.size > MAX_FOLDED_ELEMENTS for a in arrays):
        return None
    return arrays


def _graph_names(graph: onnx.GraphProto) -> Iterator[str]:
    """Every tensor name ``graph`` and its nested subgraphs define or use."""
    yield from (vi.name for vi in [*graph.input, *graph.output, *graph.value_info])
    yield from (init.name for init in graph.initializer)
    for node in graph.node:
        yield from node.input
        yield from node.output
        for sub in _node_graphs(node):
            yield from _graph_names(sub)


def _definitions(graph: onnx.GraphProto) -> Iterator[str]:
    """Every tensor name ``graph`` and its nested subgraphs define, once per definition."""
    yield from (vi.name for vi in graph.input)
    yield from (init.name for init in graph.initializer)
    for node in graph.node:
        yield from (o for o in node.output if o)
        for sub in _node_graphs(node):
            yield from _definitions(sub)


def _node_graphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _rename(graph: onnx.GraphProto, names: Mapping[str, str]) -> None:
    """Rename tensors in ``graph`` and every graph nested in it (names are unique across
    scopes in ONNX, so a nested use of a name is a use of the same tensor)."""
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        vi.name = names.get(vi.name, vi.name)
    for init in graph.initializer:
        init.name = names.get(init.name, init.name)
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
        for sub in _node_graphs(node):
            _rename(sub, names)


def _unique(name: str, taken: set[str]) -> str:
    candidate, suffix = name, 1
    while candidate in taken:
        candidate, suffix = f"{name}_{suffix}", suffix + 1
    taken.add(candidate)
    return candidate


def _inline_branch(
    node: onnx.NodeProto, branch: onnx.GraphProto, taken: set[str], clashing: set[str]
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes and initializers that replace ``node`` (an If) by ``branch``: tensors the
    branch defines are renamed where another graph defines the same name, its outputs take the
    If's output names (through an Identity where the output is not a node's own result)."""
    sub = onnx.GraphProto()
    sub.CopyFrom(branch)
    defined = [init.name for init in sub.initializer] + [o for n in sub.node for o in n.output if o]
    produced_once = {o for n in sub.node for o in n.output if o}
    outputs = [vi.name for vi in sub.output]
    wired = {
        inner: outer
        for inner, outer in zip(outputs, node.output, strict=True)
        if inner in produced_once and outputs.count(inner) == 1 and outer
    }
    renames = {
        name: wired.get(name) or _unique(name, taken)
        for name in dict.fromkeys(defined)
        if name in clashing or name in wired
    }
    _rename(sub, renames)
    nodes = list(sub.node)
    for new_node in nodes:
        if new_node.name and node.name:
            new_node.name = f"{node.name}/{new_node.name}"
    for inner, outer in zip(outputs, node.output, strict=True):
        result = renames.get(inner, inner)
        if outer and result != outer:
            nodes.append(helper.make_node("Identity", [result], [outer], name=f"{node.name}/{outer}"))
    return nodes, list(sub.initializer)


@dataclass
class _Fold:
    """What one folding run knows across graphs: tensors decided by a frozen input, the
    model's opsets, every tensor name taken, and names more than one graph defines."""

    tainted: set[str]
    opsets: dict[str, int]
    taken: set[str]
    clashing: set[str]


def _fold_graph(graph: onnx.GraphProto, known: _Known, run: _Fold) -> int:
    """One pass over ``graph``: fold tainted constant nodes, inline If nodes whose condition
    is known, recurse into other subgraphs. Returns how many nodes changed."""
    changed = 0
    nodes: list[onnx.NodeProto] = []
    queue = deque(graph.node)
    while queue:
        node = queue.popleft()
        inputs = [n for n in node.input if n]
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            if node.output[0] not in known and (constant := _evaluate(node, {}, run.opsets)) is not None:
                known[node.output[0]] = constant[0]  # a constant, not decided by a frozen input
            nodes.append(node)
            continue
        if node.op_type == "If" and node.domain in ("", "ai.onnx") and node.input[0] in known:
            take = "then_branch" if bool(_array(known[node.input[0]]).reshape(-1)[0]) else "else_branch"
            branch = next(a.g for a in node.attribute if a.name == take)
            inlined, initializers = _inline_branch(node, branch, run.taken, run.clashing)
            graph.initializer.extend(initializers)
            known.update((i.name, i) for i in initializers)
            logger.info("If %s decided by a frozen input: %s inlined", node.name, take)
            queue.extendleft(reversed(inlined))
            changed += 1
            continue
        foldable = (
            node.op_type not in _NOT_FOLDED
            and node.domain in ("", "ai.onnx")
            and all(n in known for n in inputs)
            and any(n in run.tainted for n in inputs)
        )
        results = _evaluate(node, known, run.opsets) if foldable else None
        if results is None:
            for sub in _node_graphs(node):
                changed += _fold_graph(sub, dict(known), run)
            nodes.append(node)
            continue
        for name, value in zip(node.output, results, strict=False):
            if name:
                known[name] = value
                run.tainted.add(name)
                graph.initializer.append(numpy_helper.from_array(value, name))
        changed += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return changed


def used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name ``graph`` reads (outputs included), its subgraphs' reads too."""
    used = {vi.name for vi in graph.output}
    for node in graph.node:
        used.update(node.input)
        for sub in _node_graphs(node):
            used.update(used_names(sub))
    return used


def _prune(graph: onnx.GraphProto, used_before: set[str]) -> None:
    """Drop the nodes and initializers folding left unread: those whose outputs something
    read before and nothing reads now (what the source itself left unread stays)."""
    while True:
        used = used_names(graph)
        kept = [n for n in graph.node if any(o in used or o not in used_before for o in n.output if o)]
        if len(kept) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(kept)
    kept_init = [i for i in graph.initializer if i.name in used or i.name not in used_before]
    del graph.initializer[:]
    graph.initializer.extend(kept_init)


def fold_frozen(model: onnx.ModelProto, frozen: Mapping[str, np.ndarray]) -> int:
    """Fold what the frozen inputs decide, until nothing changes. Returns the number of
    nodes folded or inlined."""
    graph = model.graph
    overridable = {vi.name for vi in graph.input}  # initializers listed as inputs are defaults only
    known: _Known = {init.name: init for init in graph.initializer if init.name not in overridable}
    names = set(_graph_names(graph))
    clashing = {name for name, count in Counter(_definitions(graph)).items() if count > 1}
    run = _Fold(tainted=set(frozen), opsets=_opsets(model), taken=names, clashing=clashing)
    used_before = used_names(graph)
    total = 0
    while changed := _fold_graph(graph, known, run):
        total += changed
    # folded results and inlined tensors were never read under their own name before: count
    # every name but the source's unread ones as read, so what folding left unread goes
    _prune(graph, used_before | set(frozen) | (set(_graph_names(graph)) - names))
    logger.info("froze %s: %d node(s) folded or inlined", ", ".join(frozen), total)
    return total


def _probe_shapes(graph: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """The values of the ``Shape`` outputs ``names`` when the graph runs on inputs of its
    static shapes, once on random values and once on zeros; only those that come out the same
    both times (a Shape of ``NonZero``'s result, say, depends on the values: it stays)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(graph)
    del probe.graph.output[:]
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.INT64, None) for n in names
    )
    options = session_options({})
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    runs = []
    for random in (True, False):
        feeds = {i.name: _probe(i.shape, i.type, rng, random) for i in session.get_inputs()}
        runs.append(dict(zip(names, session.run(names, feeds), strict=True)))
    return {n: runs[0][n] for n in names if all(np.array_equal(r[n], runs[0][n]) for r in runs)}


def _probe(shape: list[int], ort_type: str, rng: np.random.Generator, random: bool) -> np.ndarray:
    """An input of its type: floats random and spread, or zeros; integers 1, booleans True."""
    name = ort_type.removeprefix("tensor(").removesuffix(")")
    dtype = np.dtype({"float": "float32", "double": "float64"}.get(name, name))
    if dtype.kind == "f":
        return (rng.standard_normal(shape) * 4).astype(dtype) if random else np.zeros(shape, dtype)
    return np.ones(shape, dtype)


def fold_shape_decided_ifs(graph: onnx.ModelProto) -> int:
    """Control flow decided by tensor shapes, inlined: in a graph whose inputs have static
    shapes, every ``Shape`` is a constant (found by running the graph), and an ``If`` whose
    condition is computed from shapes alone (silero-vad's decoder checks its state's batch
    size) takes one branch, always. Converters without ``If`` (onnx2tf) then take the graph,
    and quantizers see the branch's nodes; shape inference (and onnxsim) cannot see through
    every op to fold those Shapes. Returns the number of nodes folded or inlined (0: nothing
    to do, the graph untouched)."""
    if not any(n.op_type == "If" for n in graph.graph.node):
        return 0
    shapes = [n.output[0] for n in graph.graph.node if n.op_type == "Shape"]
    try:
        values = _probe_shapes(graph, shapes) if shapes else {}
    except Exception as e:  # onnxruntime's own errors: leave the graph to onnx2tf as it is
        logger.info("shapes not probed: %s", e)
        return 0
    if not values:
        return 0
    kept = [n for n in graph.graph.node if not (n.op_type == "Shape" and n.output[0] in values)]
    del graph.graph.node[:]
    graph.graph.node.extend(kept)
    graph.graph.initializer.extend(numpy_helper.from_array(v, n) for n, v in values.items())
    return fold_frozen(graph, values)
