"""Hostile inputs, one row each: bad flags, damaged or odd files, a full disk. Each ends in the
expected exit code with exactly the expected stderr lines (one, for a refusal: no traceback),
and a refusal leaves the work directory as it was. The next case found is a row here.

Commands run in-process (cli.run, evaluate.main, plots.main, predict.main) on copies of small
prepared runs: one linear run on MNIST, and linear runs on tiny 8x8 IDX data of 1, 2, 4 and 5
channels (the 1-channel one as --data-digits yes).
"""

import errno
import fcntl
import gc
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
from PIL import Image, ImageDraw

from experiments import conv_bn, linear
from mnist_jax import checkpoint, cli, evaluate, flags, metrics, plots, predict

TINY = ["--epochs", "1", "--plots", "false"]


def write_idx(path: Path, array: np.ndarray, shape=None) -> None:
    """An IDX file of unsigned bytes; `shape` overrides the header's dimensions."""
    shape = array.shape if shape is None else shape
    dims = b"".join(int(n).to_bytes(4, "big") for n in shape)
    path.write_bytes(bytes([0, 0, 8, len(shape)]) + dims + array.tobytes())


def tiny_data(directory: Path, shape=(8, 8, 1), n=(256, 64)) -> Path:
    """Random images of `shape` (a channel axis in the file only when there are several)."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    for split, count in zip(("train", "t10k"), n):
        images = rng.integers(0, 256, (count, *shape), np.uint8)
        images = images[..., 0] if shape[-1] == 1 else images
        write_idx(directory / f"{split}-images-idx3-ubyte", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, count, np.uint8))
    return directory


def png_header(path: Path, w: int, h: int) -> Path:
    """A PNG that says it is w x h (PIL checks the size when it opens it), with a token IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))  # fmt: skip

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))  # fmt: skip
    return path


def train(stage, argv) -> None:
    cli.run(stage.get_config, [str(a) for a in argv])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mnist_dir):
    """The runs and data directories the rows start from (copied per row when they change)."""
    root = tmp_path_factory.mktemp("hostile")
    p = {"mnist": mnist_dir}
    train(linear, ["--workdir", root / "run", "--data-train-limit", 1024, *TINY])
    p["base"] = root / "run"
    for c, name in ((1, "d8"), (2, "la"), (4, "rgba"), (5, "five")):
        d = tiny_data(root / f"data_{name}", (8, 8, c))
        p[f"data_{name}"] = d
        digits = ["--data-digits", "yes"] if c == 1 else []
        train(linear, ["--workdir", root / name, "--data-dir", d, *digits, *TINY])
        p[name] = root / name
    p["data_o28"] = tiny_data(root / "data_o28", (28, 28, 1))  # MNIST's shape, other images
    c12 = tiny_data(root / "data_c12", (28, 28, 1))  # labels up to 11
    write_idx(c12 / "t10k-labels-idx1-ubyte", np.arange(64, dtype=np.uint8) % 12)
    p["data_c12"] = c12
    unseen = tiny_data(root / "data_unseen", (8, 8, 1))  # class 9 only in the test set
    write_idx(unseen / "train-labels-idx1-ubyte", np.arange(256, dtype=np.uint8) % 9)
    write_idx(unseen / "t10k-labels-idx1-ubyte", np.arange(64, dtype=np.uint8) % 10)
    p["data_unseen"] = unseen
    zero = root / "data_zero"
    zero.mkdir()
    for split, count in (("train", 4), ("t10k", 4)):
        write_idx(zero / f"{split}-images-idx3-ubyte", np.zeros((count, 0, 0), np.uint8))
        write_idx(zero / f"{split}-labels-idx1-ubyte", np.zeros(count, np.uint8))
    p["data_zero"] = zero
    huge = shutil.copytree(p["data_d8"], root / "data_huge")  # header: 2^31 x 2^31 x 4 x 4
    write_idx(huge / "train-images-idx3-ubyte", np.zeros(0, np.uint8), (2**31, 2**31, 4, 4))
    p["data_huge"] = huge
    image = Image.new("L", (40, 40), 255)  # a dark 7 on white paper
    ImageDraw.Draw(image).line([(8, 8), (32, 8), (16, 34)], fill=0, width=4)
    image.save(root / "seven.png")
    p["seven"] = root / "seven.png"
    p["bomb"] = png_header(root / "bomb.png", 20000, 20000)
    return p


