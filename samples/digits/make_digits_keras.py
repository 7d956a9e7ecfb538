"""Train the Keras form of the digits sample (same data split and architecture, NHWC).

Writes to ``samples/digits/keras/``: ``model.keras`` (input ``x`` float32 [N, 8, 8, 1],
output ``logits`` [N, 10]), ``calib.npz`` and ``eval.npz`` (the same samples as the ONNX
sample's, channels-last, keyed ``x``; eval has labels under ``y``).

Run:  python samples/digits/make_digits_keras.py      (about 30 s on 2 cores)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from make_digits import SEED, load_split  # the script folder is on sys.path

HERE = Path(__file__).parent


def build_model():  # type: ignore[no-untyped-def]
    import keras

    inputs = keras.Input((8, 8, 1), name="x")
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(64, activation="relu")(h)
    outputs = keras.layers.Dense(10, name="logits")(h)
    return keras.Model(inputs, outputs, name="digits")


def main() -> None:
    import keras

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "keras")
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()

    keras.utils.set_random_seed(SEED % 2**31)
    x_train, x_test, y_train, y_test = load_split()
    x_train, x_test = x_train.transpose(0, 2, 3, 1), x_test.transpose(0, 2, 3, 1)
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=64, epochs=args.epochs, verbose=0)
    accuracy = float(np.mean(model.predict(x_test, verbose=0).argmax(1) == y_test))
    print(f"held-out accuracy: {accuracy * 100:.2f}% on {len(y_test)} images")
    if accuracy < 0.95:
        raise SystemExit("accuracy below 95%: not writing the sample")

    args.out.mkdir(parents=True, exist_ok=True)
    model.save(args.out / "model.keras")
    rng = np.random.default_rng(SEED)
    calib = x_train[rng.choice(len(x_train), size=200, replace=False)]
    np.savez_compressed(args.out / "calib.npz", x=calib)
    np.savez_compressed(args.out / "eval.npz", x=x_test, y=y_test)
    print(f"wrote model.keras, calib.npz ({len(calib)}), eval.npz ({len(x_test)}) to {args.out}")


if __name__ == "__main__":
    main()
