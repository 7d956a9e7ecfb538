"""Train the digits sample: a small CNN on scikit-learn's 8x8 digits, exported to ONNX.

Everything it needs ships with scikit-learn and PyTorch (CPU wheel), nothing is downloaded.
Writes, next to this script:

- ``model.onnx``  input ``x`` float32 [N, 1, 8, 8] (pixels scaled to 0..1), output
  ``logits`` float32 [N, 10]; the batch axis is dynamic, ``edgec build`` fixes it;
- ``model.pt2``   the same trained network as a ``torch.export`` program (dynamic batch);
- ``calib.npz``   200 training images under ``x``, for int8 calibration;
- ``eval.npz``    the held-out 30% under ``x`` with labels under ``y``.

Run:  python samples/digits/make_digits.py      (about 20 s on 2 cores)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).parent
SEED = 20261129


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.3, random_state=SEED, stratify=labels
    )
    return x_train, x_test, y_train, y_test


def train(x: np.ndarray, y: np.ndarray, epochs: int) -> DigitsCNN:
    torch.manual_seed(SEED)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        order = torch.randperm(len(xs))
        for start in range(0, len(xs), 64):
            idx = order[start : start + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            loss.backward()
            opt.step()
    return model.eval()


def export(model: DigitsCNN, path: Path) -> None:
    example = torch.zeros(1, 1, 8, 8)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )


def export_program(model: DigitsCNN, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.zeros(2, 1, 8, 8),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()

    x_train, x_test, y_train, y_test = load_split()
    model = train(x_train, y_train, args.epochs)
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    print(f"held-out accuracy: {accuracy * 100:.2f}% on {len(y_test)} images")
    if accuracy < 0.95:
        raise SystemExit("accuracy below 95%: not writing the sample")

    args.out.mkdir(parents=True, exist_ok=True)
    export(model, args.out / "model.onnx")
    export_program(model, args.out / "model.pt2")
    rng = np.random.default_rng(SEED)
    calib = x_train[rng.choice(len(x_train), size=200, replace=False)]
    np.savez_compressed(args.out / "calib.npz", x=calib)
    np.savez_compressed(args.out / "eval.npz", x=x_test, y=y_test)
    print(f"wrote model.onnx, model.pt2, calib.npz ({len(calib)}), eval.npz ({len(x_test)}) to {args.out}")


if __name__ == "__main__":
    main()
