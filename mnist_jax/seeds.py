"""Several seeds of one stage in one command (`--seeds N`): each seed's result and their spread.

Seeds S..S+N-1 train in WORKDIR/seed_<s>/, each a complete run, vmapped together or in turn (`--seed-mode`: turn is
bit for bit `--seed s`); their summary goes to WORKDIR/seeds.json (design.md, Several seeds).
"""

import signal
import statistics
from pathlib import Path

import jax
import ml_collections

from mnist_jax import checkpoint, diagnostics, flags, loop, metrics, recipe, startup
from mnist_jax.config import validate


def workdirs(config: ml_collections.ConfigDict, workdir) -> list[Path]:
    """One seed: WORKDIR itself. Several: WORKDIR/seed_<s>/ each."""
    if config.seeds == 1:
        return [Path(workdir)]
    return [checkpoint.seed_dir(workdir, config.seed + i) for i in range(config.seeds)]


def result(run: loop.Run, dead_units: bool = False) -> dict:
    """A trained run's history and final test accuracy; with a validation split, its best epoch (chosen on validation)
    and the test accuracy there. dead_units: its ReLUs 0 on every test image (in the last evaluation)."""
    test = run.evaluation["test"]
    history = metrics.read(run.workdir / metrics.EPOCHS_FILE)
    final = history[-1]
    best = max(history, key=lambda h: h["val_accuracy"]) if "val_accuracy" in final else None
    return {
        "seed": run.config.seed,
        "workdir": str(run.workdir),
        "epochs": final["epoch"],
        "test_accuracy": final["test_accuracy"],
        "val_accuracy": final.get("val_accuracy"),
        "best_epoch": best and best["epoch"],  # chosen on validation, never on test
        "best_val_accuracy": best and best["val_accuracy"],
        "best_test_accuracy": best and best["test_accuracy"],
        "seconds": round(sum(h["seconds"] for h in history), 2),  # training, compile apart
        "compile_s": round(run.group.compile_s, 2),
        "collapsed_to": diagnostics.collapsed_to(test["predictions"]),
        "dead_units": diagnostics.dead_counts(test["alive"]) if dead_units else None,
        "history": history,
    }


def in_groups(members: list, together: bool) -> list[list]:
    """How a command's runs (seeds, a sweep's trials) train: in one vmapped program (loop.Group), or each alone."""
    return [members] if together else [[m] for m in members]


def summarize(results: list[dict]) -> dict:
    """Mean, std (0 for one seed), median, min and max of each accuracy the results hold."""
    out = {}
    for key in ("test_accuracy", "val_accuracy", "best_test_accuracy"):
        xs = [r[key] for r in results]
        if None in xs:
            continue
        out[key] = {
            "mean": statistics.mean(xs),
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "median": statistics.median(xs),
            "min": min(xs),
            "max": max(xs),
        }
    return out


def seed_line(r: dict) -> str:
    line = f"seed {r['seed']}: final test {r['test_accuracy']:.2%}"
    if r["best_epoch"] is not None:
        line += f"; best validation epoch {r['best_epoch']}: val {r['best_val_accuracy']:.2%}, test {r['best_test_accuracy']:.2%}"
    return line


@loop.one_summary()  # the model's table once, not once a seed
def train(config, workdir, *, runtime=None, dead_units=False, report=True, **parts) -> dict:
    """Train config.seeds seeds from config.seed: per-seed results and their summary, also in WORKDIR/seeds.json
    (several seeds, process 0); report=False: the caller prints its own lines. runtime: the command's (default:
    resolved here); parts (hooks, save, step_fn, eval_metrics) go to every group's loop.train."""
    if runtime is None:
        validate(config)
        runtime = startup.resolve(config)
    dirs = workdirs(config, workdir)
    if len(dirs) > 1:  # seeds.json's directory: one command at a time writes it
        recipe.lock_all([Path(workdir)])
    results, groups = [], in_groups(list(range(len(dirs))), runtime.seed_mode == "vmap")
    try:
        for k, group in enumerate(groups):
            members = [loop.with_values(config, {"seed": config.seed + i}) for i in group]
            where = f"seed {members[0].seed} ({group[0] + 1} of {len(dirs)})"
            if len(groups) > 1 and jax.process_index() == 0:
                print(f"{where}, in {dirs[group[0]]}", flush=True)
            try:
                trained = loop.train(config, [dirs[i] for i in group], runtime=runtime, members=members, **parts)
                if trained.signal is not None and k + 1 < len(groups):  # heard as it ended
                    raise loop.Interrupted(trained.signal, f"interrupted ({signal.Signals(trained.signal).name})")
            except loop.Interrupted as e:
                if len(groups) == 1:
                    raise
                raise loop.Interrupted(
                    e.exit_code - 128,
                    f"{str(e).split(';')[0]} of {where}; checkpoints saved in {workdir}/seed_*. Resume by "
                    f"running the same command again with --seeds {len(dirs)} --workdir {workdir}",
                ) from None
            results += [result(run, dead_units) for run in trained.runs]
    finally:
        if len(dirs) > 1:
            recipe.unlock(Path(workdir))
    how, seeds = runtime.seed_mode, [r["seed"] for r in results]
    summary = {"stage": config.name, "mode": how, "seeds": seeds, **summarize(results), "runs": results}
    if len(results) > 1 and jax.process_index() == 0:
        if report:
            together = " (the seeds together)" if how == "vmap" else ""
            for r in results:
                print(f"{seed_line(r)}, {r['seconds']:.1f}s{together}")
            print(summary_line(summary))
        flags.write_json(str(Path(workdir) / "seeds.json"), summary)
    return summary


def summary_line(summary: dict) -> str:
    f = summary["test_accuracy"]
    line = (
        f"{summary['stage']} over {len(summary['seeds'])} seeds ({summary['mode']}): final test "
        f"{f['median']:.2%} median, {f['mean']:.2%} +- {f['std']:.2%}, {f['min']:.2%} to {f['max']:.2%}"
    )
    if "best_test_accuracy" in summary:
        b = summary["best_test_accuracy"]
        line += f"; test at the best validation epoch {b['median']:.2%} median, {b['mean']:.2%} +- {b['std']:.2%}"
    return line
