"""A work directory's run against the command that starts it again: same recipe, or refused.
`check` and `find_checkpoint` read (every process), then `prepare` acts (process 0; docs/design.md)."""

import datetime
import errno
import fcntl
import json
import os
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import ml_collections
import orbax.checkpoint as ocp

from mnist_jax import checkpoint, flags, metrics, models, parallel
from mnist_jax import config as config_lib
from mnist_jax.config import ARITHMETIC, FIELD_CLASSES, LENGTH, RECIPE, ConfigError, flag_name

HISTORY = "config_history.jsonl"
PATHS = {"init_from"}  # recipe fields that name a directory: compared as the directories they name


class Plan(NamedTuple):
    """What `check` found, for `prepare` to act on."""

    step: int | None  # the newest checkpoint that fits; None: nothing to resume
    damaged: list[tuple[int, str]]  # (step, reason) of checkpoints to move aside
    changed: dict[str, list]  # {field: [before, now]}: allowed changes since the last start
    runtime: dict  # where this start runs: devices, processes, platform, jax version
    init: dict | None = None  # --init-from: {"dir", "step"} the weights came from


def _flat(tree) -> dict:
    """{dotted path: value} of a config or its JSON, tuples as lists (as in config.json)."""
    return {p: json.loads(json.dumps(v)) for p, v in flags.leaves(ml_collections.ConfigDict(tree))}


def _default(path: str, tree: dict):
    """A field a config.json lacks: its default (base's or the model's), not to lock out older runs."""
    section, _, key = path.partition(".")
    if section == "model":
        name = tree.get("model", {}).get("name")
        value = models.fields(name).get(key) if name in models.MODELS else None
    else:
        value = _flat(config_lib.base()).get(path)
    return json.loads(json.dumps(value))


def _label(path: str) -> str:
    section, _, key = path.partition(".")
    if section == "dataset":
        return f"the data's {key} (--data-dir)"
    if section == "runtime":  # what ran: the count of devices, a flag's "auto" resolved
        return flag_name(key) if key in FIELD_CLASSES else f"the {key} in use"
    return flag_name(path)


