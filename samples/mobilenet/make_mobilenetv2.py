"""Generate a MobileNetV2-sized ONNX classifier of 10 synthetic classes, plus its data.

What it is: a MobileNetV2 backbone with random weights and a linear head fitted, as a
nearest-class-mean classifier, on 10 synthetic image classes. Why: a quantized model's
top-1 agreement with its source only means something when the source is confident on its
data, as a trained classifier is on in-distribution inputs. A fully random head has no
decisive winner (tiny top-1 margins that any rounding flips); this head, fitted on the
classes the calibration and eval data are drawn from, gives the margins of a real one.

No training framework is needed: the graph is written with ``onnx.helper`` and the weights
come from numpy. The architecture is standard MobileNetV2 1.0 at 224x224 (Sandler et al.
2018): a 3x3 stride-2 stem conv to 32 channels, 17 inverted-residual blocks (1x1 expansion,
3x3 depthwise, linear 1x1 bottleneck; expansion 6 except the first block, which has 1 as in
the paper; a residual Add where the stride is 1 and the channel counts match), a 1x1 conv to
1280, GlobalAveragePool, Flatten and a Gemm to 1000 classes. BatchNorm is folded into each
conv's weights and bias, ReLU6 is ``Clip(0, 6)``. About 3.5 M parameters, ~14 MB in fp32.

Backbone: random but not arbitrary. Convs start from He-normal weights (3x3 kernels mixed
with a smooth, centre-weighted component, as trained stem and depthwise filters are mostly
low-frequency), then, layer by layer, a numpy forward pass over a batch of generic scenes
measures each channel's mean and standard deviation and folds a BatchNorm into the conv the
way training would (scale ``gamma / std``, shift ``beta - mean * gamma / std``, with random
``gamma`` and ``beta``). Activations therefore neither explode nor vanish through the 52
convs, and per-channel weight ranges differ as in a trained, BN-folded network.

Classes and head: 10 prototype images (smooth synthetic scenes: multi-octave low-frequency
colour noise plus a few soft-edged discs and bands, in 0..1 RGB, ImageNet-normalized); a
sample of class ``k`` is prototype ``k`` shifted by up to 8 pixels, with contrast,
brightness and colour-balance changes, low-frequency colour noise and pixel noise. The head
is fitted on the 1280-d pooled features of 20 training samples per class (a set of their
own, disjoint from calibration and eval): row ``k`` (``k`` < 10) is the unit direction from
the mean feature to class ``k``'s mean feature, with a bias that centres it on the mean
feature; rows 10..999 are small random directions, centred the same way, whose logits stay
near zero. One scale for rows 0..9 is chosen so that the source model's softmax confidence
in the true class is at least 0.9 on 95% of the training samples. The source model then
classifies the calibration and eval samples 100% correctly, with top-1 margins (true logit
minus the best other) of about 8 at the median; the script prints the distribution.

Writes (to this script's folder by default; git-ignored there):

- ``mobilenetv2.onnx``  input ``input`` float32 [N, 3, 224, 224], output ``logits``
  float32 [N, 1000], dynamic batch axis ``N``, opset 17;
- ``calib.npz``  64 samples of the 10 classes under ``input`` [64, 3, 224, 224], for int8
  calibration;
- ``eval.npz``   100 other samples (10 per class) under ``input`` and their classes under
  ``y`` (int64 [100]), for verification.

Classes are interleaved (sample ``i`` is of class ``i % 10``), so any prefix is balanced.
Everything is deterministic (fixed seeds).

Run:  python samples/mobilenet/make_mobilenetv2.py [--out DIR]    (about 25 s on 2 cores)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
MODEL_FILE = "mobilenetv2.onnx"
CALIB_FILE = "calib.npz"
EVAL_FILE = "eval.npz"
INPUT = "input"
OUTPUT = "logits"
FEATURES = "features"
LABELS = "y"
SIZE = 224
CLASSES = 1000
OPSET = 17
INIT_SAMPLES = 16  # generic scenes the layer-by-layer rescaling measures statistics on
SYNTHETIC_CLASSES = 10
TRAIN_PER_CLASS = 20  # samples per class the head is fitted on
CALIB_SAMPLES = 64
EVAL_SAMPLES = 100

SEED_WEIGHTS = 20260201
SEED_INIT_DATA = 20260202
SEED_CALIB = 20260203
SEED_EVAL = 20260204
SEED_PROTOTYPES = 20260205
SEED_TRAIN = 20260206

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# MobileNetV2 1.0: (expansion t, output channels c, repeats n, first stride s)
BLOCKS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
# Share of a 3x3 kernel's energy in a smooth, centre-weighted component (the rest is white).
# Purely white 3x3 kernels are high-pass; rescaled to unit variance on smooth images they make
# a random network hypersensitive to small perturbations (1e-3 input noise -> ~10% logit
# change), far from a trained network. Trained stem and depthwise filters are mostly
# low-frequency blobs and edges; with this share the same test moves the logits ~0.2%.
SMOOTH = 0.75
RESIDUAL_GAIN = 0.5  # BN gamma scale on a residual branch's projection, so sums stay O(1)

# Perturbations that turn a class prototype into a sample (0..1 RGB units)
MAX_SHIFT = 8  # pixels, each axis
CONTRAST = 0.1  # contrast factor 1 +- this
BRIGHTNESS = 0.05  # offset +- this
COLOUR_GAIN = 0.04  # per-channel gain 1 +- this
LOW_FREQ_NOISE = 0.03  # amplitude of 6x6 and 12x12 colour noise
PIXEL_NOISE = 0.02  # standard deviation of white noise
# Head: the class rows' scale makes the source model's softmax confidence in the true class
# at least MIN_CONFIDENCE on CONFIDENT_SHARE of the training samples
MIN_CONFIDENCE = 0.9
CONFIDENT_SHARE = 0.95
OTHER_LOGIT_STD = 0.5  # spread of the 990 unused classes' logits on the training samples


# --------------------------------------------------------------------------- images


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``[..., h, w]`` to ``[..., size, size]`` (align_corners=True)."""
    h, w = grid.shape[-2:]
    ys = np.linspace(0.0, h - 1.0, size)
    xs = np.linspace(0.0, w - 1.0, size)
    y0 = np.minimum(np.floor(ys).astype(int), h - 2)
    x0 = np.minimum(np.floor(xs).astype(int), w - 2)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    a = grid[..., y0[:, None], x0[None, :]]
    b = grid[..., y0[:, None], x0[None, :] + 1]
    c = grid[..., y0[:, None] + 1, x0[None, :]]
    d = grid[..., y0[:, None] + 1, x0[None, :] + 1]
    return (a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx).astype(np.float32)


