"""``edgec build`` bounds what user input makes it allocate (issue 14, finding 5: compiler).

Before: a static shape of 1e5 x 1e5 ended in exit 1 ``MemoryError``; a 2 MB ``.npz`` that
unpacks to 2 GiB was loaded whole and verified sample by sample without end. Now declared
shapes and every ``.npy`` header and zip entry size are checked against a memory budget
before anything is allocated (exit 2 with the figure), ``MemoryError`` is exit 2 with
nothing written, and calibration and eval data are capped at ``--max-samples``.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from numpy.lib import format as npy
from onnx import TensorProto, helper

from cli import build as build_cli
from compiler.build import BuildRequest, build
from compiler.limits import DEFAULT_MAX_SAMPLES, MEMORY_BUDGET_ENV, MemoryBudget
from compiler.tensors import load_samples
from edgec.errors import EXIT_BAD_INPUT, ResourceLimitError
from edgec.manifest import Precision, TargetFormat, TensorSpec
from tests._cli import CliResult, run_edgec

TARGET = ("--target", "x86-64-cpu", "--format", "onnx", "--precision", "fp32")


def _relu_model(path: Path, dims: list[int | str]) -> Path:
    """``x`` float32 of ``dims`` (names are dynamic axes) -> Relu -> ``y``."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _build(out: Path, model: Path, *args: str | Path) -> CliResult:
    return run_edgec("build", model, *TARGET, *args, "--out", out, "--json")


def _refused(result: CliResult, *phrases: str) -> str:
    """Exit 2, one line on stderr that names the problem, nothing on stdout."""
    assert result.returncode == EXIT_BAD_INPUT, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("edgec: error: "), lines[0]
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    assert result.stdout == ""
    return lines[0]


def _nothing_written(out: Path) -> None:
    assert not out.exists() or list(out.iterdir()) == [], list(out.iterdir())


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    stream = io.BytesIO()
    npy.write_array_header_1_0(stream, {"descr": descr, "fortran_order": False, "shape": shape})
    return stream.getvalue()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_huge_static_shape_is_exit_2_with_the_figure(tmp_path, monkeypatch):
    monkeypatch.delenv(MEMORY_BUDGET_ENV, raising=False)  # the default budget, from this machine
    dynamic = _relu_model(tmp_path / "dynamic.onnx", ["N", "D"])
    declared = _relu_model(tmp_path / "declared.onnx", [1, 100000, 100000])
    for model, args, shape in (
        (dynamic, ("--input-shape", "x=100000,100000"), "[100000, 100000] float32"),
        (declared, (), "[1, 100000, 100000] float32"),
    ):
        out = tmp_path / f"out-{model.stem}"
        line = _refused(_build(out, model, *args), shape, "over the memory budget", "--input-shape")
        assert re.search(r"needs? [\d.]+ (GiB|TiB)", line), line  # the figure
        assert "--memory-budget" in line  # how to raise it
        assert "available" in line  # where the default came from
        _nothing_written(out)