# Set-ups: each gets the row's context {"run": a copy of the prepared run, "tmp", ...}.
def nothing(ctx):
    pass


def read_only(rel: str):
    """The run's `rel` ("": the work directory) takes no new file: immutable (root ignores
    permissions), else mode 555."""

    def setup(ctx):
        path = ctx["run"] / rel
        if os.geteuid() != 0:
            path.chmod(0o555)
            ctx["undo"].append(lambda: path.chmod(0o755))
            return
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", path]).returncode:
            pytest.skip("no way to make a directory read-only for root here")
        ctx["undo"].append(lambda: subprocess.run(["chattr", "-i", path]))

    return setup


def replace_with(rel: str, kind: str, text: str = ""):
    """The run's `rel` replaced by a file (holding `text`) or a directory."""

    def setup(ctx):
        path = ctx["run"] / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        path.mkdir() if kind == "dir" else path.write_text(text)

    return setup


def flip(rel: str):
    """One bit of the run's checkpoint file `rel` flipped, in its middle."""

    def setup(ctx):
        path = ctx["run"] / "checkpoints" / "8" / rel
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        path.write_bytes(raw)

    return setup


def disk_full(target: str):
    """Saving checkpoint 16, or writing metrics.jsonl, fails for want of space (what Orbax's
    tensorstore raises; a Python write cut short raises with no file name)."""

    def setup(ctx):
        def save(mngr, state, saved, step, *rest):
            where = ctx["run"] / "checkpoints" / f"{step}.orbax-checkpoint-tmp" / "train" / "d"
            message = "Failed to write 320 bytes to file 11: No space left on device [os_error_code='28']"  # fmt: skip
            raise ValueError(f'RESOURCE_EXHAUSTED: Failed writing: "{where}/x": {message}')

        def append(path, row, real=metrics.append):
            if Path(path).name == "metrics.jsonl":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(path, row)

        if target == "checkpoint":
            ctx["monkeypatch"].setattr(checkpoint, "save", save)
        else:
            ctx["monkeypatch"].setattr(metrics, "append", append)

    return setup


