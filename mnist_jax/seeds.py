"""Several seeds of one stage in one command (`--seeds N`): each seed's result and their spread.

Seeds S..S+N-1 train in WORKDIR/seed_<s>/, each a complete run that `mnist_jax.evaluate`,
`mnist_jax.restore` and the plots read as a single one. `--seed-mode`:
  vmap  one compiled program over the seeds (`jax.vmap` over initial weights, data order and
        dropout keys): on a GPU or TPU, N seeds cost about what one does;
  turn  one after another in this process: seed s is bit for bit `--seed s`;
  auto  vmap on GPU/TPU; on the CPU, vmap for the dense stages and turn for the convolutional
        ones. XLA:CPU turns a convolution vmapped over per-seed weights into a grouped one,
        4-5x slower than the seeds in turn (measured: docs/performance.md).
A vmapped seed trains the same weights, batches and dropout masks as `--seed s`; its floats may
differ in the last bits (a batched matmul rounds differently), and as any float change does, the
runs drift apart within the seed spread. The summary (mean, std, median, min and max of the
final test accuracy; with --data-val-split, also of the test accuracy at each seed's best
validation epoch) is printed and written to WORKDIR/seeds.json.
"""

import statistics
from pathlib import Path

import jax
import ml_collections

from mnist_jax import checkpoint, diagnostics, flags, loop, metrics, recipe, startup
from mnist_jax.hooks import StopAt


def workdirs(config: ml_collections.ConfigDict, workdir) -> list[Path]:
    """One seed: WORKDIR itself. Several: WORKDIR/seed_<s>/ each."""
    if config.seeds == 1:
        return [Path(workdir)]
    return [checkpoint.seed_dir(workdir, config.seed + i) for i in range(config.seeds)]


def result(run: loop.Run, i: int, dead_units: bool = False) -> dict:
    """Member i of a trained run: its history (from metrics.jsonl) and final test accuracy; with
    a validation split, also its best epoch, chosen on validation accuracy, and the test accuracy
    there. dead_units: also its ReLUs 0 on every test image (counted in the last evaluation)."""
    workdir, test = run.members.workdirs[i], run.evaluation["test"]
    history = metrics.read(workdir / metrics.EPOCHS_FILE)
    final = history[-1]
    best = max(history, key=lambda h: h["val_accuracy"]) if "val_accuracy" in final else None
    return {
        "seed": run.members.seeds[i],
        "workdir": str(workdir),
        "epochs": final["epoch"],
        "test_accuracy": final["test_accuracy"],
        "val_accuracy": final.get("val_accuracy"),
        "best_epoch": best and best["epoch"],  # chosen on validation, never on test
        "best_val_accuracy": best and best["val_accuracy"],
        "best_test_accuracy": best and best["test_accuracy"],
        "seconds": round(sum(h["seconds"] for h in history), 2),  # training, compile apart
        "compile_s": round(run.members.compile_s, 2),
        "collapsed_to": diagnostics.collapsed_to(test["predictions"][i]),
        "dead_units": diagnostics.dead_counts({k: v[i] for k, v in test["alive"].items()}) if dead_units else None,
        "history": history,
    }


def summarize(results: list[dict]) -> dict:
    """Mean, std (0 for one seed), median, min and max of the final test accuracy; with a
    validation split, also of the final validation accuracy and of the test accuracy at each
    seed's best validation epoch."""
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
def train(
    config: ml_collections.ConfigDict,
    workdir,
    *,
    save: bool = True,
    target: float | None = None,
    dead_units: bool = False,
    report: bool = True,
    hooks: tuple = (),
    step_fn=None,
    eval_metrics: dict | None = None,
) -> dict:
    """Train config.seeds seeds from config.seed (see the module's doc): per-seed results and
    their summary, also written to WORKDIR/seeds.json (several seeds, process 0); report=False:
    the caller prints its own lines. vmap: the seeds are one group of members (members.Members);
    turn: a group each, one after another. hooks, step_fn and eval_metrics go to every
    group's loop.train."""
    dirs, how = workdirs(config, workdir), startup.resolve(config).seed_mode
    if len(dirs) > 1:  # seeds.json's directory: one command at a time writes it
        recipe.lock_all([Path(workdir)])
    try:
        parts = dict(step_fn=step_fn, eval_metrics=eval_metrics)
        return _train(config, workdir, dirs, how, save, target, dead_units, report, hooks, parts)
    finally:
        recipe.unlock(Path(workdir))


def _train(config, workdir, dirs, how, save, target, dead_units, report, hooks, parts) -> dict:
    size = len(dirs) if how == "vmap" else 1
    extra = (*hooks, *([StopAt(target)] if target is not None else []))
    results = []
    for start in range(0, len(dirs), size):
        group, c = dirs[start : start + size], ml_collections.ConfigDict(config.to_dict())
        c.seed = config.seed + start
        if size < len(dirs) and jax.process_index() == 0:
            print(f"seed {c.seed} ({start + 1} of {len(dirs)}), in {group[0]}", flush=True)
        try:
            run = loop.train(c, group, vmap=how == "vmap", hooks=extra, save=save, **parts)
        except loop.Interrupted as e:
            if size == len(dirs):
                raise
            where = str(e).split(";")[0]  # "interrupted (SIGTERM) at step N"
            raise loop.Interrupted(
                e.exit_code - 128,
                f"{where} of seed {c.seed} ({start + 1} of {len(dirs)}); checkpoints saved in "
                f"{workdir}/seed_*. Resume by running the same command again with "
                f"--seeds {len(dirs)} --workdir {workdir}",
            ) from None
        results += [result(run, i, dead_units) for i in range(len(group))]
    summary = {"stage": config.name, "mode": how, "seeds": [r["seed"] for r in results]}
    summary.update(summarize(results))
    summary["runs"] = results
    if len(results) > 1 and jax.process_index() == 0:
        together = " (the seeds together)" if how == "vmap" else ""
        for r in results if report else []:
            print(f"{seed_line(r)}, {r['seconds']:.1f}s{together}")
        if report:
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
