"""Hyperparameter sweep of a stage on Optuna, chosen on a validation split (mnist_jax/sweep.py).

  python -m experiments.sweep conv_bn --trials 20 --epochs 2          # the stage's get_sweep()
  python -m experiments.sweep dense_relu --space 'opt.lr=loguniform(1e-4,1e-1)' --trials 10

The stage's own flags fix every trial's config (--epochs 2, --data-val-split 5000, ...). Each
trial is a run in WORKDIR/trial_<n>/ (default WORKDIR: runs/sweep_<stage>); the table is
printed and written to WORKDIR/sweep.json, the plots to WORKDIR/plots/. Another study in the
same WORKDIR (--study NAME) has all three in WORKDIR/NAME/. Running the same command again
continues the study.
"""

import argparse
import importlib
import pkgutil
import shutil
from pathlib import Path

import jax

import experiments
from mnist_jax import flags, loop, recipe, startup
from mnist_jax import sweep as sweep_lib
from mnist_jax.config import ConfigError
from mnist_jax.data import DataError

EPILOG = """\
Many processes, one study: run this command, with the same --storage and --study, in every
process, on one machine or many. SQLite (the default, WORKDIR/study.db) is for one machine; on
many, an RDB URL every machine reaches (--storage postgresql://user:pass@host/db), a study
server in front of it for many workers (python -m experiments.study_server; --storage
grpc://HOST:PORT), or a journal file on a shared filesystem (--storage journal:/shared/study.log).
Each process records a heartbeat for its trials: a trial without one for 2 x --heartbeat seconds
is failed and run again from its checkpoint. --trials counts the study's trials over all processes. The stage's
flags (python -m experiments.STAGE --help) fix every trial: --epochs 2 --data-val-split 5000
(default: a tenth of the training images, at most 5,000).

Exit status: 0 when the study has its trials; 2 for a bad flag, space, storage or data (before
the study records anything); 5 when every trial failed (each one's error in sweep.json); 128 +
the signal when interrupted (run the same command to continue).
"""


def stages() -> list[str]:
    skip = {
        "sweep",
        "seeds",
        "report",
        "rows",
        "benchmark",
        "speedrun",
        "references",
        "xla_cpu",
        "profile_ops",
        "augment_cost",
        "timing",
        "study_server",
    }
    names = [m.name for m in pkgutil.iter_modules(experiments.__path__)]
    return sorted(n for n in names if n not in skip and not n.startswith("autograd"))


