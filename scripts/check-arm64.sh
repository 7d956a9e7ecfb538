#!/usr/bin/env bash
# Prove that the edgec agent installs and runs on arm64, the Raspberry Pi's architecture.
#
# Builds (or reuses) a Debian bookworm arm64 root with debootstrap, runs it under
# qemu-user emulation (binfmt_misc) on an x86_64 host, or natively on an arm64 host, and in it:
#   1. installs `edgec[agent]` from a wheel of this working tree into a venv, with constraints.txt;
#   2. checks that TensorFlow was not pulled in;
#   3. runs onnxruntime and LiteRT on small models;
#   4. runs `edgec agent self-test BUNDLE` on a raspberry-pi-4 bundle (TFLite int8);
#   5. starts `edgec agent serve BUNDLE --port P`, sends inference requests over the KServe v2
#      HTTP API and checks the answers against the bundle's golden outputs.
# Exits 0 only if every step passed. Needs root (debootstrap, chroot, mount).
#
# usage: sudo scripts/check-arm64.sh [--install-only] [BUNDLE_DIR]
#   BUNDLE_DIR      a raspberry-pi-4 bundle folder; without it the digits sample is built here
#                   with the repository's .venv (it needs the compiler extra)
#   --install-only  stop after steps 1-3 (no bundle, no agent commands)
#
# environment:
#   EDGEC_ARM64_ROOT      where the arm64 root is kept between runs (default /var/tmp/edgec-arm64-root);
#                         delete it to start from scratch
#   EDGEC_ARM64_MIRROR    Debian mirror for debootstrap (default: this host's apt source for bookworm)
#   EDGEC_ARM64_PORT      port for `edgec agent serve` (default: a free port)
#   EDGEC_ARM64_REQUESTS  inference requests to send (default 20)
#   EDGEC_PYTHON          host Python that builds the wheel and the bundle (default REPO/.venv/bin/python)

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=${EDGEC_ARM64_ROOT:-/var/tmp/edgec-arm64-root}
REQUESTS=${EDGEC_ARM64_REQUESTS:-20}
HOST_PY=${EDGEC_PYTHON:-$REPO/.venv/bin/python}
SUITE=bookworm
VENV=/opt/edgec/venv            # inside the root, where docs/agent-install.md puts it
CHECK=/srv/edgec-check          # inside the root: wheel, constraints, bundle, client

INSTALL_ONLY=0
BUNDLE=""
for arg in "$@"; do
    case $arg in
        --install-only) INSTALL_ONLY=1 ;;
        -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        -*) echo "unknown option: $arg (see --help)" >&2; exit 2 ;;
        *) BUNDLE=$arg ;;
    esac
done

# ---------------------------------------------------------------------------- helpers

STEP="start"
WORK=""
SERVE_PID=""
START=$SECONDS

say() { printf '\n== %s\n' "$*"; }
info() { printf '   %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
step() { STEP=$1; say "$1"; }

# Run a command quietly into LOG; on failure print the log's tail and fail.
run_logged() {
    local log=$1; shift
    if ! "$@" >"$log" 2>&1; then
        printf '   command failed: %s\n' "$*" >&2
        tail -n 40 "$log" | sed 's/^/   | /' >&2
        return 1
    fi
}

# Unmount everything mounted at or below a folder, deepest first.
unmount_under() {
    local dir=$1 target
    findmnt -rn -o TARGET | awk -v d="$dir" '$0 == d || index($0, d "/") == 1' | sort -r |
        while read -r target; do
            umount "$target" 2>/dev/null || umount -l "$target"
        done
}

# A clean environment inside the root: the host's pip and proxy settings, nothing else.
ROOT_ENV=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
          PIP_NO_INPUT=1 PIP_PROGRESS_BAR=off PIP_DISABLE_PIP_VERSION_CHECK=1)
while IFS='=' read -r name _; do
    case $name in
        PIP_* | http_proxy | https_proxy | no_proxy | HTTP_PROXY | HTTPS_PROXY | NO_PROXY)
            ROOT_ENV+=("$name=${!name}") ;;
    esac
done < <(env)

