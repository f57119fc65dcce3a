"""The codelab's figures, drawn from a work directory: `python -m mnist_jax.plots --workdir DIR`.

From the run's files alone (a finished or interrupted run), into WORKDIR/plots/: curves.png (loss,
accuracy; train, validation, test), learning_rate.png, font_digits.png (digit data only: rendered
digits, a wrong guess in red as "7 (2)"), test_digits.png (test_images.png for other data;
misrecognised first), confusion.png and, for a run that augments, augmented.png. A sweep's (draw_sweep): Optuna's own figures."""

import json
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files, never a window
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from mnist_jax import data, evaluate, flags, metrics, optim, predict, recipe, train  # noqa: E402
from mnist_jax.config import ConfigError  # noqa: E402

FONTS = ["DejaVu Sans", "DejaVu Serif", "DejaVu Sans Mono", "STIXGeneral", "cmr10", "cmss10", "cmtt10"]
RED, GREEN = "#d62728", "#2ca02c"


def _name(workdir: Path) -> str:
    """The stage name from config.json, else the directory's."""
    try:
        return json.loads((workdir / "config.json").read_text())["name"]
    except (OSError, KeyError, ValueError):
        return workdir.name


def _save(fig, out: Path, tight_layout: bool = True) -> None:
    if tight_layout:
        fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _epochs_axis(rows_steps, rows_epochs, steps_per_epoch=None):
    if steps_per_epoch is None:
        steps_per_epoch = rows_epochs[0]["step"] / rows_epochs[0]["epoch"] if rows_epochs else 1
    return np.array([r["step"] for r in rows_steps]) / steps_per_epoch


def curves(workdir: Path, out: Path, steps_per_epoch: int | None = None) -> None:
    """Loss and accuracy, train (sampled), validation and test (steps_per_epoch: while it trains)."""
    epochs, steps = metrics.read(workdir / metrics.EPOCHS_FILE), metrics.read(workdir / metrics.STEPS_FILE)
    x_steps = _epochs_axis(steps, epochs, steps_per_epoch)
    x_epochs = [r["epoch"] for r in epochs]
    splits = [("val", "validation", "#2ca02c"), ("test", "test", "#ff7f0e")]
    splits = [s for s in splits if epochs and f"{s[0]}_accuracy" in epochs[0]]
    best = max((r[f"{s}_accuracy"] for r in epochs for s, _, _ in splits), default=1.0)
    low = max(0.0, best - 0.02)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    zoomed = f"accuracy, zoomed to {low:.0%}-{min(1, best + 0.005):.1%}"
    for ax, key, title in zip(axes, ("loss", "accuracy", "accuracy"), ("loss", "accuracy", zoomed)):
        ax.plot(x_steps, [r[key] for r in steps], color="#1f77b4", alpha=0.6, label="train (sampled)")
        for split, label, color in splits:
            ax.plot(x_epochs, [r[f"{split}_{key}"] for r in epochs], "o-", color=color, label=label)
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[2].set_ylim(low, min(1.0, best + 0.005))
    axes[0].legend()
    fig.suptitle(f"{_name(workdir)}: training curves")
    _save(fig, out)