def eval_json_disk_full(ctx):
    def write_atomic(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    ctx["monkeypatch"].setattr(flags, "write_atomic", write_atomic)


def no_cache_env(ctx):
    """--compile-cache counts only without $JAX_COMPILATION_CACHE_DIR (the suite sets one)."""
    ctx["monkeypatch"].delenv("JAX_COMPILATION_CACHE_DIR")
    (ctx["tmp"] / "afile").write_text("")


def run_of(name: str):
    """The row's run is the prepared `name` run (a copy)."""

    def setup(ctx):
        shutil.rmtree(ctx["run"])
        shutil.copytree(ctx[name], ctx["run"])

    return setup


def append_to(rel: str, text: str):
    """`text` appended to the run's `rel`: a write a kill cut short."""

    def setup(ctx):
        with open(ctx["run"] / rel, "a") as f:
            f.write(text)

    return setup


def remove(rel: str):
    def setup(ctx):
        (ctx["run"] / rel).unlink()

    return setup


def locked(ctx):
    """The run's directory held as a training process holds it (flock), until the row ends."""
    fd = os.open(ctx["run"], os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    ctx["undo"].append(lambda: os.close(fd))


def data_env(name: str):
    def setup(ctx):
        ctx["monkeypatch"].setenv("MNIST_DATA_DIR", str(ctx[name]))

    return setup


def both(*setups):
    def setup(ctx):
        for s in setups:
            s(ctx)

    return setup


class Row(NamedTuple):
    id: str
    setup: Callable
    command: str  # "linear" / "conv_bn" (training), "evaluate", "plots", "predict"
    argv: list  # str.format'ed with the context: {run}, {tmp}, {data_d8}, {seven}, ...
    code: int
    lines: list  # a substring of each stderr line, in order; [] for none
    unchanged: bool = True  # a refusal: the work directory's files as they were
    out: str = ""  # a substring of stdout


TRAIN = ["--workdir", "{run}", "--data-train-limit", "1024", "--plots", "false"]
MORE = [*TRAIN, "--epochs", "2"]  # resumes the prepared run for a second epoch
# One row a line: the table reads as a table.
# fmt: off
ROWS = [
    # 1. A model that leaves no pixels, and images of none: refused before anything is written.
    Row("model-no-pixels", nothing, "conv_bn", ["--workdir", "{tmp}/new", "--model-padding", "VALID", "--model-pool", "2,2,2", "--epochs", "1"], 2, ["layer 3's 6x6 convolution"]),
    Row("images-0x0", nothing, "linear", ["--workdir", "{tmp}/new", "--data-dir", "{data_zero}"], 2, ["images are 0x0x1: no pixels"]),
    # 2. Data of another shape than the run's; digits of another size; channels for predict.
    Row("digits-8x8-plots", run_of("d8"), "plots", ["--workdir", "{run}"], 0, [], False, "font_digits.png"),
    Row("digits-8x8-predict", run_of("d8"), "predict", ["--workdir", "{run}", "{seven}"], 0, [], out="seven.png: "),
    Row("evaluate-other-shape", nothing, "evaluate", ["--workdir", "{run}", "--data-dir", "{data_d8}"], 2, ["images are 8x8x1, the run was trained on 28x28x1: the shapes differ"]),
    Row("plots-other-shape", nothing, "plots", ["--workdir", "{run}", "--data-dir", "{data_d8}"], 2, ["the shapes differ"]),
    Row("evaluate-other-data", data_env("data_o28"), "evaluate", ["--workdir", "{run}"], 2, ["not the data the run trained on (idx "]),
    Row("evaluate-other-data-dir", nothing, "evaluate", ["--workdir", "{run}", "--data-dir", "{data_o28}"], 0, ["note: --data-dir "], False, "test accuracy"),
    Row("evaluate-more-classes", nothing, "evaluate", ["--workdir", "{run}", "--data-dir", "{data_c12}"], 2, ["test labels 10, 11 are in no training image", "12 classes, the run was trained on 10"]),
    Row("test-labels-unseen", nothing, "linear", ["--workdir", "{tmp}/new", "--data-dir", "{data_unseen}", *TINY], 0, ["test labels 9 are in no training image"], False),
    Row("predict-rgba-run", run_of("rgba"), "predict", ["--workdir", "{run}", "{seven}"], 0, [], out="seven.png: "),
    Row("predict-la-run", run_of("la"), "predict", ["--workdir", "{run}", "{seven}"], 0, [], out="seven.png: "),
    Row("predict-5-channel-run", run_of("five"), "predict", ["--workdir", "{run}", "{seven}"], 2, ["the run's images have 5 channels"]),
    # 3. The work directory's parts unwritable, or of the wrong kind.
    Row("checkpoints-read-only", read_only("checkpoints"), "linear", MORE, 2, ["checkpoints (Operation not permitted)" if os.geteuid() == 0 else "checkpoints (Permission denied)"]),
    Row("workdir-read-only", read_only(""), "linear", MORE, 2, ["cannot write in"]),
    Row("evaluate-workdir-read-only", read_only(""), "evaluate", ["--workdir", "{run}"], 2, ["cannot write in"]),
    Row("plots-is-a-file", replace_with("plots", "file"), "linear", MORE, 2, ["plots: is a file where a directory belongs"]),
    Row("plots-is-a-file-plots", replace_with("plots", "file"), "plots", ["--workdir", "{run}"], 2, ["plots: is a file where a directory belongs"]),
    Row("tensorboard-is-a-file", replace_with("tensorboard", "file"), "linear", MORE, 2, ["tensorboard: is a file where a directory belongs"]),
    Row("damaged-is-a-file", replace_with("damaged", "file"), "linear", MORE, 2, ["damaged: is a file where a directory belongs"]),
    Row("metrics-is-a-dir", replace_with("metrics.jsonl", "dir"), "linear", MORE, 2, ["metrics.jsonl: is a directory where a file belongs"]),
    Row("metrics-is-a-dir-plots", replace_with("metrics.jsonl", "dir"), "plots", ["--workdir", "{run}"], 2, ["metrics.jsonl: is a directory where a file belongs"]),
    Row("tensorboard-is-a-file-evaluate", replace_with("tensorboard", "file"), "evaluate", ["--workdir", "{run}"], 0, [], False, "test accuracy"),  # not its to read
    Row("config-json-list", replace_with("config.json", "file", "[]"), "linear", MORE, 2, ["config.json: not a run's config (a JSON list"]),
    Row("config-json-list-evaluate", replace_with("config.json", "file", "[]"), "evaluate", ["--workdir", "{run}"], 2, ["not a run's config"]),
    Row("config-json-dotted-key", replace_with("config.json", "file", '{"opt.lr": 0.1}'), "linear", MORE, 2, ["config.json: not a run's config (ConfigDict does not accept dots"]),
    Row("config-json-dir-predict", replace_with("config.json", "dir"), "predict", ["--workdir", "{run}", "{seven}"], 2, ["config.json: is a directory where a file belongs"]),
    # 4. Sizes past what fits: a decompression bomb among images, an IDX header of 2^66 bytes.
    Row("predict-bomb-png", nothing, "predict", ["--workdir", "{run}", "{bomb}", "{seven}"], 2, ["bomb.png: image too large"], out="seven.png: "),
    Row("idx-2^31-header", nothing, "linear", ["--workdir", "{tmp}/new", "--data-dir", "{data_huge}"], 2, ["header says 2147483648 items (73786976294838206484 bytes)"]),
    # 5. A full disk while training: one line, the last checkpoint kept.
    Row("disk-full-checkpoint", disk_full("checkpoint"), "linear", MORE, 2, ["checkpoints/16: no space left on device; the last checkpoint (step 8"], False),
    Row("disk-full-metrics", disk_full("metrics"), "linear", MORE, 2, ["(its metrics files): no space left on device; the last checkpoint (step 16"], False),
    Row("evaluate-disk-full", eval_json_disk_full, "evaluate", ["--workdir", "{run}"], 2, ["eval.json: cannot write (No space left on device)"], out="test accuracy"),
    # 6. A bit flipped in a checkpoint's array metadata: no leftover reads' tracebacks.
    Row("bitflip-evaluate", flip("model/array_metadatas/process_0"), "evaluate", ["--workdir", "{run}"], 2, ["damaged checkpoint (JSONDecodeError"]),
    Row("bitflip-train", flip("model/array_metadatas/process_0"), "linear", MORE, 2, ["is damaged (JSONDecodeError", "holds a run but no readable checkpoint"], False),
    # 8. What a second process, a kill or a hand did to the run's own files.
    Row("workdir-locked", locked, "linear", MORE, 2, [f"another run is training there (process {os.getpid()}: "]),
    Row("workdir-locked-restart", locked, "linear", [*MORE, "--restart"], 2, ["another run is training there"]),
    Row("workdir-locked-evaluate", locked, "evaluate", ["--workdir", "{run}"], 0, [], False, "test accuracy"),  # readers take no lock
    Row("metrics-item-emptied", replace_with("checkpoints/8/metrics/metrics", "file"), "linear", MORE, 2, ["is damaged (JSONDecodeError in its metrics item)", "holds a run but no readable checkpoint"], False),
    Row("metrics-item-emptied-evaluate", replace_with("checkpoints/8/metrics/metrics", "file"), "evaluate", ["--workdir", "{run}"], 2, ["damaged checkpoint (JSONDecodeError in its metrics item)"]),
    Row("metrics-line-cut", append_to("metrics.jsonl", '{"epoch": 2, "st'), "linear", MORE, 0, ["its last line is incomplete"], False, "Resumed"),
    Row("steps-line-cut", append_to("train_steps.jsonl", '{"step": 9'), "linear", MORE, 0, ["its last line is incomplete"], False, "Resumed"),
    Row("history-line-cut", append_to("config_history.jsonl", '{"step'), "linear", MORE, 0, ["its last line is incomplete"], False, "Resumed"),
    Row("config-json-gone-other-lr", remove("config.json"), "linear", [*MORE, "--opt-lr", "0.5"], 2, ["holds a run of another recipe", "--opt-lr: 0.01 in that run, 0.5 here", "To keep it"]),
    Row("config-json-gone-other-data", remove("config.json"), "linear", [*MORE, "--data-dir", "{data_o28}"], 2, ["holds a run of another recipe", "the data's num_test", "the data's num_train", "the data's sha256", "To keep it"]),
    Row("config-json-gone-same", remove("config.json"), "linear", MORE, 0, [], False, "is missing; the recipe is read from checkpoint 8"),
    # 7. Numbers no run can use, flags no argparse type can, a cache that cannot be written.
    Row("lr-inf", nothing, "linear", [*TRAIN, "--opt-lr", "inf"], 2, ["--opt-lr: must be a finite number, got inf"]),
    Row("lr-nan", nothing, "linear", [*TRAIN, "--opt-lr", "nan"], 2, ["--opt-lr: must be a finite number, got nan"]),
    Row("lr-negative", nothing, "linear", [*TRAIN, "--opt-lr=-1"], 2, ["--opt-lr: must be positive"]),
    Row("flag-double-dash", nothing, "linear", [*TRAIN, "--opt-lr=--"], 2, ["argument --opt-lr: invalid value"]),
    Row("compile-cache-unwritable", no_cache_env, "linear", [*TRAIN, "--compile-cache", "{tmp}/afile/cache"], 2, ["cannot write there (Not a directory)"]),
]
# fmt: on
STAGES = {"linear": linear, "conv_bn": conv_bn}
READERS = {"evaluate": evaluate.main, "plots": plots.main, "predict": predict.main}


def listing(path: Path):
    """Every file and directory under `path`, files with their mtimes (None: no `path`)."""
    if not path.exists():
        return None
    return sorted((str(p.relative_to(path)), p.is_file() and p.stat().st_mtime_ns) for p in path.rglob("*"))  # fmt: skip


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_hostile(row: Row, prepared, tmp_path, monkeypatch, capsys):
    ctx = {**prepared, "run": tmp_path / "run", "tmp": tmp_path, "undo": [], "monkeypatch": monkeypatch}  # fmt: skip
    shutil.copytree(prepared["base"], ctx["run"])
    try:
        row.setup(ctx)
        before = listing(ctx["run"]), listing(tmp_path / "new")
        argv = [a.format(**{k: v for k, v in ctx.items() if isinstance(v, Path)}) for a in row.argv]
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            if row.command in STAGES:
                cli.run(STAGES[row.command].get_config, argv)
                raise SystemExit(0)
            else:
                raise SystemExit(READERS[row.command](argv) or 0)
        gc.collect()  # the reads a failed restore left behind report now, if they do
        after = listing(ctx["run"]), listing(tmp_path / "new")
    finally:
        for undo in reversed(ctx["undo"]):
            undo()
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert e.value.code == row.code, err
    assert len(lines) == len(row.lines), err
    for line, expected in zip(lines, row.lines):
        assert expected in line, err
    assert row.out in out
    if row.unchanged:
        assert after == before
    if row.id.startswith("disk-full"):  # the newest checkpoint kept is a complete one
        newest = checkpoint.steps(ctx["run"])[0]
        assert (ctx["run"] / "checkpoints" / str(newest) / "commit_success.txt").exists()
