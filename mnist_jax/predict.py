"""Classify your own images: `python -m mnist_jax.predict --workdir DIR a.png [b.jpg ...]`.

Any size, colour or grayscale. Each image is made to look like the run's data first: for a
digit dataset, like an MNIST digit (`to_mnist`: grayscale, light ink on a dark background,
cropped to the ink, scaled to fit 20x20 and centred by its centre of mass in 28x28); for any
other, resized to the data's height and width, in colour or grayscale as they are.
"""

import sys
from pathlib import Path

import jax
import numpy as np
from PIL import Image, UnidentifiedImageError

from mnist_jax import checkpoint, data, evaluate, flags, recipe
from mnist_jax.config import ConfigError


def to_mnist(image: Image.Image) -> np.ndarray:
    """uint8 [28, 28, 1] in MNIST's style from any PIL image."""
    if image.mode in ("RGBA", "LA", "P"):  # transparent parts count as white paper
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    g = np.asarray(image.convert("L"), np.float32)
    border = np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])
    if np.median(border) > 127:  # dark ink on light paper: MNIST is the other way round
        g, border = 255 - g, 255 - border
    g = np.clip(g - np.median(border), 0, None)  # background to 0
    if g.max() <= 0:
        return np.zeros((28, 28, 1), np.uint8)
    g = g * (255 / g.max())
    rows, cols = np.nonzero(g > 0.2 * 255)
    g = g[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = g.shape
    scale = 20 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    digit = np.asarray(Image.fromarray(g.astype(np.uint8)).resize(size, Image.LANCZOS), np.float32)
    canvas = np.zeros((28, 28), np.float32)
    ys, xs = np.indices(digit.shape)
    cy, cx = (ys * digit).sum() / digit.sum(), (xs * digit).sum() / digit.sum()
    top = int(np.clip(round(14 - cy), 0, 28 - digit.shape[0]))
    left = int(np.clip(round(14 - cx), 0, 28 - digit.shape[1]))
    canvas[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return np.clip(canvas, 0, 255).astype(np.uint8)[..., None]


MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # the image's channels a run's data can have


def mode_for(image_shape) -> str:
    """The PIL mode of images shaped like the data; ValueError for other channel counts."""
    c = image_shape[-1]
    if c not in MODES:
        raise ValueError(
            f"the run's images have {c} channels; only 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA) can be made from an image file"
        )
    return MODES[c]


def fit(digit: np.ndarray, image_shape) -> np.ndarray:
    """A to_mnist digit [28, 28, 1] made [H, W, C] like the run's images (digits of another
    size, --data-digits yes): scaled to H x W, the gray repeated into the colours (opaque)."""
    h, w, _ = image_shape
    if tuple(image_shape) == (28, 28, 1):
        return digit
    image = Image.fromarray(digit[..., 0]).resize((w, h), Image.LANCZOS)
    return np.asarray(image.convert(mode_for(image_shape)), np.uint8).reshape(image_shape)


def load_image(path: str | Path, image_shape=(28, 28, 1), digits: bool = True) -> np.ndarray:
    """uint8 [H, W, C] like the run's images: to_mnist for digits (then `fit`), else resized to
    H x W in the data's mode; ValueError with a one-line reason if the file is not an image."""
    path, (h, w, c) = Path(path), image_shape
    try:
        with Image.open(path) as image:
            image.load()
            if digits:
                return fit(to_mnist(image), image_shape)
            resized = image.convert(mode_for(image_shape)).resize((w, h), Image.BILINEAR)
            return np.asarray(resized, np.uint8).reshape(h, w, c)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not an image") from None
    except Image.DecompressionBombError as e:  # PIL's guard against huge images
        raise ValueError(f"{path}: image too large to read ({e})") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__})") from None


def probabilities(restored: checkpoint.Restored, images: np.ndarray) -> np.ndarray:
    """Softmax probabilities [N, classes] for uint8 images [N, H, W, C]."""
    logits = restored.model.apply(restored.variables, data.normalize(images), train=False)
    return np.asarray(jax.nn.softmax(logits))


def main(argv=None) -> int:
    parser = flags.Parser(prog="python -m mnist_jax.predict", description=__doc__.splitlines()[0])
    flags.add(parser, "workdir", "step")
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    args = parser.parse_args(argv)
    with flags.user_errors(FileNotFoundError, ConfigError):
        recipe.check_workdir(args.workdir, writes=(), uses=("checkpoints",))  # reads only
        restored = evaluate.restore(args.workdir, args.step)
    if restored.config.opt.get("ema"):
        print(f"note: {restored.weights}", file=sys.stderr)
    info = restored.config.get("dataset") or {}
    shape, names = data.spec(restored.config)[0], info.get("names") or []
    with flags.user_errors(ValueError):  # a channel count no image file gives: refused once
        mode_for(shape)
    failed = 0
    for path in args.images:
        try:
            image = load_image(path, shape, info.get("digits", True))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        p = probabilities(restored, image[None])[0]
        label = int(p.argmax())
        print(f"{path}: {names[label] if names else label} ({p.max():.1%})")
    return flags.EXIT_USAGE if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