def _scene(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """One smooth, structured RGB scene in 0..1: ``[3, size, size]`` float32."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # 1/f-like colour noise: octaves from 3x3 to 48x48 grids, amplitude halving per octave
    base = rng.uniform(0.2, 0.8, size=(3, 1, 1)).astype(np.float32)
    img = np.broadcast_to(base, (3, size, size)).copy()
    amplitude = rng.uniform(0.25, 0.45)
    for cells in (3, 6, 12, 24, 48):
        img += amplitude * _upsample(rng.standard_normal((3, cells, cells)).astype(np.float32), size)
        amplitude *= 0.5
    # a few soft-edged discs and bands give edges and objects
    for _ in range(rng.integers(2, 6)):
        colour = rng.uniform(0.0, 1.0, size=(3, 1, 1)).astype(np.float32)
        softness = rng.uniform(0.005, 0.04)
        if rng.random() < 0.6:
            cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.3)
            dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - r
        else:
            angle = rng.uniform(0.0, np.pi)
            offset = rng.uniform(-0.3, 0.3)
            width = rng.uniform(0.03, 0.15)
            along = (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle) - offset
            dist = np.abs(along) - width
        mask = 1.0 / (1.0 + np.exp(np.clip(dist / softness, -30.0, 30.0)))
        alpha = rng.uniform(0.5, 1.0)
        img = img * (1 - alpha * mask) + colour * (alpha * mask)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _normalize(images: np.ndarray) -> np.ndarray:
    """0..1 RGB ``[N, 3, H, W]`` -> ImageNet-normalized float32."""
    return ((images - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]).astype(np.float32)


def make_images(count: int, seed: int, size: int = SIZE) -> np.ndarray:
    """Generic scenes, ImageNet-normalized: ``[count, 3, size, size]`` float32."""
    rng = np.random.default_rng(seed)
    return _normalize(np.stack([_scene(rng, size) for _ in range(count)]))


def make_prototypes(seed: int = SEED_PROTOTYPES, size: int = SIZE) -> np.ndarray:
    """The classes' prototype scenes in 0..1 RGB: ``[SYNTHETIC_CLASSES, 3, size, size]``."""
    rng = np.random.default_rng(seed)
    return np.stack([_scene(rng, size) for _ in range(SYNTHETIC_CLASSES)])


def _perturb(prototype: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A sample of the prototype's class: shifted, re-lit, noisy; 0..1 RGB."""
    size = prototype.shape[-1]
    dy, dx = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=2)
    padded = np.pad(prototype, ((0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT)), mode="edge")
    img = padded[:, MAX_SHIFT + dy : MAX_SHIFT + dy + size, MAX_SHIFT + dx : MAX_SHIFT + dx + size]
    mean = img.mean()
    img = (img - mean) * rng.uniform(1 - CONTRAST, 1 + CONTRAST) + mean
    img = img * rng.uniform(1 - COLOUR_GAIN, 1 + COLOUR_GAIN, size=(3, 1, 1))
    img = img + rng.uniform(-BRIGHTNESS, BRIGHTNESS)
    for cells in (6, 12):
        img = img + LOW_FREQ_NOISE * _upsample(rng.standard_normal((3, cells, cells)), size)
    img = img + rng.normal(0.0, PIXEL_NOISE, size=img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def make_class_samples(prototypes: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` samples, ImageNet-normalized, and their classes (sample ``i`` is of ``i % K``)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count, dtype=np.int64) % len(prototypes)
    return _normalize(np.stack([_perturb(prototypes[k], rng) for k in labels])), labels


# --------------------------------------------------------------------------- numpy forward


def _conv1x1(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``x`` [B, Cin, H, W], ``w`` [Cout, Cin, 1, 1] -> [B, Cout, H, W], no bias."""
    b, c, h, wd = x.shape
    out = w[:, :, 0, 0] @ x.reshape(b, c, h * wd)
    return out.reshape(b, -1, h, wd)


def _conv3x3(x: np.ndarray, w: np.ndarray, stride: int, depthwise: bool) -> np.ndarray:
    """3x3 conv with padding 1: dense (``w`` [Cout, Cin, 3, 3]) or depthwise ([C, 1, 3, 3])."""
    b, c, h, wd = x.shape
    ho, wo = (h - 1) // stride + 1, (wd - 1) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = None
    for ky in range(3):
        for kx in range(3):
            patch = xp[
                :, :, ky : ky + stride * (ho - 1) + 1 : stride, kx : kx + stride * (wo - 1) + 1 : stride
            ]
            if depthwise:
                term = patch * w[None, :, 0, ky, kx, None, None]
            else:
                term = (w[:, :, ky, kx] @ patch.reshape(b, c, ho * wo)).reshape(b, -1, ho, wo)
            out = term if out is None else out + term
    assert out is not None
    return out


def _relu6(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 6.0)


# --------------------------------------------------------------------------- model


@dataclass
class _Graph:
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    params: int = 0

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        self.params += array.size
        return name


class _Builder:
    """Builds the ONNX graph and, in step, runs the numpy forward pass that sets each BN fold."""

    def __init__(self, batch: np.ndarray, rng: np.random.Generator) -> None:
        self.rng = rng
        self.graph = _Graph()
        self.graph.initializers += [
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "relu6_min"),
            numpy_helper.from_array(np.array(6.0, dtype=np.float32), "relu6_max"),
        ]
        self.x = batch  # the current activation of the init batch
        self.tensor = INPUT  # the current activation's name in the graph

    def conv_bn(
        self,
        name: str,
        out_channels: int,
        *,
        kernel: int,
        stride: int,
        depthwise: bool,
        relu6: bool,
        gain: float,
    ) -> None:
        in_channels = self.x.shape[1]
        group = in_channels if depthwise else 1
        fan_in = (in_channels // group) * kernel * kernel
        shape = (out_channels, in_channels // group, kernel, kernel)
        w = self._kernel(shape, fan_in, kernel)
        y = _conv1x1(self.x, w) if kernel == 1 else _conv3x3(self.x, w, stride, depthwise)
        # fold a BatchNorm whose statistics are this layer's, over the init batch
        mean = y.mean(axis=(0, 2, 3), dtype=np.float64)
        std = np.sqrt(y.var(axis=(0, 2, 3), dtype=np.float64) + 1e-5)
        gamma = gain * self.rng.uniform(0.6, 1.4, size=out_channels)
        beta = self.rng.normal(0.2 if relu6 else 0.0, 0.3, size=out_channels)
        scale = gamma / std
        w_folded = (w * scale[:, None, None, None]).astype(np.float32)
        bias = (beta - mean * scale).astype(np.float32)
        y = (y * scale[None, :, None, None].astype(np.float32) + bias[None, :, None, None]).astype(np.float32)

        out = f"{name}_out"
        self.graph.nodes.append(
            helper.make_node(
                "Conv",
                [
                    self.tensor,
                    self.graph.weight(f"{name}.weight", w_folded),
                    self.graph.weight(f"{name}.bias", bias),
                ],
                [out],
                name=name,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[kernel // 2] * 4,
                group=group,
            )
        )
        if relu6:
            act = f"{name}_relu6"
            self.graph.nodes.append(
                helper.make_node("Clip", [out, "relu6_min", "relu6_max"], [act], name=f"{name}.relu6")
            )
            out, y = act, _relu6(y)
        self.tensor, self.x = out, y

    def _kernel(self, shape: tuple[int, int, int, int], fan_in: int, kernel: int) -> np.ndarray:
        """He-normal weights; 3x3 kernels get a smooth share (``SMOOTH``) of their energy."""
        w = self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        if kernel == 3:
            bump = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0])
            bump /= np.sqrt((bump**2).sum())
            # per (out, in) pair: a random-sign smooth component of the same expected norm
            amp = self.rng.standard_normal(shape[:2])[:, :, None, None] * 3.0 * np.sqrt(2.0 / fan_in)
            w = np.sqrt(1 - SMOOTH) * w + np.sqrt(SMOOTH) * amp * bump
        return w.astype(np.float32)

    def inverted_residual(self, name: str, expansion: int, out_channels: int, stride: int) -> None:
        in_channels = self.x.shape[1]
        residual = stride == 1 and in_channels == out_channels
        block_in, block_x = self.tensor, self.x
        hidden = in_channels * expansion
        if expansion != 1:
            self.conv_bn(f"{name}.expand", hidden, kernel=1, stride=1, depthwise=False, relu6=True, gain=1.0)
        self.conv_bn(
            f"{name}.depthwise", hidden, kernel=3, stride=stride, depthwise=True, relu6=True, gain=1.0
        )
        gain = RESIDUAL_GAIN if residual else 1.0
        self.conv_bn(
            f"{name}.project", out_channels, kernel=1, stride=1, depthwise=False, relu6=False, gain=gain
        )
        if residual:
            out = f"{name}_add"
            self.graph.nodes.append(
                helper.make_node("Add", [block_in, self.tensor], [out], name=f"{name}.add")
            )
            self.tensor, self.x = out, block_x + self.x

    def pool(self) -> None:
        """GlobalAveragePool and Flatten to the ``features`` [N, 1280] the head reads."""
        self.graph.nodes += [
            helper.make_node("GlobalAveragePool", [self.tensor], ["pooled"], name="pool"),
            helper.make_node("Flatten", ["pooled"], [FEATURES], name="flatten", axis=1),
        ]
        self.tensor, self.x = FEATURES, self.x.mean(axis=(2, 3))

    def head(self, w: np.ndarray, bias: np.ndarray) -> None:
        self.graph.nodes.append(
            helper.make_node(
                "Gemm",
                [
                    FEATURES,
                    self.graph.weight("classifier.weight", w),
                    self.graph.weight("classifier.bias", bias),
                ],
                [OUTPUT],
                name="classifier",
                transB=1,
            )
        )
        self.tensor = OUTPUT

    def model(self, output: str, width: int) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.graph.nodes,
            "mobilenetv2_synthetic10",
            [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", width])],
            initializer=self.graph.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="edgec-samples",
            producer_version="2",
            doc_string=(
                "MobileNetV2 1.0 224x224: random BN-folded backbone, class-mean head fitted on "
                f"{SYNTHETIC_CLASSES} synthetic classes; from make_mobilenetv2.py"
            ),
        )
        model.ir_version = 8
        return model


def build_backbone(init_batch: np.ndarray, seed: int = SEED_WEIGHTS) -> _Builder:
    """The graph up to the pooled ``features``; ``.x`` holds the numpy features of ``init_batch``."""
    b = _Builder(init_batch, np.random.default_rng(seed))
    b.conv_bn("features.0", STEM_CHANNELS, kernel=3, stride=2, depthwise=False, relu6=True, gain=1.0)
    index = 1
    for expansion, channels, repeats, stride in BLOCKS:
        for r in range(repeats):
            b.inverted_residual(f"features.{index}", expansion, channels, stride if r == 0 else 1)
            index += 1
    b.conv_bn(f"features.{index}", LAST_CHANNELS, kernel=1, stride=1, depthwise=False, relu6=True, gain=1.0)
    b.pool()
    return b


def fit_head(
    features: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-class-mean head: weights [CLASSES, D] and biases [CLASSES], float32.

    Row ``k`` (``k`` < K) is the unit direction from the mean feature to class ``k``'s mean
    feature; the other rows are small random directions. Every bias centres its row on the
    mean feature, so a logit is the row's projection of ``features - mean``: high for the
    sample's own class, negative for the other K - 1, near zero for the unused rows. One scale
    for the K class rows is then set, by bisection, so that the source model's softmax
    confidence in the true class is at least ``MIN_CONFIDENCE`` on ``CONFIDENT_SHARE`` of the
    training samples.
    """
    f = features.astype(np.float64)
    centre = f.mean(axis=0)
    centred = f - centre
    classes = int(labels.max()) + 1
    directions = np.stack([centred[labels == k].mean(axis=0) for k in range(classes)])
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    unused = rng.standard_normal((CLASSES - classes, f.shape[1]))
    unused *= OTHER_LOGIT_STD / float((centred @ unused.T).std())
    class_logits = centred @ directions.T  # at scale 1
    unused_logits = centred @ unused.T

    def confident_share(scale: float) -> float:
        logits = np.concatenate([class_logits * scale, unused_logits], axis=1)
        return float(np.mean(_confidence(logits, labels) >= MIN_CONFIDENCE))

    low, high = 0.0, 1.0
    while confident_share(high) < CONFIDENT_SHARE:
        low, high = high, high * 2.0
        if high > 1e6:
            raise RuntimeError("the synthetic classes are not separable by their class means")
    for _ in range(40):
        mid = 0.5 * (low + high)
        low, high = (low, mid) if confident_share(mid) >= CONFIDENT_SHARE else (mid, high)
    w = np.concatenate([directions * high, unused])
    return w.astype(np.float32), (-(w @ centre)).astype(np.float32)


def _margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per sample: the true class's logit minus the largest other (negative when wrong)."""
    rows = np.arange(len(labels))
    true = logits[rows, labels]
    rest = logits.copy()
    rest[rows, labels] = -np.inf
    return true - rest.max(axis=1)


def _confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Softmax probability of the true class, per sample."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p[np.arange(len(labels)), labels] / p.sum(axis=1)


def _forward(model: onnx.ModelProto) -> Callable[[np.ndarray], np.ndarray]:
    """The model's first output on a batch of images, through onnxruntime, 25 at a time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_outputs()[0].name
    return lambda x: np.concatenate(
        [session.run([name], {INPUT: x[i : i + 25]})[0] for i in range(0, len(x), 25)]
    )


def _summary(logits: np.ndarray, labels: np.ndarray) -> str:
    margins = _margins(logits, labels)
    conf = _confidence(logits, labels)
    p5, p50, p95 = np.percentile(margins, [5, 50, 95])
    return (
        f"accuracy {np.mean(logits.argmax(axis=1) == labels):.1%}; top-1 margin min {margins.min():.2f}, "
        f"p5 {p5:.2f}, median {p50:.2f}, p95 {p95:.2f}; true-class softmax min {conf.min():.3f}, "
        f"median {np.median(conf):.3f}, >= {MIN_CONFIDENCE} on {np.mean(conf >= MIN_CONFIDENCE):.0%}"
    )


def generate(out: Path = HERE, quiet: bool = False) -> dict[str, object]:
    """Write the model and data files to ``out``; returns what was written."""
    import onnxruntime as ort

    say = (lambda _m: None) if quiet else (lambda m: print(m, flush=True))
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)

    init_batch = make_images(INIT_SAMPLES, SEED_INIT_DATA)
    builder = build_backbone(init_batch)
    backbone = _forward(builder.model(FEATURES, LAST_CHANNELS))
    mismatch = float(np.abs(backbone(init_batch) - builder.x).max())
    if mismatch > 1e-3:
        raise RuntimeError(f"onnxruntime and the numpy reference differ by {mismatch:.3g}")

    prototypes = make_prototypes()
    data = {
        "train": make_class_samples(prototypes, SYNTHETIC_CLASSES * TRAIN_PER_CLASS, SEED_TRAIN),
        "calib": make_class_samples(prototypes, CALIB_SAMPLES, SEED_CALIB),
        "eval": make_class_samples(prototypes, EVAL_SAMPLES, SEED_EVAL),
    }
    train, train_labels = data["train"]
    train_features = backbone(train)
    w, bias = fit_head(train_features, train_labels, builder.rng)
    builder.head(w, bias)
    model = builder.model(OUTPUT, CLASSES)
    onnx.checker.check_model(model, full_check=True)
    model_path = out / MODEL_FILE
    onnx.save(model, str(model_path))
    calib, evaluation = data["calib"][0], data["eval"][0]
    np.savez(out / CALIB_FILE, input=calib)  # the keys are INPUT and LABELS
    np.savez(out / EVAL_FILE, input=evaluation, y=data["eval"][1])

    classify = _forward(model)
    logits = {name: classify(images) for name, (images, _) in data.items()}
    head_mismatch = float(np.abs(logits["train"] - (train_features @ w.T + bias)).max())
    if head_mismatch > 1e-2:
        raise RuntimeError(f"the saved head differs from the fitted one by {head_mismatch:.3g}")
    size = model_path.stat().st_size
    params = builder.graph.params
    say(f"wrote {model_path}  ({params:,} parameters, {size:,} bytes = {size / 2**20:.2f} MiB fp32)")
    say(f"wrote {out / CALIB_FILE}  ({INPUT!r} {list(calib.shape)} float32)")
    say(f"wrote {out / EVAL_FILE}  ({INPUT!r} {list(evaluation.shape)} float32, {LABELS!r} int64)")
    say(f"onnx.checker: ok; onnxruntime {ort.__version__}: loads, matches numpy within {mismatch:.1e}")
    for name, (images, labels) in data.items():
        say(f"source on {name} ({len(images)}): {_summary(logits[name], labels)}")
    say(f"done in {time.perf_counter() - started:.1f} s")
    return {
        "model": model_path,
        "calibration": out / CALIB_FILE,
        "eval": out / EVAL_FILE,
        "params": params,
        "size_bytes": size,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=HERE, help=f"output folder (default: {HERE})")
    args = parser.parse_args(argv)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
