"""Classify your own digit images: `python -m mnist_jax.predict --workdir DIR a.png [b.jpg ...]`.

Any size, colour or grayscale, dark-on-light or light-on-dark: each image is made to look like an
MNIST digit first (`to_mnist`): grayscale, light ink on a dark background, cropped to the ink,
scaled to fit 20x20 and centred by its centre of mass in 28x28.
"""

import sys
from pathlib import Path

import jax
import numpy as np
from PIL import Image, UnidentifiedImageError

from mnist_jax import checkpoint, data, flags
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


def load_image(path: str | Path) -> np.ndarray:
    """to_mnist of an image file; ValueError with a one-line reason if it is not one."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return to_mnist(image)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not an image") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__})") from None


def probabilities(restored: checkpoint.Restored, images: np.ndarray) -> np.ndarray:
    """Softmax probabilities [N, 10] for uint8 images [N, 28, 28, 1]."""
    logits = restored.model.apply(restored.variables, data.normalize(images), train=False)
    return np.asarray(jax.nn.softmax(logits))


def main(argv=None) -> int:
    parser = flags.Parser(prog="python -m mnist_jax.predict", description=__doc__.splitlines()[0])
    flags.add(parser, "workdir", "step")
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    args = parser.parse_args(argv)
    with flags.user_errors(FileNotFoundError, ConfigError):
        restored = checkpoint.restore(args.workdir, args.step)
    failed = 0
    for path in args.images:
        try:
            image = load_image(path)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        p = probabilities(restored, image[None])[0]
        print(f"{path}: {int(p.argmax())} ({p.max():.1%})")
    return flags.EXIT_USAGE if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
