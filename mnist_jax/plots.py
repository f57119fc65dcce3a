"""The codelab's figures, drawn from a work directory: `python -m mnist_jax.plots --workdir DIR`.

Everything comes from files (metrics.jsonl, train_steps.jsonl, the latest checkpoint), so the
plots can be redrawn for a finished or interrupted run. Writes WORKDIR/plots/:
  curves.png         loss and accuracy, train (sampled in the epoch) and test (per epoch),
                     with a zoomed 98-100% accuracy panel
  learning_rate.png  the learning-rate schedule over the epochs
  font_digits.png    digits 0-9 rendered from matplotlib's fonts, predictions under; a wrong
                     one in red beside the true digit, "7 (2)", as the codelab shows them
  test_digits.png    test digits with predictions, misrecognised first, marked the same way
  confusion.png      the confusion matrix on the test set
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from mnist_jax import checkpoint, data, evaluate, flags, metrics, predict  # noqa: E402
from mnist_jax.config import ConfigError  # noqa: E402

FONTS = [
    "DejaVu Sans",
    "DejaVu Serif",
    "DejaVu Sans Mono",
    "STIXGeneral",
    "cmr10",
    "cmss10",
    "cmtt10",
]
RED, GREEN = "#d62728", "#2ca02c"


def _name(workdir: Path) -> str:
    """The stage name from config.json (the directory name if there is none)."""
    try:
        return json.loads((workdir / "config.json").read_text())["name"]
    except (OSError, KeyError, ValueError):
        return workdir.name


def _epochs_axis(rows_steps, rows_epochs):
    steps_per_epoch = rows_epochs[0]["step"] / rows_epochs[0]["epoch"] if rows_epochs else 1
    return np.array([r["step"] for r in rows_steps]) / steps_per_epoch


def curves(workdir: Path, out: Path) -> None:
    epochs = metrics.read(workdir / metrics.EPOCHS_FILE)
    steps = metrics.read(workdir / metrics.STEPS_FILE)
    x_steps = _epochs_axis(steps, epochs)
    x_epochs = [r["epoch"] for r in epochs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title in (
        (axes[0], "loss", "loss"),
        (axes[1], "accuracy", "accuracy"),
        (axes[2], "accuracy", "accuracy, zoomed to 98-100%"),
    ):
        ax.plot(
            x_steps, [r[key] for r in steps], color="#1f77b4", alpha=0.6, label="train (sampled)"
        )
        ax.plot(x_epochs, [r[f"val_{key}"] for r in epochs], "o-", color="#ff7f0e", label="test")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[2].set_ylim(0.98, 1.0)
    axes[0].legend()
    fig.suptitle(f"{_name(workdir)}: training curves")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def learning_rate(workdir: Path, out: Path) -> None:
    epochs = metrics.read(workdir / metrics.EPOCHS_FILE)
    steps = metrics.read(workdir / metrics.STEPS_FILE)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(
        _epochs_axis(steps, epochs), [r["learning_rate"] for r in steps], drawstyle="steps-post"
    )
    ax.plot(
        [r["epoch"] for r in epochs],
        [r["learning_rate"] for r in epochs],
        "o",
        color="#ff7f0e",
        label="at the end of each epoch",
    )
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{_name(workdir)}: learning-rate schedule")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def render_digit(digit: int, font: str) -> np.ndarray:
    """The digit drawn with one of matplotlib's fonts, made MNIST-like: uint8 [28, 28, 1]."""
    path = font_manager.findfont(font_manager.FontProperties(family=font), fallback_to_default=True)
    image = Image.new("L", (160, 160), 255)
    ImageDraw.Draw(image).text(
        (80, 80), str(digit), fill=0, anchor="mm", font=ImageFont.truetype(path, 110)
    )
    return predict.to_mnist(image)


