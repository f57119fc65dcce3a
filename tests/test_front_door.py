"""The front door: every flag's --help says what it does, the model's table is printed once a
command, and TFDS without a network fails in seconds with one line."""

import importlib
import os
import re
import socket
import subprocess
import sys
import time

import pytest

import experiments.sweep as sweep_cmd
from experiments import linear
from mnist_jax import cli, config, data, flags, models
from tests.conftest import ROOT
from tests.helpers import tfds_digits


def help_lines(capsys, monkeypatch, main, argv) -> dict:
    """{option: its help text} from `main(argv)`'s --help, unwrapped (COLUMNS: one line each)."""
    monkeypatch.setenv("COLUMNS", "1000")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    options, last = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):  # "  --flag METAVAR   its help", or the help on the next line
            invocation, *text = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            last = invocation.split(",")[-1].split()[0]
            options[last] = " ".join(text)
        elif last and line.startswith("   "):
            options[last] = (options[last] + " " + line.strip()).strip()
        else:
            last = None
    return options


@pytest.mark.parametrize("name", sweep_cmd.stages())
def test_every_config_flag_says_what_it_does_and_lists_its_choices(name, capsys, monkeypatch):
    """Every field of every stage's config (its flags), from the config itself."""
    stage = importlib.import_module(f"experiments.{name}")
    options = help_lines(capsys, monkeypatch, lambda argv: cli.run(stage.get_config, argv), [])
    choices = config.choices()
    for path, value in flags.leaves(stage.get_config()):
        if path == "name":
            continue
        text = options[config.flag_name(path)]
        assert not text.startswith("config "), f"{path}: generic help {text!r}"
        assert path in config.HELP and config.HELP[path] in text
        for choice in choices.get(path, ()):
            assert re.search(rf"\b{re.escape(str(choice))}\b", text), f"{path}: {choice} not listed"
    assert "MNIST_DATA_DIR" in options["--data-dir"]


def test_the_choices_listed_are_the_values_a_run_accepts():
    """--help lists config.choices(); each listed value trains, a value outside is refused."""
    model_of = {"model.name": None, "model.activation": "mlp", "model.padding": "conv"}
    for path, values in config.choices().items():
        for value in (*values, "bogus"):
            c = config.base()
            if path in model_of:
                name = model_of[path] or value
                fields = {} if model_of[path] is None else {path.split(".")[1]: value}
                check = lambda: models.build(name, **fields)  # noqa: E731
            else:
                c.update_from_flattened_dict({path: value})
                check = lambda: config.validate(c)  # noqa: E731
            if value == "bogus":
                with pytest.raises(config.ConfigError):
                    check()
            else:
                check()


COMMANDS = {  # every other command: (module, the arguments its --help needs before it)
    "mnist_jax.evaluate": [],
    "mnist_jax.plots": [],
    "mnist_jax.predict": [],
    "experiments.sweep": [],
    "experiments.seeds": [],
    "experiments.speedrun": [],
    "experiments.report": [],
    "experiments.autograd": [],
    "experiments.augment_cost": [],
    "experiments.profile_ops": [],
}


@pytest.mark.parametrize("module", COMMANDS)
def test_every_flag_of_the_other_commands_has_a_help_line(module, capsys, monkeypatch):
    main = importlib.import_module(module).main
    options = help_lines(capsys, monkeypatch, main, COMMANDS[module])
    assert options and all(options.values()), {k: v for k, v in options.items() if not v}
    if "--data-dir" in options:
        assert "MNIST_DATA_DIR" in options["--data-dir"]


SMALL = ["--epochs", "1", "--data-train-limit", "2000", "--plots", "false"]


def tables(out: str) -> int:
    """How many model tables (models.summary) `out` holds."""
    return out.count("Trainable parameters:")


@pytest.mark.parametrize("seeds", [1, 2])
def test_the_model_table_is_printed_once_and_not_for_a_finished_run(seeds, mnist_dir, tmp_path, capsys):  # fmt: skip
    """--seeds 2 --seed-mode turn: two runs in one command, one table; the same command again,
    with nothing left to train: none. Each work directory still has its summary.txt."""
    argv = [*SMALL, "--data-dir", str(mnist_dir), "--workdir", str(tmp_path), "--seeds", str(seeds),
            "--seed-mode", "turn"]  # fmt: skip
    capsys.readouterr()
    cli.run(linear.get_config, argv)
    first = capsys.readouterr().out
    assert tables(first) == 1, first
    dirs = [tmp_path] if seeds == 1 else [tmp_path / "seed_0", tmp_path / "seed_1"]
    assert all("Trainable parameters:" in (d / "summary.txt").read_text() for d in dirs)
    cli.run(linear.get_config, argv)
    again = capsys.readouterr().out
    assert tables(again) == 0 and "nothing left to train" in again, again


