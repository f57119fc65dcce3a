"""Classifying the user's own images: MNIST-style preprocessing, the command, bad files."""

import numpy as np
from PIL import Image

from mnist_jax import checkpoint, plots, predict


def test_a_test_digit_saved_as_png_round_trips(trained_conv_bn, mnist, tmp_path):
    workdir, _ = trained_conv_bn
    restored = checkpoint.restore(workdir)
    direct = predict.probabilities(restored, mnist.test_images[:20]).argmax(-1)
    for i in range(20):
        digit = mnist.test_images[i, ..., 0]
        # As a user would have it: dark ink on white, bigger, in colour.
        path = tmp_path / f"{i}.png"
        Image.fromarray(255 - digit).resize((112, 112), Image.BICUBIC).convert("RGB").save(path)
        image = predict.load_image(path)
        assert predict.probabilities(restored, image[None]).argmax() == direct[i]
    # Seeds 0-5 of the fixture's recipe get 19 or 20 of these 20 right (conftest.trained_conv_bn;
    # the full epoch's seeds 0-9, 18-20); the bar leaves two more errors than the worst of them.
    assert (direct == mnist.test_labels[:20]).sum() >= 17


def test_to_mnist_centres_and_scales_like_mnist(mnist):
    light_on_dark = Image.new("L", (300, 200), 0)
    light_on_dark.paste(255, (200, 20, 240, 180))  # a tall bar near the right edge
    x = predict.to_mnist(light_on_dark)[..., 0].astype(float)
    rows, cols = np.nonzero(x > 50)
    assert rows.max() - rows.min() + 1 in (20, 21)  # longest side fits 20 pixels
    ys, xs = np.indices(x.shape)
    assert abs((ys * x).sum() / x.sum() - 14) < 1 and abs((xs * x).sum() / x.sum() - 14) < 1
    dark_on_light = Image.fromarray(255 - np.asarray(light_on_dark))
    np.testing.assert_array_equal(predict.to_mnist(dark_on_light)[..., 0], x.astype(np.uint8))


def test_rendered_font_digits_are_recognised(trained_conv_bn):
    workdir, _ = trained_conv_bn
    restored = checkpoint.restore(workdir)
    images = np.stack([plots.render_digit(d, "DejaVu Sans") for d in range(10)])
    predicted = predict.probabilities(restored, images).argmax(-1)
    # Seeds 0-5 of the fixture's recipe read 9 or 10 of these 10 (as the full epoch's 0-9 did):
    # one spare.
    assert (predicted == np.arange(10)).sum() >= 8, predicted


def test_command_classifies_images_and_reports_bad_files(trained_conv_bn, mnist, tmp_path, capsys):
    workdir, _ = trained_conv_bn
    good = tmp_path / "seven.png"
    Image.fromarray(mnist.test_images[0, ..., 0]).save(good)  # test image 0 is a 7
    # What the library says of that file (one epoch's model may read another digit there).
    image = predict.load_image(good)[None]
    expected = predict.probabilities(checkpoint.restore(workdir), image).argmax()
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    capsys.readouterr()
    code = predict.main(["--workdir", str(workdir), str(bad), str(good)])  # its exit status
    out = capsys.readouterr()
    assert code == 2
    assert out.err.strip() == f"error: {bad}: not a readable image (UnidentifiedImageError)"
    assert out.out.startswith(f"{good}: {expected} (")