def _zip_bomb(path: Path, samples: int, width: int) -> Path:
    """An .npz whose ``x.npy`` is ``samples`` x ``width`` float32 zeros: deflate packs them ~1000:1."""
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("x.npy", "w", force_zip64=True) as member,
    ):
        member.write(_npy_header((samples, width)))
        row_block = bytes(4 * width * 256)
        for _ in range(samples // 256):
            member.write(row_block)
    return path


class _CountingReads:
    """Counts the bytes every zip member hands out (decompressed)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.total = 0
        original = zipfile.ZipExtFile.read

        def read(member: zipfile.ZipExtFile, n: int = -1) -> bytes:
            data = original(member, n)
            self.total += len(data)
            return data

        monkeypatch.setattr(zipfile.ZipExtFile, "read", read)


def test_npz_zip_bomb_is_refused_without_unpacking(tmp_path, monkeypatch):
    width = 4096  # 16 KiB a sample
    model = _relu_model(tmp_path / "wide.onnx", ["N", width])
    bomb = _zip_bomb(tmp_path / "bomb.npz", 8192, width)  # 128 MiB of samples
    assert bomb.stat().st_size < 1 * 2**20
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "32MiB")
    out = tmp_path / "out"
    _refused(_build(out, model, "--eval", bomb), "'x.npy'", "unpacks to 128.0 MiB", MEMORY_BUDGET_ENV)
    _nothing_written(out)

    # refused from the zip directory: not one byte of the member is decompressed
    spec = TensorSpec(name="x", shape=[1, width], dtype="float32")
    reads = _CountingReads(monkeypatch)
    with pytest.raises(ResourceLimitError, match=r"unpacks to 128\.0 MiB"):
        load_samples(bomb, [spec], "eval", MemoryBudget(32 * 2**20, "test"))
    assert reads.total == 0
    # within a larger budget only the samples used are unpacked, never the whole member
    samples = load_samples(bomb, [spec], "eval", MemoryBudget(2**30, "test"), max_samples=16)
    assert len(samples) == 16
    assert reads.total < 16 * 4 * width + 64 * 2**10


def test_npy_member_header_over_budget_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(MEMORY_BUDGET_ENV, raising=False)
    model = _relu_model(tmp_path / "wide.onnx", ["N", 4096])
    header = _npy_header((10**9, 4096))  # 14.9 TiB declared, 64 bytes stored
    liar = _zip(tmp_path / "liar.npz", {"x.npy": header + bytes(64)})
    out = tmp_path / "out"
    _refused(
        _build(out, model, "--calibration", liar), "'x.npy' declares [1000000000, 4096] float32", "14.9 TiB"
    )
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.npy").write_bytes(header + bytes(64))
    _refused(_build(out, model, "--eval", folder), "x.npy declares [1000000000, 4096] float32", "14.9 TiB")
    _nothing_written(out)
    # a header that fits the budget but claims more data than the entry holds is refused too
    short = _zip(tmp_path / "short.npz", {"x.npy": _npy_header((100, 4096)) + bytes(64)})
    _refused(_build(out, model, "--eval", short), "'x.npy' is truncated", "[100, 4096] float32")


def test_object_dtype_member_is_refused(tmp_path):
    model = _relu_model(tmp_path / "small.onnx", ["N", 2])
    objects = np.empty((4, 2), dtype=object)
    objects[:] = 1.0
    data = tmp_path / "objects.npz"
    np.savez(data, x=objects)  # savez pickles object arrays; edgec must never unpickle them
    out = tmp_path / "out"
    _refused(
        _build(out, model, "--eval", data), "'x.npy' holds Python objects (dtype object)", "never unpickles"
    )
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=np.ones((4, 2), np.float32), y=np.array([0, 1, 0, None], dtype=object))
    _refused(_build(out, model, "--eval", labels), "'y.npy' holds Python objects")
    _nothing_written(out)


def test_non_npy_member_is_refused(tmp_path):
    model = _relu_model(tmp_path / "small.onnx", ["N", 2])
    out = tmp_path / "out"
    raw = _zip(tmp_path / "raw.npz", {"x": b"raw bytes, not an array"})
    _refused(_build(out, model, "--eval", raw), "holds 'x', which is not a .npy array")
    extra = tmp_path / "extra.npz"
    np.savez(extra, x=np.ones((4, 2), np.float32))
    with zipfile.ZipFile(extra, "a") as archive:
        archive.writestr("notes.txt", b"x" * 1000)
    _refused(_build(out, model, "--calibration", extra), "holds 'notes.txt', which is not a .npy array")
    disguised = _zip(tmp_path / "disguised.npz", {"x.npy": b"PK\x03\x04 not a numpy header"})
    _refused(_build(out, model, "--eval", disguised), "'x.npy' is not a .npy array")
    _nothing_written(out)


def test_sample_cap(tmp_path):
    model = _relu_model(tmp_path / "small.onnx", ["N", 2])
    data = tmp_path / "eval.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((DEFAULT_MAX_SAMPLES + 904, 2)).astype(np.float32))

    result = _build(tmp_path / "default", model, "--eval", data)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.json()["bundles"][0]["metrics"]["samples"] == DEFAULT_MAX_SAMPLES
    assert f"using the first {DEFAULT_MAX_SAMPLES} of its 5000 samples" in result.stderr

    result = _build(tmp_path / "ten", model, "--eval", data, "--max-samples", "10")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.json()["bundles"][0]["metrics"]["samples"] == 10
    _refused(_build(tmp_path / "zero", model, "--eval", data, "--max-samples", "0"), "--max-samples")

    # the default is documented where a user looks for it, and the CLI's copy matches the library's
    assert build_cli.DEFAULT_MAX_SAMPLES == DEFAULT_MAX_SAMPLES
    helptext = re.sub(r"\s+", " ", run_edgec("build", "--help").stdout)
    assert "--max-samples N use at most the first N samples" in helptext
    assert f"(default: {DEFAULT_MAX_SAMPLES};" in helptext


def test_memory_error_is_exit_2_and_writes_nothing(tmp_path, monkeypatch):
    # within an absurd budget the shape passes the check; the allocation itself fails
    model = _relu_model(tmp_path / "dynamic.onnx", ["N", "H", "W"])
    out = tmp_path / "out"
    result = _build(out, model, "--input-shape", "x=1,2000000,2000000", "--memory-budget", "1PiB")
    _refused(result, "ran out of memory", "--input-shape", "--max-samples")
    assert "internal error" not in result.stderr
    _nothing_written(out)

    # out of memory while a bundle is being written: no bundle, no temporary folder left
    small = _relu_model(tmp_path / "small.onnx", ["N", 2])

    def out_of_memory(*_args: object, **_kwargs: object) -> None:
        raise MemoryError

    savez_compressed = np.savez_compressed
    monkeypatch.setattr(np, "savez_compressed", out_of_memory)
    request = BuildRequest(
        model=small,
        targets=["x86-64-cpu"],
        out=out,
        format=TargetFormat.ONNX,
        precision=Precision.FP32,
        cache=None,
    )
    with pytest.raises(ResourceLimitError, match="ran out of memory"):
        build(request)
    _nothing_written(out)
    monkeypatch.setattr(np, "savez_compressed", savez_compressed)

    # a converter that runs out of memory is not a failed target (exit 3) but exit 2 too
    session = onnxruntime.InferenceSession

    def optimizer_out_of_memory(path: str, options: object = None, **kwargs: object) -> object:
        if getattr(options, "optimized_model_filepath", ""):
            raise MemoryError("std::bad_alloc")
        return session(path, options, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", optimizer_out_of_memory)
    with pytest.raises(ResourceLimitError, match=r"ran out of memory \(std::bad_alloc\)"):
        build(request)
    _nothing_written(out)


def test_budget_can_be_raised_explicitly(tmp_path, monkeypatch):
    model = _relu_model(tmp_path / "image.onnx", [1, 256, 256])  # 256 KiB a sample
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "1MiB")
    out = tmp_path / "out"
    _refused(_build(out, model), "32 generated samples", "8.0 MiB", f"1.0 MiB ({MEMORY_BUDGET_ENV})")
    _nothing_written(out)
    _refused(_build(out, model, "--memory-budget", "lots"), "bad --memory-budget 'lots'")
    result = _build(out, model, "--memory-budget", "64MiB")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "image-1.0.0-x86-64-cpu" / "manifest.json").is_file()


def test_npz_members_over_budget_in_total_are_refused(tmp_path, monkeypatch):
    model = _relu_model(tmp_path / "small.onnx", ["N", 2])
    data = tmp_path / "eval.npz"
    np.savez(data, x=np.zeros((400_000, 2), np.float32), y=np.zeros(400_000, np.int64))  # 3.1 + 3.1 MiB
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "5MiB")
    out = tmp_path / "out"
    _refused(_build(out, model, "--eval", data), "unpacks to 6.1 MiB in 2 arrays")
    _nothing_written(out)
