"""Bytes a device downloads for a new release it can build from the one it holds: content-
defined chunks (FastCDC, the ``cdc`` tables the repository signs) against fixed 256 KiB chunks.

Run:  .venv/bin/python bench/bench_delta.py [--profiles x86-64-cpu raspberry-pi-4] [--only digits-head]

Cases, each a pair of releases built with ``edgec build`` (no cache) for each profile:

- ``digits-head``: the digits sample (``samples/digits/model.onnx``), then the same network
  with the weights and bias of its last layer (the logits' Gemm) retrained (moved by noise);
- ``mobilenet-head``: the MobileNetV2-sized model (``samples/mobilenet``, ``make mobilenet``),
  then the same with its classifier's 10 class rows refitted (rows 0..9 of the 1000x1280
  Gemm weight and their biases moved), as a fine-tune of the head would;
- ``mobilenet-requant``: the same MobileNetV2 source quantized to int8 twice, with two
  calibration sets (``calib.npz``, then 32 other samples of the same classes): only for the
  profiles' int8 artifacts (x86-64-cpu int8 ONNX, raspberry-pi-4 int8 TFLite).

Profiles: ``x86-64-cpu`` (ONNX, fp32; int8 for the re-quantization) and ``raspberry-pi-4``
(TFLite int8). For each pair both bundles are published to a real image repository
(``ota_server.repository``: the signed targets with their chunk tables), the first is put in
a real agent state folder as the installed release, and every file of the second is
assembled by the agent's own code (``agent.delta.download_for``: installed chunks copied and
checked, the rest asked for from the repository folder, counted). Reported per pair: the
release's bytes (every file of the bundle), the bytes the delta download fetched, and what
fixed 256 KiB chunks would have fetched with the same reuse by hash (the old chunk table's
chunks the installed release also has). Also the size of ``targets.json`` with and without
the ``cdc`` tables (every device downloads it).

Writes ``bench/results/delta.json`` and ``delta.md``; bundles under ``build/bench/delta``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from _common import library_versions  # noqa: E402  (a sibling module, found through BENCH)
from bench_onnx_precision import machine_info  # noqa: E402  (a sibling script)

from agent.delta import InstalledChunks, download_for  # noqa: E402
from agent.store import ActivePointer, StateStore  # noqa: E402
from edgec.manifest import read_manifest, sha256_file  # noqa: E402
from localfleet.commands import run_edgec  # noqa: E402
from ota_server._targets import CHUNK_BYTES, chunk_hashes  # noqa: E402
from ota_server.repository import ImageRepository  # noqa: E402

ROOT = BENCH.parent
RESULTS = BENCH / "results"
DIGITS = ROOT / "samples" / "digits"
MOBILENET = ROOT / "samples" / "mobilenet"
PASS = b"bench delta"
PROFILES = {"x86-64-cpu": "fp32", "raspberry-pi-4": "int8"}
REQUANT_PROFILES = {"x86-64-cpu": "int8", "raspberry-pi-4": "int8"}


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------ the sources


def _moved_head(source: Path, dest: Path, rows: slice | None, seed: int) -> Path:
    """``source`` with the last Gemm/MatMul's weight (only ``rows`` of it, the class rows,
    when given) and bias moved by noise of 1 % of their spread: a retrained head."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(source)
    last = next(n for n in reversed(model.graph.node) if n.op_type in ("Gemm", "MatMul"))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        if init.name not in last.input[1:]:
            continue
        values = numpy_helper.to_array(init).copy()
        part = values[rows] if rows is not None else values
        part += rng.normal(0, 0.01 * float(part.std() or 1.0), part.shape).astype(values.dtype)
        if rows is not None:
            values[rows] = part
        init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, dest)
    return dest


def _eval_subset(source: Path, dest: Path, count: int) -> Path:
    with np.load(source) as data:
        np.savez(dest, **{k: data[k][:count] for k in data.files})
    return dest


def _other_calibration(dest: Path) -> Path:
    """32 samples of the same 10 classes, none of them in ``calib.npz`` (from ``eval.npz``)."""
    with np.load(MOBILENET / "eval.npz") as data:
        np.savez(dest, input=data["input"][-32:])
    return dest


def _build(
    source: Path,
    release: str,
    profile: str,
    precision: str,
    *,
    calib: Path,
    eval_set: Path,
    out: Path,
) -> Path:
    name, version = release.split(":")
    started = time.perf_counter()
    result = run_edgec(
        "build", source, "--name", name, "--version", version, "--target", profile, "--precision", precision,
        "--calibration", calib, "--eval", eval_set, "--out", out, "--no-cache", timeout_s=1800,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"edgec build of {name}:{version} for {profile} failed:\n{result.stderr[-3000:]}")
    _progress(f"built {name}:{version} {profile} {precision} in {time.perf_counter() - started:.0f} s")
    return out / f"{name}-{version}-{profile}"


# ------------------------------------------------------------------------------ measuring