def test_a_sweep_prints_the_model_table_once(mnist_dir, tmp_path, capsys):
    workdir = tmp_path / "sweep"
    capsys.readouterr()
    sweep_cmd.main(["linear", "--space", "opt.lr=loguniform(1e-3,1e-1)", "--trials", "2",
                    "--workdir", str(workdir), "--data-dir", str(mnist_dir), "--data-val-split",
                    "500", *SMALL])  # fmt: skip
    out = capsys.readouterr().out
    assert "trial 0:" in out and "trial 1:" in out
    assert tables(out) == 1, out
    assert all((workdir / f"trial_{n}" / "summary.txt").exists() for n in (0, 1))


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_probe_says_why_a_host_is_unreachable_and_passes_a_reachable_one():
    port = closed_port()
    start = time.perf_counter()
    reason = data.unreachable(f"http://127.0.0.1:{port}/x", timeout=2)
    assert reason and reason.startswith(f"127.0.0.1:{port}: ") and time.perf_counter() - start < 3
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert data.unreachable(f"http://127.0.0.1:{server.getsockname()[1]}/x") is None


def tiny_tfds():
    """A TFDS dataset built here, from no download: 8 random digits a split."""
    import numpy as np

    def splits():
        draw = lambda seed: np.random.default_rng(seed).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)  # noqa: E731
        return {"train": (draw(0), np.arange(8)), "test": (draw(1), np.arange(8))}

    return tfds_digits.builder("TinyDigits", splits)


def tfds_data_dir(monkeypatch, path) -> None:
    """TFDS's default data directory, in this process: $TFDS_DATA_DIR is read at its import."""
    from tensorflow_datasets.core import constants

    monkeypatch.setattr(constants, "DATA_DIR", str(path))


def test_a_tfds_dataset_prepared_here_loads_without_a_probe(tmp_path, monkeypatch):
    builder = tiny_tfds()
    builder(data_dir=str(tmp_path)).download_and_prepare()
    tfds_data_dir(monkeypatch, tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("probed the network for a dataset prepared here")

    monkeypatch.setattr(data, "unreachable", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    ds = data.load_tfds("tiny_digits")
    assert ds.train_images.shape == (8, 28, 28, 1) and ds.source == "tfds tiny_digits"


def test_a_tfds_dataset_not_prepared_is_probed_and_fails_in_one_line(tmp_path, monkeypatch):
    tiny_tfds()  # registered, not prepared in this TFDS data directory
    tfds_data_dir(monkeypatch, tmp_path)
    probed = []
    monkeypatch.setattr(data, "unreachable", lambda url: probed.append(url) or "host:443: refused")
    with pytest.raises(data.DataError) as e:
        data.load_tfds("tiny_digits")
    message = str(e.value)
    assert probed == [data.TFDS_GCS]  # no files of its own to download: TFDS's copies' host
    assert "\n" not in message and "not prepared in" in message and "host:443: refused" in message
    assert "--data-dir" in message and "MNIST_DATA_DIR" in message


def test_a_stage_without_data_and_network_exits_2_with_one_line_in_seconds(tmp_path):
    """No --data-dir, no $MNIST_DATA_DIR, MNIST not prepared, no network (here: every request
    goes to a proxy that refuses, as requests and so TFDS would send it): one line, exit 2."""
    proxy = f"http://127.0.0.1:{closed_port()}"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("mnist_data_dir", "no_proxy")}
    env.update(TFDS_DATA_DIR=str(tmp_path / "tfds"), JAX_PLATFORMS="cpu")
    env.update({k: proxy for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")})
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "experiments.linear", "--workdir",
                           str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    seconds = time.perf_counter() - start
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: TFDS could not load 'mnist': it is not prepared in")
    assert "MNIST_DATA_DIR" in done.stderr and "--data-dir" in done.stderr
    assert seconds < 30, f"{seconds:.1f}s"
    assert not (tmp_path / "run").exists() and not (tmp_path / "tfds" / "mnist").exists()