def font_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images [F*10, 28, 28, 1], true labels and font names of the rendered digits."""
    images = np.stack([render_digit(d, f) for f in FONTS for d in range(10)])
    return images, np.tile(np.arange(10), len(FONTS)), FONTS


def digit_titles(labels, predicted) -> list[tuple[str, str]]:
    """(text, colour) under each digit: the guess in black, or "guess (true)" in red."""
    return [
        (f"{p}", "black") if p == t else (f"{p} ({t})", RED)
        for t, p in zip(np.asarray(labels).tolist(), np.asarray(predicted).tolist())
    ]


def _digit_grid(images, labels, predicted, title, out, cols=10) -> None:
    """The digits in a grid, each with its digit_titles entry under it.

    One image and one axes: a hundred small axes took matplotlib seconds per figure."""
    rows = int(np.ceil(len(images) / cols))
    cell_w, cell_h = 34, 42  # pixels of the mosaic per digit: 28x28 and room for its text
    mosaic = np.zeros((rows * cell_h, cols * cell_w), np.float32)  # 0: white under gray_r
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        mosaic[r * cell_h + 1 : r * cell_h + 29, c * cell_w + 3 : c * cell_w + 31] = image[..., 0]
    fig = plt.figure(figsize=(cols * 1.0, rows * 1.2 + 0.5))
    ax = fig.add_axes((0, 0, 1, rows * 1.2 / (rows * 1.2 + 0.5)))
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=max(float(np.max(images)), 1.0))
    ax.axis("off")
    for i, (text, color) in enumerate(digit_titles(labels, predicted)):
        r, c = divmod(i, cols)
        ax.text(c * cell_w + 17, r * cell_h + 31, text, color=color, fontsize=12, ha="center",
                va="top")  # fmt: skip
    fig.suptitle(title)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def test_digit_order(predictions: np.ndarray, labels: np.ndarray, n: int = 100) -> np.ndarray:
    """Indices of the digits shown: misrecognised first (in test-set order), then correct ones."""
    wrong = np.flatnonzero(predictions != labels)
    right = np.flatnonzero(predictions == labels)
    return np.concatenate([wrong, right])[:n]


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """counts[true, predicted]"""
    return np.bincount(labels * 10 + predictions, minlength=100).reshape(10, 10)


def confusion(matrix: np.ndarray, title: str, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 6))
    ax.imshow(np.log1p(matrix), cmap="Blues")
    for (t, p), count in np.ndenumerate(matrix):
        ax.text(
            p,
            t,
            str(count),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if t == p else (RED if count else "#999999"),
        )
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def draw_all(workdir: str | Path, data_dir: str | None = None) -> list[Path]:
    """Draw the five figures into WORKDIR/plots/; returns their paths."""
    workdir = Path(workdir)
    restored = checkpoint.restore(workdir)  # first: a run it cannot restore is left untouched
    out = workdir / "plots"
    out.mkdir(exist_ok=True)
    paths = {
        name: out / f"{name}.png"
        for name in ("curves", "learning_rate", "font_digits", "test_digits", "confusion")
    }
    curves(workdir, paths["curves"])
    learning_rate(workdir, paths["learning_rate"])
    images, labels, _ = font_digits()
    predicted = predict.probabilities(restored, images).argmax(-1)
    _digit_grid(
        images,
        labels,
        predicted,
        f"Digits rendered from fonts: {int((predicted != labels).sum())} of {len(labels)} "
        "misrecognised, in red: guess (true digit)",
        paths["font_digits"],
    )

    test_x, test_y, out = evaluate.evaluate_restored(restored, data_dir)
    predictions = np.asarray(out["predictions"])
    errors = int((predictions != test_y).sum())
    shown = test_digit_order(predictions, test_y)
    _digit_grid(
        test_x[shown],
        test_y[shown],
        predictions[shown],
        f"Test digits: {errors} errors out of {len(test_y):,}; misrecognised first, in red: "
        "guess (true digit)",
        paths["test_digits"],
    )
    confusion(
        confusion_matrix(predictions, test_y),
        f"Confusion matrix, {errors} errors out of {len(test_y):,}",
        paths["confusion"],
    )
    return list(paths.values())


def main(argv=None):
    parser = flags.Parser(prog="python -m mnist_jax.plots", description=__doc__.splitlines()[0])
    flags.add(parser, "workdir", "data_dir")
    args = parser.parse_args(argv)
    with flags.user_errors(FileNotFoundError, ConfigError, data.DataError):
        paths = draw_all(args.workdir, args.data_dir)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