def _show(value) -> str:
    """A value as its flag takes it: 12,24,32 for a tuple; a sha256 by its first 12 digits."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, str):
        return value[:12] if len(value) == 64 else value or '""'
    return json.dumps(value)


def compare(old: dict, new: ml_collections.ConfigDict) -> tuple[list[str], dict]:
    """(a line per recipe field that differs, {field: [before, now]} of allowed changes)."""
    now_tree = new.to_dict()
    was_flat, now_flat = _flat(old), _flat(now_tree)
    spans = now_flat.get("opt.schedule") in config_lib.SPANNING_SCHEDULES
    other_model = was_flat.get("model.name") != now_flat.get("model.name")
    refused, changed = [], {}
    for path in sorted(was_flat.keys() | now_flat.keys()):
        if path not in now_flat and path not in FIELD_CLASSES:
            continue  # a field this code no longer has
        if other_model and path.startswith("model.") and path != "model.name":
            continue  # the model's name says it
        was = was_flat[path] if path in was_flat else _default(path, old)
        now = now_flat[path] if path in now_flat else _default(path, now_tree)
        if path in PATHS and was and now:  # runs/x/, ./runs/x and ~/runs/x: one directory
            was, now = (os.path.realpath(os.path.expanduser(p)) for p in (was, now))
        if was == now:
            continue
        # a run from before the data were recorded; a field with no class yet counts as recipe
        kind = config_lib.NEITHER if path.startswith("dataset.") and was is None else FIELD_CLASSES.get(path, RECIPE)
        if kind == RECIPE or (kind == LENGTH and spans):
            why = f" (--opt-schedule {now_flat['opt.schedule']} spans the whole run)" if kind == LENGTH else ""
            refused.append(f"  {_label(path)}: {_show(was)} in that run, {_show(now)} here{why}")
        else:
            changed[path] = [was, now]
    return refused, changed


def move_aside(workdir: Path, step: int, reason: str) -> None:
    """Move a damaged checkpoint out of checkpoints/ (which Orbax scans), to WORKDIR/damaged/."""
    source = workdir / "checkpoints" / str(step)
    target, n = workdir / checkpoint.DAMAGED / str(step), 1
    while target.exists():
        n += 1
        target = workdir / checkpoint.DAMAGED / f"{step}.{n}"
    target.parent.mkdir(exist_ok=True)
    shutil.move(source, target)
    warning = f"warning: checkpoint {source} is damaged ({reason}); moved to {target}, trying the previous one"
    print(warning, file=sys.stderr)


def _fit(workdir: Path, step: int, state) -> None:
    """ConfigError if intact checkpoint `step` does not fit `state`; Damaged if unreadable."""
    step_dir = workdir / "checkpoints" / str(step)
    diff = checkpoint.mismatch(step_dir, checkpoint.items(state, checkpoint.layout(step_dir)))
    if diff is not None:
        raise ConfigError(
            f"--workdir {workdir}: checkpoint {step_dir} does not fit what this code builds ({diff}); it is kept as it is: use another --workdir, or the code that wrote it"
        )


def restore_latest(mngr: ocp.CheckpointManager, state, workdir: Path):
    """(state, metrics) from the newest checkpoint every process can read, or None for a new run;
    damaged ones are moved aside once all processes tried them; lost work is refused (COMMITTED)."""
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            _fit(workdir, step, state)
            restored, reason = checkpoint.restore_state(mngr, state, step), None
        except (ConfigError, *checkpoint.BUGS):
            raise
        except Exception as e:  # Orbax and tensorstore raise many types for damaged files
            restored, reason = None, str(e) if isinstance(e, checkpoint.Damaged) else checkpoint.reason(e)
        if parallel.agree(reason is None):
            return restored
        if parallel.is_primary():
            move_aside(workdir, step, reason or "unreadable on another process")
        parallel.sync(f"checkpoint {step} moved aside")
        mngr.reload()
    if (workdir / checkpoint.COMMITTED).exists():
        raise ConfigError(
            f"--workdir {workdir}: holds a run but no readable checkpoint in {mngr.directory}; add --restart to start over"
        )
    return None


def check(workdir: Path, config, runtime: dict) -> Plan:
    """The plan, with what changed since the last start; ConfigError if a recipe field differs."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir}: is a file, not a directory")
    if config.restart or not workdir.is_dir():
        return Plan(None, [], {}, runtime)
    changed = {}
    if checkpoint.steps(workdir) or (workdir / checkpoint.COMMITTED).exists():  # trained
        if (workdir / "config.json").exists():
            old = checkpoint.read_config(workdir).to_dict()
        else:  # config.json gone: the checkpoints' own record says what trained them
            found = checkpoint.recorded_config(workdir)
            if found is None:
                raise ConfigError(
                    f"--workdir {workdir}: holds a run but no config.json, and its checkpoints (written before they carried their recipe) cannot say what trained them; put config.json back, or add --restart to start over"
                )
            step, old = found
            if parallel.is_primary():
                print(
                    f"note: {workdir / 'config.json'} is missing; the recipe is read from checkpoint {step} and written back"
                )
        refused, changed = compare(old, config)
        if refused:
            head = f"--workdir {workdir}: holds a run of another recipe, left as it is:"
            keep = f"To keep it, use another --workdir (add --init-from {workdir} to start from its weights); to discard it, add --restart."
            raise ConfigError("\n".join([head, *refused, keep]))
    history = metrics.read(workdir / HISTORY)
    if history:
        before = history[-1].get("runtime", {})
        changed.update({f"runtime.{k}": [before.get(k), v] for k, v in runtime.items() if before.get(k) != v})
    return Plan(None, [], changed, runtime)


def find_checkpoint(workdir: Path, plan: Plan, config, state, steps_per_epoch: int) -> Plan:
    """The plan with the newest checkpoint that fits `state`, and the damaged ones newer than it;
    ConfigError if the newest intact one does not fit, or if the run is past config.epochs."""
    if config.restart or not workdir.is_dir():
        return plan
    damaged = checkpoint.screen(workdir)
    step = None
    for s in checkpoint.steps(workdir):
        if s not in dict(damaged):
            try:
                _fit(workdir, s, state)
                step = s
                break
            except checkpoint.Damaged as e:
                damaged.append((s, str(e)))
    if step is not None and step > config.epochs * steps_per_epoch:
        raise ConfigError(
            f"--epochs: {workdir} holds a run past epoch {config.epochs} (step {step}); ask for more epochs, or add --restart to start over"
        )
    return plan._replace(step=step, damaged=damaged)


def prepare(workdir: Path, config, plan: Plan) -> None:
    """Act on `check`'s plan (process 0): deletions, moves, config.json, config_history.jsonl."""
    if config.restart:
        for name in checkpoint.RUN_FILES:
            path = workdir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir {workdir}: cannot write there ({e.strerror})") from None
    for step, reason in plan.damaged:
        move_aside(workdir, step, reason)
    flags.write_atomic(workdir / "config.json", config.to_json(indent=2) + "\n")
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    line = {"step": plan.step or 0, "time": now, "changed": plan.changed, "runtime": plan.runtime}
    metrics.append(workdir / HISTORY, {**line, **({"init_from": plan.init} if plan.init else {})})
    if plan.init:
        print(f"Starting from the weights of {plan.init['dir']} at step {plan.init['step']}")
    what = ", ".join(  # what ran, when both a flag and what it resolved to changed
        f"{_label(k)} {_show(a)} -> {_show(b)}"
        for k, (a, b) in plan.changed.items()
        if k.startswith("runtime.") or FIELD_CLASSES.get(k) == ARITHMETIC and f"runtime.{k}" not in plan.changed
    )
    if what and plan.step:
        print(
            f"note: {what} since this run's last start: the same recipe computed in another order, so from step {plan.step} it is no longer bit for bit the uninterrupted run (recorded in {workdir / HISTORY})"
        )