def schedule(config, steps_per_epoch: int, out: Path) -> None:
    """The config's learning-rate schedule, drawn before training (the codelab's plot_learning_rate)."""
    total = config.epochs * steps_per_epoch
    opt = config.opt
    shape = optim.shape(opt.schedule, opt.decay, opt.get("warmup", 0.0), steps_per_epoch, config.epochs)
    steps = np.arange(0, total, max(1, total // 2000))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps / steps_per_epoch, opt.lr * np.asarray(jax.vmap(shape)(steps)), drawstyle="steps-post")
    title = f"{config.name}: the learning-rate schedule ({opt.name}, {opt.schedule})"
    ax.set(yscale="log", xlabel="epoch", ylabel="learning rate", title=title)
    ax.grid(alpha=0.3, which="both")
    _save(fig, out)


def learning_rate_figure(steps: list[dict], epochs: list[dict], name: str):
    """learning_rate.png's figure from the rows of train_steps.jsonl and metrics.jsonl."""
    fig, ax = plt.subplots(figsize=(7, 4))
    # A row's rate is its last step's (metrics.LAST): "steps-pre" draws a drop at the epoch's end.
    ax.plot(_epochs_axis(steps, epochs), [r["learning_rate"] for r in steps], drawstyle="steps-pre")
    ends = [r["epoch"] for r in epochs], [r["learning_rate"] for r in epochs]
    ax.plot(*ends, "o", color="#ff7f0e", label="at the end of each epoch")
    ax.set(yscale="log", xlabel="epoch", ylabel="learning rate", title=f"{name}: learning-rate schedule")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


def render_digit(digit: int, font: str) -> np.ndarray:
    """The digit drawn with one of matplotlib's fonts, made MNIST-like: uint8 [28, 28, 1]."""
    path = font_manager.findfont(font_manager.FontProperties(family=font), fallback_to_default=True)
    image = Image.new("L", (160, 160), 255)
    ImageDraw.Draw(image).text((80, 80), str(digit), fill=0, anchor="mm", font=ImageFont.truetype(path, 110))
    return predict.to_mnist(image)


def digit_titles(labels, predicted, names=()) -> list[tuple[str, str]]:
    """(text, colour) under each image: the guess in black, or "guess (truth)" in red; by name if any."""
    name = lambda k: names[k] if names else str(k)  # noqa: E731
    return [
        (name(p), "black") if p == t else (f"{name(p)} ({name(t)})", RED)
        for t, p in zip(np.asarray(labels).tolist(), np.asarray(predicted).tolist())
    ]


def _digit_grid(images, labels, predicted, title, out, cols=10, names=()) -> None:
    """The images in a grid, digit_titles under each: one mosaic (100 small axes took seconds)."""
    rows = int(np.ceil(len(images) / cols))
    h, w, c = images.shape[1:]
    cell_w, cell_h = max(w + 6, 34), h + 14  # pixels of the mosaic per image, and its text
    colour = c == 3
    mosaic = np.zeros((rows * cell_h, cols * cell_w, 3) if colour else (rows * cell_h, cols * cell_w), np.float32)
    mosaic += 255.0 if colour else 0.0  # white paper: RGB as it is, gray under gray_r
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        y0, x0 = r * cell_h + 1, col * cell_w + (cell_w - w) // 2
        mosaic[y0 : y0 + h, x0 : x0 + w] = image if colour else image[..., 0]
    fig = plt.figure(figsize=(cols * cell_w / 34, rows * 1.2 * cell_h / 42 + 0.5))
    ax = fig.add_axes((0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    gray = {} if colour else dict(cmap="gray_r", vmin=0, vmax=max(float(np.max(images)), 1.0))
    ax.imshow(mosaic.astype(np.uint8) if colour else mosaic, **gray)
    ax.axis("off")
    for i, (text, color) in enumerate(digit_titles(labels, predicted, names)):
        r, col = divmod(i, cols)
        size = 12 if not names else 8
        ax.text(col * cell_w + cell_w / 2, r * cell_h + h + 3, text, color=color, fontsize=size, ha="center", va="top")
    fig.suptitle(title)
    _save(fig, out, tight_layout=False)


def test_digit_order(predictions: np.ndarray, labels: np.ndarray, n: int = 100) -> np.ndarray:
    """Indices of the images shown: misrecognised first (in test-set order), then correct ones."""
    return np.concatenate([np.flatnonzero(predictions != labels), np.flatnonzero(predictions == labels)])[:n]


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, classes: int = 10) -> np.ndarray:
    """counts[true, predicted]"""
    counts = np.bincount(labels * classes + predictions, minlength=classes * classes)
    return counts.reshape(classes, classes)


def confusion(matrix: np.ndarray, title: str, out: Path, names=()) -> None:
    n = len(matrix)
    fig, ax = plt.subplots(figsize=(max(6.5, 0.35 * n), max(6, 0.33 * n)))
    ax.imshow(np.log1p(matrix), cmap="Blues")
    for (t, p), count in np.ndenumerate(matrix):
        color = "white" if t == p else (RED if count else "#999999")
        ax.text(p, t, str(count), ha="center", va="center", fontsize=8 if n <= 20 else 5, color=color)
    labels = list(names) or [str(k) for k in range(n)]
    ax.set_xticks(range(n), labels, rotation=90 if names else 0)
    ax.set_yticks(range(n), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    _save(fig, out)


def draw_sweep(study, out: Path) -> list[Path]:
    """A sweep's figures, Optuna's own: history.png, importance.png (from 2 complete trials), params.png."""
    import optuna
    from optuna.visualization import matplotlib as figures

    out.mkdir(parents=True, exist_ok=True)
    complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    draw = {
        "history": lambda: figures.plot_optimization_history(study, target_name="validation accuracy"),
        "importance": lambda: figures.plot_param_importances(study),
        "params": lambda: figures.plot_slice(study, target_name="validation accuracy"),
    }
    paths = []
    with warnings.catch_warnings(), matplotlib.rc_context():  # Optuna's plt.style.use: for these only
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # matplotlib's, at one trial's equal limits
        for name, figure in draw.items():
            if not complete or (name == "importance" and complete < 2):
                continue
            fig = np.ravel(figure())[0].figure
            paths.append(out / f"{name}.png")
            fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
            plt.close(fig)
    return paths


def augmented(config, images, labels, out, n: int = 10) -> None:
    """Training images (top row) and an augmentation of each as the step draws them (below):
    the shift, then the warp (train.augment_batch), from a fixed key."""
    x = data.normalize(images[:n])
    y = train.augment_batch(x, jax.random.PRNGKey(0), 0, config.data.augment_shift, train.augmentation(config.data))
    both, labels = np.concatenate([x, y]) * 256, np.concatenate([labels[:n]] * 2)
    _digit_grid(both, labels, labels, "Training images (top) and their augmentation in the step (below)", out, cols=n)


def draw_all(workdir: str | Path, data_dir: str | None = None) -> list[Path]:
    """Draw the figures into WORKDIR/plots/; returns their paths."""
    workdir = Path(workdir).expanduser()
    restored = evaluate.restore(workdir)  # first: a run it cannot restore is left untouched
    config, info = restored.config, restored.config.get("dataset") or {}
    digits, names = info.get("digits", True), tuple(info.get("names") or ())
    test_x, test_y = evaluate.test_data(restored, data_dir)  # data that do not fit: refused, nothing drawn
    (workdir / "plots").mkdir(exist_ok=True)
    images_name = "test_digits" if digits else "test_images"
    drawn = ["curves", "learning_rate", *(["font_digits"] if digits else []), images_name, "confusion"]
    paths = {name: workdir / "plots" / f"{name}.png" for name in drawn}
    curves(workdir, paths["curves"])
    rows = metrics.read(workdir / metrics.STEPS_FILE), metrics.read(workdir / metrics.EPOCHS_FILE)
    _save(learning_rate_figure(*rows, _name(workdir)), paths["learning_rate"])
    shape, num_classes, _ = data.spec(config)
    if digits:  # rendered from fonts, made the data's shape (digits of another size: --data-digits yes)
        images = np.stack([predict.fit(render_digit(d, font), shape) for font in FONTS for d in range(10)])
        labels = np.tile(np.arange(10), len(FONTS))
        predicted = predict.probabilities(restored, images).argmax(-1)
        wrong = int((predicted != labels).sum())
        title = f"Digits rendered from fonts: {wrong} of {len(labels)} misrecognised, in red: guess (true digit)"
        _digit_grid(images, labels, predicted, title, paths["font_digits"])

    predictions = np.asarray(evaluate.evaluate_restored(restored, (test_x, test_y))["predictions"])
    errors = int((predictions != test_y).sum())
    shown = test_digit_order(predictions, test_y)
    title = f"Test {'digits' if digits else 'images'}: {errors} errors out of {len(test_y):,}; misrecognised first, in red: guess (truth)"
    _digit_grid(test_x[shown], test_y[shown], predictions[shown], title, paths[images_name], names=names)
    matrix = confusion_matrix(predictions, test_y, num_classes)
    confusion(matrix, f"Confusion matrix, {errors} errors out of {len(test_y):,}", paths["confusion"], names)
    if config.data.get("augment_shift") or train.augmentation(config.data):
        ds = data.load(data_dir) if data_dir else data.from_config(config.data)
        paths["augmented"] = workdir / "plots" / "augmented.png"
        augmented(config, ds.train_images, ds.train_labels, paths["augmented"])
    return list(paths.values())


def main(argv=None):
    parser = flags.Parser(prog="python -m mnist_jax.plots", description=__doc__.splitlines()[0])
    flags.add(parser, "workdir", "data_dir")
    args = parser.parse_args(argv)
    with flags.user_errors(FileNotFoundError, ConfigError, data.DataError):
        uses = ("checkpoints", "plots", "metrics.jsonl", "train_steps.jsonl")
        recipe.check_workdir(args.workdir, writes=("", "plots"), uses=uses)
        paths = draw_all(args.workdir, args.data_dir)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