class _FolderChunks:
    """The repository folder's bytes, counted (what the fetch server would send)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sent = 0
        self.requests = 0

    def chunk(self, path: str, offset: int, length: int | None = None) -> tuple[int, bytes]:
        file = self.folder / path
        with file.open("rb") as f:
            f.seek(offset)
            data = f.read(min(CHUNK_BYTES, length or CHUNK_BYTES))
        self.sent += len(data)
        self.requests += 1
        return file.stat().st_size, data


def _fixed_fetch(old: Path, new: Path) -> int:
    """Bytes of ``new``'s files in fixed chunks that ``old``'s files do not hold (by hash)."""
    have = {h for f in old.iterdir() for h in chunk_hashes(f)}
    fetched = 0
    for file in new.iterdir():
        size = file.stat().st_size
        for i, digest in enumerate(chunk_hashes(file)):
            if digest not in have:
                fetched += min(CHUNK_BYTES, size - i * CHUNK_BYTES)
    return fetched


def _targets_sizes(repo: ImageRepository) -> dict[str, int]:
    """``targets.json`` as written, and as it would be without the ``cdc`` tables (the same
    serialization: python-tuf's non-compact JSON, indent 1, keys sorted)."""
    path = repo.folder / "metadata" / "targets.json"
    if not path.exists():  # consistent snapshots: the newest numbered one
        path = max(repo.folder.glob("metadata/*.targets.json"), key=lambda p: int(p.name.split(".")[0]))
    raw = path.read_bytes()
    data = json.loads(raw)
    for info in data["signed"]["targets"].values():
        info.get("custom", {}).get("edgec", {}).pop("cdc", None)
    without = json.dumps(data, indent=1, sort_keys=True).encode()
    assert len(json.dumps(json.loads(raw), indent=1, sort_keys=True).encode()) == len(raw)  # same format
    return {"targets_json_bytes": len(raw), "targets_json_bytes_without_cdc": len(without)}


def measure(old: Path, new: Path, work: Path) -> dict[str, Any]:
    """Publish both bundles, install ``old`` in an agent state folder, assemble ``new``."""
    shutil.rmtree(work, ignore_errors=True)
    repo = ImageRepository.init(work / "repo", PASS, {}, keys=work / "keys")
    repo.publish([old, new], PASS)
    targets = repo.load("targets").signed.targets
    old_m, new_m = read_manifest(old), read_manifest(new)
    store = StateStore(work / "state")
    old_release = f"{old_m.name}:{old_m.version}"
    folder = store.folder_name(old_release)
    shutil.copytree(old, store.models / folder)
    store.set_active(ActivePointer(old_release, folder))
    prefix = f"{old_m.name}/{old_m.version}/{old_m.profile.id}"
    tables = {
        p.name: targets[f"{prefix}/{p.name}"].unrecognized_fields["custom"]["edgec"]["cdc"]
        for p in old.iterdir()
    }
    InstalledChunks(store).record(old_release, tables)

    source = _FolderChunks(repo.folder / "targets")
    installed = InstalledChunks(store)
    staging = work / "staging"
    staging.mkdir()
    files, started = [], time.perf_counter()
    for file in sorted(new.iterdir()):
        info = targets[f"{new_m.name}/{new_m.version}/{new_m.profile.id}/{file.name}"]
        custom = info.unrecognized_fields["custom"]["edgec"]
        stored = f"{new_m.name}/{new_m.version}/{new_m.profile.id}/{info.hashes['sha256']}.{file.name}"
        download = download_for(
            source, stored, staging / file.name, custom=custom, length=info.length,
            sha256=info.hashes["sha256"], installed=installed,
        )  # fmt: skip
        download.run()
        assert sha256_file(staging / file.name) == sha256_file(file)
        files.append(
            {
                "file": file.name,
                "bytes": info.length,
                "fetched": download.fetched_bytes,
                "reused": download.reused_bytes,
                "chunks": len(custom["cdc"]["chunks"]),
                "avg": custom["cdc"]["avg"],
            }
        )
    seconds = time.perf_counter() - started
    release = sum(f["bytes"] for f in files)
    fetched = sum(f["fetched"] for f in files)
    assert fetched == source.sent
    fixed = _fixed_fetch(old, new)
    return {
        "format": new_m.format.value,
        "precision": new_m.precision.value,
        "release_bytes": release,
        "cdc_fetched_bytes": fetched,
        "cdc_fetched_share": fetched / release,
        "cdc_requests": source.requests,
        "fixed_fetched_bytes": fixed,
        "fixed_fetched_share": fixed / release,
        "assemble_s": seconds,
        "files": files,
        **_targets_sizes(repo),
    }


# ------------------------------------------------------------------------------ the cases


def cases(out: Path, profiles: list[str]) -> dict[str, Callable[[], list[dict[str, Any]]]]:
    sources = out / "sources"
    sources.mkdir(parents=True, exist_ok=True)

    def releases(
        case: str,
        name: str,
        models: tuple[Path, Path],
        precisions: dict[str, str],
        calibrations: tuple[Path, Path],
        *,
        eval_set: Path,
    ) -> list[dict[str, Any]]:
        """``name`` 1.0.0 and 1.0.1 built from the two models and calibrations, for each profile,
        and what a device holding the first fetches of the second."""
        rows = []
        for profile in profiles:
            a, b = (
                _build(
                    model,
                    f"{name}:{v}",
                    profile,
                    precisions[profile],
                    calib=calib,
                    eval_set=eval_set,
                    out=out,
                )
                for model, v, calib in zip(models, ("1.0.0", "1.0.1"), calibrations, strict=True)
            )
            rows.append({"case": case, "profile": profile, **measure(a, b, out / "work")})
        return rows

    def digits_head() -> list[dict[str, Any]]:
        model = DIGITS / "model.onnx"
        tuned = _moved_head(model, sources / "digits-head.onnx", None, seed=1)
        eval_set = _eval_subset(DIGITS / "eval.npz", sources / "digits-eval.npz", 100)
        calib = DIGITS / "calib.npz"
        return releases("digits-head", "digits", (model, tuned), PROFILES, (calib, calib), eval_set=eval_set)

    def mobilenet_head() -> list[dict[str, Any]]:
        model = MOBILENET / "mobilenetv2.onnx"
        tuned = _moved_head(model, sources / "mobilenet-head.onnx", slice(0, 10), seed=2)
        eval_set = _eval_subset(MOBILENET / "eval.npz", sources / "mobilenet-eval.npz", 20)
        calib = MOBILENET / "calib.npz"
        return releases("mobilenet-head", "mnv2", (model, tuned), PROFILES, (calib, calib), eval_set=eval_set)

    def mobilenet_requant() -> list[dict[str, Any]]:
        model = MOBILENET / "mobilenetv2.onnx"
        eval_set = _eval_subset(MOBILENET / "eval.npz", sources / "mobilenet-eval.npz", 20)
        other = _other_calibration(sources / "mobilenet-calib-b.npz")
        calibrations = (MOBILENET / "calib.npz", other)
        return releases(
            "mobilenet-requant", "mnv2q", (model, model), REQUANT_PROFILES, calibrations, eval_set=eval_set
        )

    return {
        "digits-head": digits_head,
        "mobilenet-head": mobilenet_head,
        "mobilenet-requant": mobilenet_requant,
    }


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | profile | artifact | release | CDC fetched | fixed 256 KiB fetched | targets.json (+cdc) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        growth = r["targets_json_bytes"] - r["targets_json_bytes_without_cdc"]
        lines.append(
            f"| {r['case']} | {r['profile']} | {r['format']} {r['precision']} | {r['release_bytes']:,} B "
            f"| {r['cdc_fetched_bytes']:,} B ({r['cdc_fetched_share']:.1%}) "
            f"| {r['fixed_fetched_bytes']:,} B ({r['fixed_fetched_share']:.1%}) "
            f"| {r['targets_json_bytes']:,} B (+{growth:,} B) |"
        )
    return "\n".join(lines)


def write_markdown(result: dict[str, Any]) -> None:
    machine = result["machine"]
    note = (
        "# Delta downloads\n\nBytes a device downloads for a release built from the one it holds "
        "(`bench/bench_delta.py`), measured through the agent's delta assembly against a real "
        f"installed folder. Machine: {machine['cpu']} ({', '.join(machine['isa'])}), "
        f"{result['created_at']}.\n\n"
        "*release*: every file of the new bundle; *fixed 256 KiB*: the old chunks of the new "
        "release that the installed one does not hold (by hash); *targets.json*: the repository's "
        "after publishing both releases of the pair, and what the `cdc` tables add to it.\n\n"
    )
    (RESULTS / "delta.md").write_text(note + render(result["rows"]) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    parser.add_argument("--only", nargs="+", choices=["digits-head", "mobilenet-head", "mobilenet-requant"])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "delta")
    args = parser.parse_args(argv)
    mobilenet = any(name.startswith("mobilenet") for name in args.only or ["mobilenet"])
    if mobilenet and not (MOBILENET / "mobilenetv2.onnx").exists():
        raise SystemExit(
            "samples/mobilenet/mobilenetv2.onnx is missing: "
            "run `make mobilenet` first (or --only digits-head)"
        )
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    machine = machine_info()
    rows: list[dict[str, Any]] = []
    for name, run in cases(args.out, args.profiles).items():
        if args.only and name not in args.only:
            continue
        _progress(f"case {name}")
        rows.extend(run())
    table = render(rows)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    result = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "libraries": library_versions(["pyfastcdc", "onnx", "onnxruntime", "ai-edge-litert", "tensorflow"]),
        "fixed_chunk_bytes": CHUNK_BYTES,
        "rows": rows,
    }
    (RESULTS / "delta.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