in_root() { chroot "$ROOT" /usr/bin/env -i "${ROOT_ENV[@]}" "$@"; }

cleanup() {
    local rc=$?
    if [[ -n $SERVE_PID ]] && kill -0 "$SERVE_PID" 2>/dev/null; then
        kill -TERM "$SERVE_PID" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$SERVE_PID" 2>/dev/null || true
    fi
    unmount_under "$ROOT"
    unmount_under "$ROOT.partial"
    if ((rc != 0)); then
        printf '\nFAILED at step: %s (after %ds)\n' "$STEP" $((SECONDS - START)) >&2
        [[ -n $WORK ]] && printf 'logs kept in %s\n' "$WORK" >&2
    elif [[ -n $WORK ]]; then
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------- checks

step "checking the host"
((EUID == 0)) || die "needs root (debootstrap, chroot and mount); run it with sudo"
[[ $ROOT == /* && $ROOT != / ]] || die "EDGEC_ARM64_ROOT must be an absolute path other than /"
if [[ -n $BUNDLE ]]; then
    BUNDLE=$(cd "$BUNDLE" && pwd) || die "no such bundle folder"
    [[ -f $BUNDLE/manifest.json && -f $BUNDLE/golden.npz ]] || die "$BUNDLE is not a bundle (manifest.json, golden.npz)"
fi
HOST_ARCH=$(uname -m)
NATIVE=0
[[ $HOST_ARCH == aarch64 || $HOST_ARCH == arm64 ]] && NATIVE=1
missing=()
for tool in debootstrap chroot findmnt curl git tar; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
((NATIVE)) || command -v qemu-aarch64-static >/dev/null || missing+=(qemu-aarch64-static)
((${#missing[@]} == 0)) || die "missing: ${missing[*]} (on Debian: apt-get install debootstrap qemu-user-static curl git)"
[[ -x $HOST_PY ]] || die "no host Python at $HOST_PY (make install, or set EDGEC_PYTHON)"
WORK=$(mktemp -d /tmp/edgec-arm64.XXXXXX)
info "host $HOST_ARCH, root $ROOT, work folder $WORK"

# ---------------------------------------------------------------------------- binfmt

if ((NATIVE)); then
    info "arm64 host: no emulation needed"
else
    step "registering qemu-aarch64 with binfmt_misc"
    if [[ ! -e /proc/sys/fs/binfmt_misc/register ]]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
        info "mounted binfmt_misc (left mounted: it is host-wide, like binfmt-support's)"
    fi
    if [[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
        info "already registered: $(head -n1 /proc/sys/fs/binfmt_misc/qemu-aarch64)"
    else
        conf=/usr/lib/binfmt.d/qemu-aarch64.conf
        [[ -f $conf ]] || die "$conf not found (install qemu-user-static)"
        # The F flag opens the interpreter now, so it works inside the chroot without a copy.
        grep -v '^#' "$conf" | head -n1 >/proc/sys/fs/binfmt_misc/register
        info "registered from $conf (flags: $(sed -n 's/^flags: //p' /proc/sys/fs/binfmt_misc/qemu-aarch64))"
    fi
fi

# ---------------------------------------------------------------------------- the root

if [[ -f $ROOT/.edgec-root-complete ]]; then
    step "reusing the arm64 root at $ROOT"
    info "built $(cat "$ROOT/.edgec-root-complete")"
else
    step "building a Debian $SUITE arm64 root with debootstrap (a few minutes)"
    [[ ! -e $ROOT ]] || die "$ROOT exists but is not a complete root; remove it first"
    mirror=${EDGEC_ARM64_MIRROR:-}
    if [[ -z $mirror ]] && command -v apt-get >/dev/null; then
        # shellcheck disable=SC2016  # $(...) here is apt's format syntax, not the shell's
        mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
            awk -v s="$SUITE" '$2 == s { print $1; exit }')
    fi
    mirror=${mirror:-http://deb.debian.org/debian}
    info "mirror $mirror"
    unmount_under "$ROOT.partial"
    rm -rf "$ROOT.partial"
    t0=$SECONDS
    run_logged "$WORK/debootstrap.log" debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,ca-certificates "$SUITE" "$ROOT.partial" "$mirror"
    echo "$(date -u +%FT%TZ) from $mirror" >"$ROOT.partial/.edgec-root-complete"
    mv "$ROOT.partial" "$ROOT"
    info "done in $((SECONDS - t0))s"
fi

step "preparing the root: mounts, DNS, the host's CA certificates and pip configuration"
for fs in proc sys dev; do
    mkdir -p "$ROOT/$fs"
done
mount -t proc proc "$ROOT/proc"
mount --bind /dev "$ROOT/dev"
if ((NATIVE)); then
    mount -t sysfs sysfs "$ROOT/sys"
    CPU_VIEW="the host's"
else
    # qemu-user shows the x86 host's /proc/cpuinfo and /sys to the arm64 programs. The CPU
    # detection in onnxruntime and LiteRT (pytorch/cpuinfo) then segfaults (measured with the
    # host's /sys mounted) or gives up (without it). So the root sees what a Raspberry Pi 4
    # shows: Cortex-A72 cores, as many as this host has up to 4, and qemu emulates that CPU.
    ncpu=$(nproc)
    ((ncpu <= 4)) || ncpu=4
    cpus=0
    ((ncpu == 1)) || cpus=0-$((ncpu - 1))
    mount -t tmpfs -o size=1m,mode=0755 edgec-sys "$ROOT/sys"
    mkdir -p "$ROOT/sys/devices/system/cpu"
    for f in possible present online; do
        echo "$cpus" >"$ROOT/sys/devices/system/cpu/$f"
    done
    for ((i = 0; i < ncpu; i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i"
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n'
        printf 'CPU revision\t: 3\n\n'
    done >"$WORK/cpuinfo"
    printf 'Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B (emulated)\n' >>"$WORK/cpuinfo"
    mount --bind "$WORK/cpuinfo" "$ROOT/proc/cpuinfo"
    ROOT_ENV+=(QEMU_CPU=cortex-a72)
    CPU_VIEW="$ncpu x Cortex-A72 (qemu -cpu cortex-a72, Pi 4 /proc/cpuinfo)"
fi
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
# Local CAs (a proxy's, a company's) so pip inside trusts what pip outside trusts.
# (update-ca-certificates takes a minute or two under emulation: only when they changed)
if compgen -G '/usr/local/share/ca-certificates/*' >/dev/null &&
    ! diff -rq /usr/local/share/ca-certificates "$ROOT/usr/local/share/ca-certificates" >/dev/null 2>&1; then
    cp -a /usr/local/share/ca-certificates/. "$ROOT/usr/local/share/ca-certificates/"
    run_logged "$WORK/ca.log" in_root update-ca-certificates
    info "CA certificates: $(find /usr/local/share/ca-certificates -type f | wc -l) local ones added"
fi
# pip's global and environment configuration, and the files it names (a cert, a constraints file).
pip_files=()
for f in /etc/pip.conf /etc/xdg/pip/pip.conf "${PIP_CONFIG_FILE:-}"; do
    [[ -n $f && -f $f ]] && pip_files+=("$f")
done
for f in "${pip_files[@]}"; do
    mkdir -p "$ROOT$(dirname "$f")"
    cp "$f" "$ROOT$f"
    info "pip config: $f"
    while read -r named; do
        if [[ -f $named && ! -e $ROOT$named ]]; then
            mkdir -p "$ROOT$(dirname "$named")"
            cp "$named" "$ROOT$named"
            info "  and $named"
        fi
    done < <(sed -n 's/^[[:space:]]*\(cert\|client-cert\|constraint\|requirement\)[[:space:]]*=[[:space:]]*//p' "$f")
done
ARCH_IN=$(in_root uname -m)
DEBIAN_IN=$(cat "$ROOT/etc/debian_version")
PY_IN=$(in_root python3 -c 'import platform; print(platform.python_version())')
info "inside: $ARCH_IN, Debian $DEBIAN_IN, Python $PY_IN; CPU: $CPU_VIEW"
[[ $ARCH_IN == aarch64 ]] || die "the root runs as $ARCH_IN, not aarch64"

# ---------------------------------------------------------------------------- the agent

step "building a wheel of the working tree on the host"
t0=$SECONDS
mkdir -p "$WORK/src" "$WORK/wheels"
# tracked and untracked-but-not-ignored files: what a checkout with these edits would hold
git -C "$REPO" ls-files -z -co --exclude-standard |
    tar -C "$REPO" --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -C "$WORK/src" -xf -
run_logged "$WORK/wheel.log" "$HOST_PY" -m pip wheel --no-deps -w "$WORK/wheels" "$WORK/src"
WHEEL=$(find "$WORK/wheels" -name 'edgec-*.whl' | head -n1)
[[ -n $WHEEL ]] || die "pip wheel made no edgec wheel"
info "$(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1)) in $((SECONDS - t0))s"

step "installing edgec[agent] into $VENV inside the root"
t0=$SECONDS
rm -rf "$ROOT$CHECK"
mkdir -p "$ROOT$CHECK"
cp "$WHEEL" "$REPO/constraints.txt" "$ROOT$CHECK/"
cp "$REPO/samples/digits/model.onnx" "$ROOT$CHECK/digits.onnx"
wheel_in=$CHECK/$(basename "$WHEEL")
[[ -x $ROOT$VENV/bin/python ]] || run_logged "$WORK/venv.log" in_root python3 -m venv "$VENV"
run_logged "$WORK/pip-install.log" in_root "$VENV/bin/pip" install -c "$CHECK/constraints.txt" "${wheel_in}[agent]"
# the version number rarely changes between edits: always put this tree's code in
run_logged "$WORK/pip-reinstall.log" in_root "$VENV/bin/pip" install --no-deps --force-reinstall "$wheel_in"
in_root "$VENV/bin/pip" list --format=freeze >"$WORK/pip-list.txt"
PKG_COUNT=$(wc -l <"$WORK/pip-list.txt")
VENV_SIZE=$(du -sh "$ROOT$VENV" | cut -f1)
info "installed in $((SECONDS - t0))s: $PKG_COUNT packages, $VENV_SIZE"
sed 's/^/   | /' "$WORK/pip-list.txt"

step "checking that no training framework came with it"
if in_root "$VENV/bin/python" -c 'import tensorflow' 2>/dev/null; then
    die "import tensorflow succeeded: edgec[agent] pulled TensorFlow in"
fi
info "import tensorflow: fails, as it must"
heavy=$(grep -iE '^(tensorflow|tensorflow-cpu|tf-keras|tf_keras|keras|torch|onnx2tf|tf2onnx|coremltools)==' \
    "$WORK/pip-list.txt" || true)
[[ -z $heavy ]] || die "edgec[agent] pulled in: $heavy"
info "none of tensorflow, tf-keras, keras, torch, onnx2tf, tf2onnx, coremltools installed"

VERSIONS=$(in_root "$VENV/bin/python" -c '
from importlib.metadata import version
print(", ".join(f"{p} {version(p)}" for p in
      ("edgec", "numpy", "onnxruntime", "ai-edge-litert", "tuf", "cryptography", "paho-mqtt")))')
info "$VERSIONS"

# ---------------------------------------------------------------------------- the bundle

MODEL_TFLITE=""
if ((!INSTALL_ONLY)); then
    if [[ -z $BUNDLE ]]; then
        step "building the digits sample for raspberry-pi-4 on the host"
        t0=$SECONDS
        run_logged "$WORK/build.log" "$HOST_PY" -m edgec build "$REPO/samples/digits/model.onnx" \
            --name digits --version 1.0.0 --target raspberry-pi-4 \
            --calibration "$REPO/samples/digits/calib.npz" --eval "$REPO/samples/digits/eval.npz" \
            --out "$WORK/bundles"
        BUNDLE=$WORK/bundles/digits-1.0.0-raspberry-pi-4
        [[ -f $BUNDLE/manifest.json ]] || die "the build wrote no bundle at $BUNDLE"
        info "built $(basename "$BUNDLE") in $((SECONDS - t0))s"
    fi
    BUNDLE_IN=$CHECK/bundles/$(basename "$BUNDLE")
    mkdir -p "$ROOT$CHECK/bundles"
    cp -a "$BUNDLE" "$ROOT$BUNDLE_IN"
    info "copied to $BUNDLE_IN inside the root"
    MODEL_TFLITE=$(find "$ROOT$BUNDLE_IN" -maxdepth 1 -name '*.tflite' | head -n1)
    MODEL_TFLITE=${MODEL_TFLITE#"$ROOT"}
fi

step "running onnxruntime and LiteRT inside the root"
if ! RUNTIMES=$(in_root "$VENV/bin/python" - "$CHECK/digits.onnx" "$MODEL_TFLITE" 2>&1 <<'EOF'
import sys
import numpy as np
import onnxruntime as ort

onnx_path, tflite_path = sys.argv[1], sys.argv[2]
session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
spec = session.get_inputs()[0]
shape = [d if isinstance(d, int) else 1 for d in spec.shape]
out = session.run(None, {spec.name: np.zeros(shape, np.float32)})[0]
print(f"onnxruntime: digits.onnx ran on {session.get_providers()[0]}, output {list(out.shape)}")

from ai_edge_litert.interpreter import Interpreter

if tflite_path:
    interp = Interpreter(model_path=tflite_path)
    interp.allocate_tensors()
    detail = interp.get_input_details()[0]
    interp.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
    interp.invoke()
    result = interp.get_tensor(interp.get_output_details()[0]["index"])
    print(f"LiteRT: {tflite_path.rsplit('/', 1)[-1]} ran, input {detail['dtype'].__name__}, output {list(result.shape)}")
else:
    print("LiteRT: ai_edge_litert.interpreter imports (no .tflite model to run with --install-only)")
EOF
); then
    printf '%s\n' "$RUNTIMES" | sed 's/^/   | /'
    die "a runtime failed inside the root"
fi
printf '%s\n' "$RUNTIMES" | sed 's/^/   | /'

if ((INSTALL_ONLY)); then
    say "PASS (install only) in $((SECONDS - START))s"
    info "architecture    $ARCH_IN (host $HOST_ARCH), Debian $DEBIAN_IN, Python $PY_IN"
info "CPU             $CPU_VIEW"
    info "agent venv      $PKG_COUNT packages, $VENV_SIZE; no TensorFlow"
    info "versions        $VERSIONS"
    exit 0
fi

# ---------------------------------------------------------------------------- the agent commands

step "edgec agent self-test inside the root"
t0=$SECONDS
if ! in_root "$VENV/bin/edgec" agent self-test "$BUNDLE_IN" >"$WORK/self-test.log" 2>&1; then
    sed 's/^/   | /' "$WORK/self-test.log"
    die "edgec agent self-test failed"
fi
sed 's/^/   | /' "$WORK/self-test.log"
SELF_TEST="passed in $((SECONDS - t0))s"
info "self-test $SELF_TEST"

step "edgec agent serve inside the root, and inference over HTTP"
PORT=${EDGEC_ARM64_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
chroot "$ROOT" /usr/bin/env -i "${ROOT_ENV[@]}" "$VENV/bin/edgec" agent serve "$BUNDLE_IN" --port "$PORT" \
    >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
info "started (pid $SERVE_PID, port $PORT); waiting for /v2/health/ready"
t0=$SECONDS
until curl -fsS -o /dev/null "http://127.0.0.1:$PORT/v2/health/ready" 2>/dev/null; do
    if ! kill -0 "$SERVE_PID" 2>/dev/null; then
        sed 's/^/   | /' "$WORK/serve.log"
        die "edgec agent serve exited before it was ready"
    fi
    ((SECONDS - t0 < 300)) || { sed 's/^/   | /' "$WORK/serve.log"; die "not ready after 300s"; }
    sleep 1
done
info "ready after $((SECONDS - t0))s"

cat >"$ROOT$CHECK/client.py" <<'EOF'
"""Send golden inputs to /v2/models/{name}/infer and compare the answers' top-1 with golden outputs."""
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

bundle, port, requests = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
manifest = json.loads((bundle / "manifest.json").read_text())
golden = np.load(bundle / "golden.npz")
name = manifest["name"]
inputs = [spec["name"] for spec in manifest["inputs"]]
output = manifest["outputs"][0]["name"]
samples = len(golden[f"inputs/{inputs[0]}"])


def sample(key: str, spec: dict, k: int) -> np.ndarray:
    """Golden sample k as one request's tensor: golden.npz stacks whole model inputs or single rows."""
    array = golden[key]
    rank = len(spec.get("source_shape") or spec["shape"])
    return array[k] if array.ndim == rank + 1 else array[k : k + 1]


specs = {spec["name"]: spec for spec in manifest["inputs"] + manifest["outputs"]}
datatypes = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
             "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}
url = f"http://127.0.0.1:{port}/v2/models/{name}/infer"

agree, latencies, max_err = 0, [], 0.0
for i in range(requests):
    k = i % samples
    body = {"inputs": []}
    for input_name in inputs:
        x = sample(f"inputs/{input_name}", specs[input_name], k)
        body["inputs"].append({"name": input_name, "shape": list(x.shape),
                               "datatype": datatypes[str(x.dtype)], "data": x.ravel().tolist()})
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as e:
        sys.exit(f"request {i}: HTTP {e.code}: {e.read().decode(errors='replace')}")
    latencies.append((time.perf_counter() - started) * 1000)
    outs = {o["name"]: o for o in answer["outputs"]}
    got = outs.get(output) or answer["outputs"][0]
    y = np.asarray(got["data"], np.float32).reshape(got["shape"])
    want = sample(f"outputs/{output}", specs[output], k).astype(np.float32)
    if y.shape != want.shape:
        sys.exit(f"request {i}: output shape {list(y.shape)}, expected {list(want.shape)}")
    agree += int(np.argmax(y) == np.argmax(want))
    max_err = max(max_err, float(np.max(np.abs(y - want))))

timed = latencies[1:] or latencies  # the first request warms up
p50 = statistics.median(timed)
p95 = sorted(timed)[min(len(timed) - 1, round(0.95 * (len(timed) - 1)))]
print(f"{requests} answers from {samples} golden samples: top-1 agrees with the source model on "
      f"{agree}/{requests}, max abs error {max_err:.3g}")
print(f"RESULT agree={agree} requests={requests} p50_ms={p50:.1f} p95_ms={p95:.1f}")
sys.exit(0 if agree >= 0.9 * requests else 1)
EOF
if ! in_root "$VENV/bin/python" "$CHECK/client.py" "$BUNDLE_IN" "$PORT" "$REQUESTS" >"$WORK/client.log" 2>&1; then
    sed 's/^/   | /' "$WORK/client.log" "$WORK/serve.log"
    die "inference answers did not check out"
fi
sed 's/^/   | /' "$WORK/client.log"
read -r agree p50 p95 < <(sed -n 's/^RESULT agree=\([0-9]*\) requests=[0-9]* p50_ms=\([0-9.]*\) p95_ms=\([0-9.]*\)$/\1 \2 \3/p' "$WORK/client.log")

kill -TERM "$SERVE_PID"
for _ in $(seq 20); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 0.5; done
if kill -0 "$SERVE_PID" 2>/dev/null; then
    info "serve did not stop on SIGTERM within 10s; killed"
    kill -KILL "$SERVE_PID" || true
else
    info "serve stopped on SIGTERM"
fi
SERVE_PID=""

# ---------------------------------------------------------------------------- summary

emulated=""
((NATIVE)) || emulated=" (qemu-user emulation on $HOST_ARCH: not a Pi figure)"
say "PASS in $((SECONDS - START))s"
info "architecture    $ARCH_IN (host $HOST_ARCH), Debian $DEBIAN_IN, Python $PY_IN"
info "CPU             $CPU_VIEW"
info "agent venv      $PKG_COUNT packages, $VENV_SIZE; no TensorFlow"
info "versions        $VERSIONS"
info "bundle          $(basename "$BUNDLE")"
info "self-test       $SELF_TEST"
info "serve           $agree/$REQUESTS answers agree with the golden outputs"
info "latency         p50 ${p50} ms, p95 ${p95} ms per HTTP request$emulated"