def parser() -> argparse.ArgumentParser:
    p = flags.Parser(prog="python -m experiments.sweep", description=__doc__.splitlines()[0],
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("stage", help=f"one of {', '.join(stages())}")
    p.add_argument("--space", action="append", default=[],
                   help=f"a parameter, repeatable: {sweep_lib.SYNTAX} (default: the stage's get_sweep())")  # fmt: skip
    p.add_argument("--trials", type=int, default=20, help="the study's trials in all (default %(default)s)")  # fmt: skip
    p.add_argument("--trial-seeds", type=int, default=1, help="seeds per trial; its score is their median (default %(default)s)")  # fmt: skip
    p.add_argument("--batch-trials", type=int, default=0,
                   help="trials trained together, vmapped, when the space changes only numbers that are data "
                        "(lr, weight decay, label smoothing); 0: 4 on GPU/TPU, 1 on the CPU")  # fmt: skip
    p.add_argument("--storage", default="",
                   help="where the study lives: '' (WORKDIR/study.db), an RDB URL, grpc://HOST:PORT or journal:PATH")  # fmt: skip
    p.add_argument("--study", default="", help="the study's name (default: the stage's); another one keeps its trials, table and plots in WORKDIR/NAME/")  # fmt: skip
    p.add_argument("--sampler", choices=("tpe", "random"), default="tpe",
                   help="how Optuna picks the next trial's values: tpe (learns from the trials so far) or random (default %(default)s)")  # fmt: skip
    p.add_argument("--pruner", choices=("median", "none"), default="median",
                   help="stop a trial early: median (below the median of earlier trials at the same epoch) or none (default %(default)s)")  # fmt: skip
    p.add_argument("--pruner-warmup", type=int, default=0,
                   help="epochs the median pruner lets every trial train before it judges one (default %(default)s: from the first)")  # fmt: skip
    p.add_argument("--heartbeat", type=int, default=30, help="seconds between heartbeats (default %(default)s)")  # fmt: skip
    return p


def batch_size(given: int, space: dict, config) -> int:
    if given > 1 and not sweep_lib.batchable(space):
        raise ConfigError(f"--batch-trials {given}: trials train together only when the space changes numbers that are data (lr, weight decay, label smoothing); this one changes {', '.join(space)}")  # fmt: skip
    if given:
        return given
    # On the 2-core CPU, 8 dense_relu trials 4 at a time took 0.96x the time of one at a time
    # (whole process): not worth TPE's suggesting 4 before learning from any of them.
    return 4 if sweep_lib.batchable(space) and jax.default_backend() != "cpu" else 1


def main(argv=None) -> dict:
    args, rest = parser().parse_known_args(argv)
    p = parser()
    if args.stage not in stages():
        p.error(f"unknown stage {args.stage!r}; one of {', '.join(stages())}")
    module = importlib.import_module(f"experiments.{args.stage}")
    config = module.get_config()
    config.name = args.stage
    config = flags.parse_config(config, rest, prog=f"{p.prog} {args.stage}")
    workdir = Path(config.workdir or f"runs/sweep_{args.stage}")
    config.workdir = str(workdir)
    config.plots, plots = False, config.plots  # the sweep's plots, not each trial's
    say = print
    with flags.user_errors(ConfigError, DataError):
        if args.pruner_warmup < 0:
            raise ConfigError(f"--pruner-warmup: must be 0 or more epochs, got {args.pruner_warmup}")
        for flag in ("trials", "trial_seeds", "heartbeat"):
            if getattr(args, flag) < 1:
                raise ConfigError(f"--{flag.replace('_', '-')}: must be at least 1, got {getattr(args, flag)}")  # fmt: skip
        if args.batch_trials < 0:
            raise ConfigError(f"--batch-trials: must be 0 (auto) or positive, got {args.batch_trials}")  # fmt: skip
        recipe.check_workdir(workdir, writes=("",), uses=())  # a file there: one line
        startup.start(config)  # validates the config: once, here
        note = sweep_lib.check_config(config)
        specs = args.space or list(getattr(module, "get_sweep", lambda: [])())
        if not specs:
            raise ConfigError(f"--space: the stage {args.stage} declares no sweep (get_sweep); give --space {sweep_lib.SYNTAX.split(',')[0]}")  # fmt: skip
        space = sweep_lib.parse_space(specs, config)
        batch = batch_size(args.batch_trials, space, config)
        created = not workdir.exists()
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file on the way there, a directory we cannot write in
            raise ConfigError(f"--workdir {workdir}: cannot create ({e.strerror})") from None
        try:
            study = sweep_lib.open_study(args.storage, args.study or args.stage, workdir, args.heartbeat,
                                         args.sampler, args.pruner, space, config, warmup=args.pruner_warmup)  # fmt: skip
        except ConfigError:
            if created and not any(workdir.iterdir()):
                shutil.rmtree(workdir)  # a bad storage writes nothing
            raise
        if note:  # said once the study opened: a refusal is its one line
            say(note)
        home = sweep_lib.home(study, workdir)
        recipe.check_workdir(home, writes=("",), uses=())
        say(f"study {study.study_name}: {len(space)} parameters, {args.trials} trials, {batch} at a time, in {home}; {sweep_lib.shown(args.storage) if args.storage else workdir / 'study.db'}")  # fmt: skip
        try:
            sweep_lib.optimize(study, space, config, home, args.trials, args.trial_seeds, batch,
                               args.heartbeat, say=say, runtime=startup.resolve(config, args.trial_seeds))  # fmt: skip
        except loop.Interrupted as e:
            flags.fail(f"{str(e).split(';')[0]}; the study keeps its trials and the interrupted ones are queued again: run the same command to continue", e.exit_code)  # fmt: skip
        except KeyboardInterrupt:  # between two trials, or a second Ctrl-C
            flags.fail("interrupted; the study keeps its trials: run the same command to continue", 130)  # fmt: skip
        out = sweep_lib.summarize(study, space, home, plots, say)
    states = [r["state"] for r in out["trials"]]
    if "failed" in states and set(states) <= {"failed", "re-queued"}:
        first = next(r for r in out["trials"] if r["state"] == "failed")
        reason = (first["error"] or "").splitlines()[0] if first["error"] else "no error recorded"
        flags.fail(f"every trial failed ({states.count('failed')}; trial {first['trial']}: {reason}); the table is in {home / 'sweep.json'}", flags.EXIT_TRIALS_FAILED)  # fmt: skip
    return out


if __name__ == "__main__":
    main()
