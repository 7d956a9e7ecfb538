"""Passphrase guesses per second per core against a stolen key file: the old PKCS#8 keys
(PBKDF2-HMAC-SHA256, 2,048 iterations, what ``cryptography``'s BestAvailableEncryption
writes) next to the sealed keys edgec writes now (scrypt n=2**17, r=8, p=1).

Run:  python bench/bench_kdf.py [--repeats 5]

Two figures per format, each the median of ``--repeats`` runs, on one core (one thread):

- *through the loader*: a wrong passphrase given to what opens the file (``load_pem_private_key``
  for PKCS#8, ``ota_server.keys.load_private`` for the sealed file): what a script does;
- *KDF alone*: only the key derivation (``cryptography``'s PBKDF2HMAC / Scrypt, the same
  OpenSSL), the floor of an attacker's own CPU loop. GPUs and ASICs do far better on PBKDF2; scrypt's
  128 MiB per guess is what keeps them near the CPU figure.

Writes ``bench/results/kdf.json`` and ``kdf.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import library_versions  # a sibling module (the script's folder is on sys.path)
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ota_server.keys import DEFAULT_KDF, SigningKeyError, load_private, write_sealed

RESULTS = Path(__file__).resolve().parent / "results"
PBKDF2_ITERATIONS = 2048  # what the PKCS#8 files hold (openssl asn1parse: PBES2, PBKDF2, 0x800)
CPU_FLAGS = ("aes", "sha_ni", "avx2", "avx512f")


def machine() -> dict[str, Any]:
    cpu, flags = platform.machine(), set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    from cryptography.hazmat.backends.openssl.backend import backend

    return {
        "cpu": cpu,
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "openssl": backend.openssl_version_text(),
        "versions": library_versions(["cryptography"]),
        "loadavg_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def measure(guesses: dict[str, tuple[Callable[[], None], int]], repeats: int) -> dict[str, dict[str, float]]:
    """Guesses/s of each ``(guess, guesses per run)``, the runs interleaved (one of each per
    round) so a change in the machine's load falls on all of them alike."""
    rates: dict[str, list[float]] = {name: [] for name in guesses}
    for _ in range(repeats):
        for name, (guess, per_run) in guesses.items():
            start = time.perf_counter()
            for _ in range(per_run):
                guess()
            rates[name].append(per_run / (time.perf_counter() - start))
    return {name: {"median": statistics.median(r), "min": min(r), "max": max(r)} for name, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    info = machine()
    print(f"machine: {info['cpu']} ({', '.join(info['cpu_flags'])}), python {info['python']}")

    private = Ed25519PrivateKey.generate()
    passphrase, wrong = b"the right passphrase", b"a wrong guess"
    old_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
    salt = os.urandom(16)

    def old_loader() -> None:
        try:
            serialization.load_pem_private_key(old_pem, password=wrong)
        except ValueError:
            return
        raise AssertionError("a wrong passphrase opened the PKCS#8 key")

    def old_kdf() -> None:
        PBKDF2HMAC(hashes.SHA256(), 32, salt, PBKDF2_ITERATIONS).derive(wrong)

    with tempfile.TemporaryDirectory() as folder:
        sealed = Path(folder) / "targets-1.key"
        write_sealed(sealed, private, passphrase, DEFAULT_KDF)

        def new_loader() -> None:
            try:
                load_private(sealed, wrong)
            except SigningKeyError:
                return
            raise AssertionError("a wrong passphrase opened the sealed key")

        def new_kdf() -> None:
            Scrypt(salt, 32, DEFAULT_KDF.n, DEFAULT_KDF.r, DEFAULT_KDF.p).derive(wrong)

        figures = measure(
            {
                "old loader": (old_loader, 400),
                "old kdf": (old_kdf, 400),
                "new loader": (new_loader, 3),
                "new kdf": (new_kdf, 3),
            },
            args.repeats,
        )
    cost = DEFAULT_KDF
    rows = [
        {
            "format": "PKCS#8 (before)",
            "kdf": f"PBKDF2-HMAC-SHA256, {PBKDF2_ITERATIONS:,} iterations",
            "memory_per_guess_bytes": 0,
            "guesses_per_s_loader": figures["old loader"],
            "guesses_per_s_kdf": figures["old kdf"],
        },
        {
            "format": "sealed (now)",
            "kdf": f"scrypt n=2**{cost.n.bit_length() - 1}, r={cost.r}, p={cost.p}",
            "memory_per_guess_bytes": cost.memory_bytes,
            "guesses_per_s_loader": figures["new loader"],
            "guesses_per_s_kdf": figures["new kdf"],
        },
    ]
    for row in rows:
        print(
            f"{row['format']:16} {row['kdf']:38} {row['guesses_per_s_loader']['median']:9,.1f} guesses/s "
            f"through the loader, {row['guesses_per_s_kdf']['median']:9,.1f} KDF alone"
        )
    ratio = rows[0]["guesses_per_s_loader"]["median"] / rows[1]["guesses_per_s_loader"]["median"]
    info["loadavg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    data = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "repeats": args.repeats,
        "results": rows,
        "slowdown": ratio,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kdf.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "kdf.md").write_text(report(data))
    print(f"the sealed format costs an attacker {ratio:,.0f}x more per guess; wrote {RESULTS / 'kdf.md'}")


def report(data: dict[str, Any]) -> str:
    info = data["machine"]
    lines = [
        "# Key files: passphrase guesses per second per core",
        "",
        f"{info['cpu']} ({', '.join(info['cpu_flags'])}), {info['usable_cores']} usable cores, "
        f"python {info['python']}, {info['openssl']}, cryptography {info['versions']['cryptography']}; "
        f"{data['created_at']}. Load average {info['loadavg_start']} at the start, "
        f"{info['loadavg_end']} at the end.",
        "",
        f"Median of {data['repeats']} interleaved runs, one thread, a wrong passphrase each time.",
        "",
        "| key file | KDF | memory per guess | guesses/s through the loader | guesses/s, KDF alone |",
        "|---|---|---:|---:|---:|",
    ]
    for row in data["results"]:
        memory = f"{row['memory_per_guess_bytes'] / 2**20:.0f} MiB" if row["memory_per_guess_bytes"] else "-"
        lines.append(
            f"| {row['format']} | {row['kdf']} | {memory} | {row['guesses_per_s_loader']['median']:,.1f} | "
            f"{row['guesses_per_s_kdf']['median']:,.1f} |"
        )
    lines += [
        "",
        f"- The sealed format costs {data['slowdown']:,.0f}x more per guess on this core.",
        "- *Through the loader*: what opens the file (load_pem_private_key; ota_server.keys.load_private).",
        "- *KDF alone*: cryptography's PBKDF2HMAC / Scrypt, the floor of an attacker's own CPU loop.",
        "  PBKDF2 parallelises on GPUs at little memory; scrypt needs 128 MiB per guess in flight.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