# A work directory (resolved) -> [the descriptor holding its lock, how many holds].
_LOCKS: dict[str, list] = {}
_UNLOCKABLE: set = set()  # work directories whose filesystem refused a lock (warned once)


def holder(workdir: Path) -> str:
    """The process holding `workdir`'s lock, from Linux's /proc/locks (else unnamed)."""
    try:
        inode = f":{workdir.stat().st_ino}"
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].endswith(inode):
                cmd = Path(f"/proc/{parts[4]}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                return f"process {parts[4]}: {cmd[:200]}"
    except OSError:
        pass
    return "another process"


class Busy(ConfigError):
    """The work directory is held by another live process (`lock`)."""


def lock(workdir: Path) -> None:
    """Hold `workdir` while this process trains there: a flock on the directory, which dies with
    the process and leaves no file. Busy, naming the holder, when another process has it."""
    key = str(workdir.resolve())
    if key in _LOCKS:  # held here already (a sweep holds its trial's across its run): counted
        _LOCKS[key][1] += 1
        return
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(workdir, os.O_RDONLY)
    except OSError as e:
        raise ConfigError(f"--workdir {workdir}: cannot write there ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise Busy(
                f"--workdir {workdir}: another run is training there ({holder(workdir)}); wait for it to end, or use another --workdir"
            ) from None
        if key not in _UNLOCKABLE:  # no locks here
            _UNLOCKABLE.add(key)
            warning = f"warning: --workdir {workdir}: its filesystem takes no locks ({e.strerror}); nothing stops a second command from training there at the same time"
            print(warning, file=sys.stderr)
    _LOCKS[key] = [fd, 1]


def unlock(workdir: Path) -> None:
    """Undo one `lock`; the last releases the directory."""
    key = str(Path(workdir).resolve())
    if key in _LOCKS:
        _LOCKS[key][1] -= 1
        if not _LOCKS[key][1]:
            os.close(_LOCKS.pop(key)[0])


def _on_primary(action, what: str, workdir: Path) -> None:
    """`action()` on process 0; every process stops if it raised a ConfigError."""
    error = None
    if parallel.is_primary():
        try:
            action()
        except ConfigError as e:
            error = e
    if not parallel.agree(error is None):
        raise error or ConfigError(f"--workdir: process 0 could not {what} {workdir}")


def lock_all(workdirs: list[Path]) -> None:
    """`lock` each on process 0 (which writes the files); every process stops if one failed."""
    _on_primary(lambda: [lock(workdir) for workdir in workdirs], "lock", workdirs[0])


def prepare_all(workdirs: list[Path], configs: list, plans: list[Plan]) -> None:
    """`prepare` each work directory on process 0; every process stops if one could not."""
    lock_all(workdirs)  # before anything is written; held until loop.train ends
    _on_primary(lambda: [prepare(*args) for args in zip(workdirs, configs, plans)], "prepare", workdirs[0])


RUN_DIRS = ("checkpoints", "tensorboard", "plots", checkpoint.DAMAGED)  # the rest are files


def check_workdir(workdir, writes: tuple = ("", *RUN_DIRS), restart: bool = False, uses: tuple | None = None) -> None:
    """ConfigError in one line for a work directory a command cannot use, before it touches it.
    writes: directories that must take a new file ("": WORKDIR; else Orbax's threads time out);
    restart: skip what --restart deletes and config.json's contents; uses: the names checked
    besides config.json (None: all a run has). A WORKDIR not there yet passes."""
    workdir = Path(workdir)
    if not workdir.exists():
        return
    if not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir}: is a file, not a directory")
    names = checkpoint.RUN_FILES + ("summary.txt",) if uses is None else uses
    for name in ((), names)[not restart] + ("config.json",):
        path, want_dir = workdir / name, name in RUN_DIRS
        if path.exists() and path.is_dir() != want_dir:
            what = "a directory where a file" if path.is_dir() else "a file where a directory"
            raise ConfigError(f"{path}: is {what} belongs; move it away (or add --restart to a training command)")
    if (workdir / "config.json").is_file() and not restart:
        checkpoint.read_config(workdir)
    for directory in [workdir / name for name in writes]:
        if directory.is_dir() and (reason := flags.cannot_write(directory)):
            raise ConfigError(f"--workdir {workdir}: cannot write in {directory} ({reason})")
