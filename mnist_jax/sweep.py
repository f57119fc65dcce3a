"""Hyperparameter sweeps on Optuna: a study whose trials are ordinary runs, chosen on validation.

A sweep is an Optuna study (TPE by default) in a store several processes can share: SQLite in
the work directory by default, any RDB URL (PostgreSQL, MySQL) for many machines, the gRPC
storage proxy in front of one for many workers (experiments/study_server.py), or a journal
file. Each trial is an ordinary run in WORKDIR/trial_<n>/ (WORKDIR/trial_<n>/seed_<s>/ with
several seeds a trial), restorable with evaluate and predict; another study in the same WORKDIR
(--study NAME) keeps its trials, table and plots in WORKDIR/NAME/ (`home`): two never collide.
Its score is the median over its seeds of the final validation accuracy; each epoch's median
goes to Optuna (the `Report` hook), whose pruner may stop the trial there. The test accuracy is
recorded beside, never told.

A trial left RUNNING may be alive in another process. As Optuna does it: every process records
a heartbeat for its running trials; a trial whose heartbeat is older than the grace period is
failed and re-queued with its parameters (`RetryHeartbeatStaleTrialCallback`), and the retry
resumes the run in the first trial's directory from its last checkpoint. A trial stopped by a
signal is re-queued at once. A process holds its trial's directory until the trial is told
(recipe.lock): a process paused past the grace period keeps it, so its retry waits, beating,
while that process goes on with other trials; the paused one, continued, stops its run after
the epoch it was in and leaves the directory to the retry. Trials that differ only in numbers that are data in the state
(loop.MEMBER_FIELDS) can train together vmapped (`batch`): a pruned member trains on with the
others (the program keeps its shape), its later epochs are written to its files but not told.
"""

import dataclasses
import json
import math
import random
import re
import signal
import statistics
import threading
import time
import urllib.parse
import warnings
from pathlib import Path

import ml_collections
import numpy as np
import optuna
import sqlalchemy.engine
import sqlalchemy.exc
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from mnist_jax import checkpoint, data, flags, loop, models, parallel, recipe, seeds, startup
from mnist_jax.config import FIELD_CLASSES, LENGTH, RECIPE, ConfigError, validate

# Heartbeats, their retry callback and fail_stale_trials are "experimental" in Optuna since 2.x,
# and it warns that heartbeats are meant for optimize(), which runs one trial at a time.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

SYNTAX = (
    "PATH=loguniform(LOW,HIGH), uniform(LOW,HIGH), int(LOW,HIGH[,STEP]), logint(LOW,HIGH) "
    "or choice(A,B,...); PATH a config field (opt.lr) or an element of a tuple field "
    "(model.channels[0])"
)
_SPEC = re.compile(r"^\s*([a-z_.]+)(?:\[(\d+)\])?\s*=\s*([a-z]+)\((.*)\)\s*$")
_FINAL = {TrialState.COMPLETE, TrialState.PRUNED}


def _number(text: str):
    return int(text) if re.fullmatch(r"-?\d+", text) else float(text)


def _put(config, name: str, value) -> None:
    """Set the parameter `name` (a dotted path, or path[i] for a tuple's element) in config."""
    path, _, index = name.partition("[")
    if index:
        items = list(dict(flags.leaves(config))[path])
        items[int(index[:-1])] = value
        value = tuple(items)
    config.update_from_flattened_dict({path: value})


def parse_space(specs, config: ml_collections.ConfigDict) -> dict:
    """{parameter name: Optuna distribution} from "PATH=kind(args)" texts (SYNTAX), checked
    against `config`: the field exists and takes the kind's values, and both ends of the range
    are values a run can train with. ConfigError naming the text otherwise."""
    paths = dict(flags.leaves(config))
    space = {}
    for spec in specs:
        bad = lambda what: ConfigError(f"--space {spec!r}: {what}")  # noqa: E731
        match = _SPEC.match(spec)
        if not match:
            raise bad(f"not {SYNTAX}")
        path, index, kind, args = match.groups()
        if path not in paths:
            raise bad(f"{path} is not a field of this stage's config (its fields are its flags: --help)")
        current = paths[path]
        if index is not None:
            if not isinstance(current, (tuple, list)) or int(index) >= len(current):
                raise bad(f"{path} has no element {index} (it is {current!r})")
            current = current[int(index)]
        elif isinstance(current, (tuple, list)):
            raise bad(f"{path} is a tuple: sweep its elements, {path}[0] ...")
        try:
            values = [a.strip() for a in args.split(",") if a.strip()]
            if kind == "choice":
                cast = type(current) if not isinstance(current, bool) else flags._parse_bool
                dist = CategoricalDistribution([cast(v) for v in values])
            elif kind in ("uniform", "loguniform", "int", "logint"):
                nums = [_number(v) for v in values]
                if not all(math.isfinite(n) for n in nums):  # inf, nan, 1e400
                    raise bad(f"the bounds must be finite numbers, got ({args})")
                if len(nums) != (3 if kind == "int" and len(nums) == 3 else 2):
                    raise bad(f"{kind} takes (LOW,HIGH){'[,STEP]' if kind == 'int' else ''}, got ({args})")
                if nums[0] > nums[1]:
                    raise bad(f"the range is empty: {nums[0]} > {nums[1]}")
                if kind in ("loguniform", "logint") and nums[0] <= 0:
                    raise bad(f"{kind} needs LOW > 0, got {nums[0]}")
                if kind in ("int", "logint"):
                    if not all(isinstance(n, int) for n in nums) or isinstance(current, float):
                        raise bad(f"{kind} takes integers, for an integer field")
                    step = nums[2] if len(nums) == 3 else 1
                    dist = IntDistribution(nums[0], nums[1], log=kind == "logint", step=step)
                else:
                    if not isinstance(current, float):
                        raise bad(
                            f"{kind} is for a float field; {path} is {type(current).__name__}: use int(...) or choice(...)"
                        )
                    dist = FloatDistribution(float(nums[0]), float(nums[1]), log=kind == "loguniform")
            else:
                raise bad(f"unknown distribution {kind!r}; {SYNTAX}")
        except ConfigError:  # a ValueError too: said already, not to be wrapped again
            raise
        except (ValueError, TypeError) as e:
            raise bad(f"cannot read ({e}); {SYNTAX}") from None
        name = path + (f"[{index}]" if index is not None else "")
        ends = dist.choices if kind == "choice" else (dist.low, dist.high)
        for end in ends:  # a value no run can train with: say so now, not in a trial
            if type(end) is int and not -(2**63) <= end < 2**63:  # JAX's seeds, XLA's shapes
                raise bad(f"{end} does not fit in 64 bits")
            c = ml_collections.ConfigDict(config.to_dict())
            _put(c, name, end)
            try:
                validate(c)
                models.build(**c.model)
            except ConfigError as e:
                raise bad(f"{end!r} cannot be trained with: {e}") from None
        space[name] = dist
    return space


def batchable(space: dict) -> bool:
    """Whether the space changes only numbers that are data (trials can share a program)."""
    numbers = [f for f in loop.MEMBER_FIELDS if f != "seed"]
    return all(name in numbers for name in space)


def trial_config(config, params: dict) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(config.to_dict())
    for name, value in params.items():
        _put(c, name, value)
    return c


def _recipe(config) -> dict:
    """What makes trials comparable: the recipe and length fields of the fixed config."""
    leaves = dict(flags.leaves(config))
    keep = [p for p, cls in FIELD_CLASSES.items() if cls in (RECIPE, LENGTH) and p in leaves]
    return {p: json.loads(json.dumps(leaves[p])) for p in keep}


def shown(url: str, text: str | None = None) -> str:
    """The storage URL as messages print it, its password as *** (user:***@host); or `text`,
    a message that may hold the URL or its password, so masked."""
    masked, password = url, None
    if not url.startswith("journal:"):
        try:
            password = sqlalchemy.engine.make_url(url).password
            if password is not None:
                masked = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
        except Exception:  # not a URL SQLAlchemy reads (it fails to open later): mask by hand
            masked = re.sub(r"(//[^/@:]*):[^/@]*@", r"\1:***@", url)
    if text is None:
        return masked
    text = text.replace(url, masked)
    return text.replace(str(password), "***") if password else text


def cannot_open(url: str, error: Exception) -> ConfigError:
    """The one line for a store that would not open: its reason's first line, no password."""
    reason = shown(url, (str(error).strip().splitlines() or [type(error).__name__])[0])[:200]
    return ConfigError(f"--storage {shown(url)}: cannot open ({reason})")


def _racing(error: BaseException) -> bool:
    """Whether `error` is another process creating the same new storage at the same moment:
    SQLite's UNIQUE alembic_version, PostgreSQL's pg_type_typname_nsp_index, a table made
    between the check and the CREATE. (Not "database is locked": SQLite has waited 60 s.)"""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, sqlalchemy.exc.IntegrityError):
            return True
        if isinstance(error, sqlalchemy.exc.OperationalError | sqlalchemy.exc.ProgrammingError):
            return "already exists" in str(error)
        error = error.__cause__ or error.__context__
    return False


_OWN = re.compile(r"trial_\d+|plots|sweep\.json|study\.db.*")  # the default study's, in WORKDIR


def check_name(name: str) -> None:
    """A study's name becomes WORKDIR/NAME/: one path component, and none the default study
    writes in WORKDIR."""
    if not name or not name.isprintable() or "/" in name or name in (".", "..") or len(name.encode()) > 255:
        raise ConfigError(f"--study {name!r}: must be a name for a directory (one path component, printable)")
    if _OWN.fullmatch(name):
        raise ConfigError(
            f"--study {name}: WORKDIR/{name} is the default study's (trial_<n>, plots, sweep.json, study.db): choose another name"
        )


def rdb(url: str, heartbeat: int | None = None) -> optuna.storages.RDBStorage:
    """An RDB store (SQLite waits up to 60 s for a lock another process holds); with Optuna's
    heartbeats every `heartbeat` seconds, a stale trial queued again."""
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    beats = {}
    if heartbeat:
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)
        beats = dict(heartbeat_interval=heartbeat, grace_period=2 * heartbeat, heartbeat_stale_trial_callback=retry)
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, **beats)


def grpc(url: str) -> optuna.storages.GrpcStorageProxy:
    """A client of experiments.study_server at grpc://HOST:PORT, once it answers (10 s)."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname or not parts.port:
        raise ValueError("give grpc://HOST:PORT")
    store = optuna.storages.GrpcStorageProxy(host=parts.hostname, port=parts.port)
    try:
        store.wait_server_ready(timeout=10)
    except Exception:
        raise OSError(
            f"no study server answers at {parts.hostname}:{parts.port} (python -m experiments.study_server)"
        ) from None
    return store


def _create(url: str, name: str, heartbeat: int, sampler: str, pruner: str) -> optuna.Study:
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        if not path.parent.is_dir():
            raise OSError(f"no directory {path.parent}")
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        store = optuna.storages.JournalStorage(backend)
    elif url.startswith("grpc://"):  # its trials beat through a BEAT attribute (fail_stale)
        store = grpc(url)
    else:
        store = rdb(url, heartbeat)
    samplers = {"tpe": lambda: optuna.samplers.TPESampler(constant_liar=True), "random": optuna.samplers.RandomSampler}
    pruners = {"median": optuna.pruners.MedianPruner, "none": optuna.pruners.NopPruner}
    return optuna.create_study(
        storage=store,
        study_name=name,
        direction="maximize",
        sampler=samplers[sampler](),
        pruner=pruners[pruner](),
        load_if_exists=True,
    )


def open_study(
    storage: str,
    name: str,
    workdir: Path,
    heartbeat: int,
    sampler: str,
    pruner: str,
    space: dict,
    config,
    tries: int = 5,
) -> optuna.Study:
    """Create or load the study `name` in `storage` ("": WORKDIR/study.db; an RDB URL;
    grpc://HOST:PORT; journal:PATH). A study made with another space or another fixed recipe is refused; a new
    one records its space, recipe and `home` (so give only checked ones). Creating a new store
    races with the other processes starting on it: retried `tries` times, a random moment apart."""
    check_name(name)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or f"sqlite:///{workdir / 'study.db'}"
    for attempt in range(tries):
        try:
            study = _create(url, name, heartbeat, sampler, pruner)
            break
        except Exception as e:  # sqlalchemy's, OSError, ...: the reason's first line
            if attempt + 1 < tries and _racing(e):
                time.sleep(random.uniform(0.05, 0.25) * (attempt + 1))
                continue
            raise cannot_open(url, e) from None
    given = {
        "space": {k: optuna.distributions.distribution_to_json(v) for k, v in space.items()},
        "recipe": _recipe(config),
    }
    known = {k: study.user_attrs[k] for k in given if k in study.user_attrs}
    if not known:
        # The stage's own study keeps WORKDIR/trial_<n>/ unless another study's trials are there.
        top = name == config.name and not any(workdir.glob("trial_*"))
        for k, v in {**given, "home": "" if top else name}.items():
            study.set_user_attr(k, v)
    for key in known:
        if known[key] != given[key]:
            diff = sorted(k for k in {**known[key], **given[key]} if known[key].get(k) != given[key].get(k))
            raise ConfigError(
                f"--study {name} in {shown(url)} was made with another {key} ({', '.join(diff)} differ); use another --study or --workdir"
            )
    return study


def home(study: optuna.Study, workdir: Path) -> Path:
    """Where the study's trials, table and plots live: WORKDIR for the stage's own study (and
    for a study made before studies had homes), else WORKDIR/NAME."""
    return workdir / study.user_attrs.get("home", "")


class Report:
    """A group callback: each epoch's validation accuracy (the median over a trial's runs in the
    group) to its trial, once an epoch; a trial the pruner stops is marked pruned; when every
    trial in the group is, the group stops after this epoch."""

    def __init__(self, trials: list, groups: list, pruned: dict, lost: dict):
        self.trials, self.groups, self.pruned, self.lost = trials, groups, pruned, lost
        self.signal = None  # a signal heard after the group's last host sync: it ended anyway

    def on_epoch_end(self, group):
        accuracy, epoch = [r.evaluation["val"]["accuracy"] for r in group.runs], group.runs[0].row["epoch"]
        for trial, members in zip(self.trials, self.groups):
            if trial.number in self.pruned or trial.number in self.lost:
                continue
            frozen = _frozen(trial.study, trial.number)
            if frozen.state != TrialState.RUNNING:  # failed as stale while this process slept
                self.lost[trial.number] = epoch
                continue
            reported = frozen.intermediate_values
            if epoch not in reported:  # a resumed retry has its first epochs already
                try:
                    trial.report(float(np.median([accuracy[j] for j in members])), epoch)
                except optuna.exceptions.UpdateFinishedTrialError:  # failed since the read above
                    self.lost[trial.number] = epoch  # (paused between them: seen in a test)
                    continue
            if trial.should_prune():
                self.pruned[trial.number] = epoch
                if group.primary:
                    print(f"trial {trial.number}: pruned after epoch {epoch}", flush=True)
        # The group stops after this epoch (its checkpoints saved) when every trial is pruned,
        # or when one was taken over: its retry resumes this directory once this process leaves.
        if self.lost or all(t.number in self.pruned for t in self.trials):
            for run in group.runs:
                run.stop = run.stop or "epoch"

    def on_train_end(self, group):
        self.signal = group.signal


# A trial's last sign of life (seconds since the epoch) where the storage keeps no heartbeats
# of its own (a journal file, the gRPC proxy): a system attribute every store carries.
BEAT = "mnist_jax:heartbeat"


def _native(storage) -> bool:
    # Optuna wraps an RDB store in a cache that is a heartbeat store too: ask it, as optimize does.
    return optuna.storages._heartbeat.is_heartbeat_enabled(storage)


class Heartbeat:
    """Record the trials' heartbeats every `interval` seconds in a thread (Optuna's optimize
    does this for its one trial; ask-and-tell leaves it to the caller): the storage's own, or
    the BEAT attribute where it has none."""

    def __init__(self, study: optuna.Study, ids: list, interval: int):
        self.stop, storage = threading.Event(), study._storage
        native = _native(storage)

        def beat():
            while True:
                for i in ids:
                    try:
                        storage.record_heartbeat(i) if native else storage.set_trial_system_attr(i, BEAT, time.time())
                    except optuna.exceptions.UpdateFinishedTrialError:
                        pass  # failed as stale elsewhere (this process was paused): Report stops it
                if self.stop.wait(interval):
                    return

        self.thread = threading.Thread(target=beat, daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.thread.join()


@dataclasses.dataclass
class Entry:
    """A trial asked for: its config, the directory its run lives in, its state so far."""

    trial: optuna.Trial
    config: ml_collections.ConfigDict
    workdir: Path
    results: list = dataclasses.field(default_factory=list)  # seeds.result of each seed


def _frozen(study, number: int):
    return study.get_trials(deepcopy=False)[number]


def suggest(trial: optuna.Trial, name: str, dist):
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)


def ask(study: optuna.Study, space: dict, config, workdir: Path) -> Entry:
    """The next trial, in WORKDIR/trial_<n>/; a retry in its first trial's directory, as that
    trial recorded it (wherever its study's home was then)."""
    trial = study.ask()
    params = {name: suggest(trial, name, dist) for name, dist in space.items()}
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(_frozen(study, trial.number))
    recorded = _frozen(study, retried).user_attrs.get("workdir") if retried is not None else None
    where = Path(recorded) if recorded else workdir / f"trial_{trial.number if retried is None else retried}"
    trial.set_user_attr("workdir", str(where))
    return Entry(trial, trial_config(config, params), where)


def requeue(study: optuna.Study, entries: list) -> None:
    """Fail the trials and queue each again with its parameters (their runs resume)."""
    callback = optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)
    for e in [e for e in entries if _frozen(study, e.trial.number).state == TrialState.RUNNING]:
        study.tell(e.trial, state=TrialState.FAIL)
        callback(study, _frozen(study, e.trial.number))


def _has_run(workdir: Path) -> bool:
    return any(workdir.glob("**/checkpoints/*"))


def train_entries(
    study, entries: list, trial_seeds: int, runtime, pruned: dict, lost: dict, hooks: tuple
) -> int | None:
    """Train the entries' runs (trial x seed): together in one vmapped group when there are
    several trials, or a trial alone (its seeds together where the runtime vmaps seeds, else in
    turn); fills results. Returns a signal heard too late to stop a run (the sweep stops after
    telling them)."""
    members = [(i, s) for i in range(len(entries)) for s in range(trial_seeds)]
    for group in seeds.in_groups(members, len(entries) > 1 or runtime.seed_mode == "vmap"):
        live = [i for i in sorted({i for i, _ in group}) if entries[i].trial.number not in pruned]
        if not live or lost:  # pruned on an earlier seed, or taken over: the rest not trained
            continue
        configs = [loop.with_values(entries[i].config, {"seed": entries[i].config.seed + s}) for i, s in group]
        workdirs = [
            entries[i].workdir if trial_seeds == 1 else checkpoint.seed_dir(entries[i].workdir, c.seed)
            for (i, _), c in zip(group, configs)
        ]
        labels = [
            f"trial {entries[i].trial.number}" + (f" seed {c.seed}" if trial_seeds > 1 else "")
            for (i, _), c in zip(group, configs)
        ]
        runs = [[j for j, (i2, _) in enumerate(group) if i2 == i] for i in live]
        report = Report([entries[i].trial for i in live], runs, pruned, lost)
        trained = loop.train(
            configs[0], workdirs, runtime=runtime, hooks=hooks, callbacks=(report,), members=configs, labels=labels
        )
        for (i, _), run in zip(group, trained.runs):
            entries[i].results.append(seeds.result(run))
        if report.signal is not None:
            return report.signal
    return None


def tell(study, entry: Entry, pruned: dict) -> str:
    """Tell the trial its outcome: pruned, or complete with the median final validation
    accuracy of its seeds. Returns its state's name."""
    r = entry.results
    med = lambda key: statistics.median(x[key] for x in r)  # noqa: E731
    entry.trial.set_user_attr("test_accuracy", med("test_accuracy"))
    entry.trial.set_user_attr("epochs", max(x["epochs"] for x in r))
    if entry.trial.number in pruned:
        study.tell(entry.trial, state=TrialState.PRUNED)
        return "pruned"
    study.tell(entry.trial, med("val_accuracy"))
    return "complete"


def fail_stale(study, interval: int) -> None:
    """Fail each running trial with no sign of life for 2 x interval, and queue it again
    (RetryHeartbeatStaleTrialCallback): Optuna's own check on a store with heartbeats, the
    BEAT attribute (or the trial's start) elsewhere. Comparing another machine's clock, so
    the machines' clocks must agree to well within the grace period (NTP does)."""
    if _native(study._storage):
        optuna.storages.fail_stale_trials(study)
        return
    retry, now = optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True), time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = t.system_attrs.get(BEAT) or t.datetime_start.timestamp()
        if now - last <= 2 * interval:
            continue
        try:  # only one process fails it: the others find it finished
            failed = study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if failed:
            retry(study, study._storage.get_trial(t._trial_id))


def tally(study) -> tuple[int, list]:
    """Trials done (complete, pruned, or failed for their own reason, not re-queued) and the
    numbers of those running."""
    trials = study.get_trials(deepcopy=False)
    done = sum(t.state in _FINAL or (t.state == TrialState.FAIL and "error" in t.user_attrs) for t in trials)
    return done, [t.number for t in trials if t.state == TrialState.RUNNING]


def _claim(entry: Entry) -> bool:
    """Hold the trial's directory for this process (recipe.lock) until the trial is told, or
    False while another live process has it: one paused past the grace period, whose trial
    this one was given again, or one given the same trial (SQLite cannot lock the row a trial
    is taken from: two processes may both take one)."""
    ok = True
    if parallel.is_primary():
        try:
            recipe.lock(entry.workdir)
        except recipe.Busy:
            ok = False
    return parallel.agree(ok)


def _drop_gone(study, entries: list, say) -> list:
    """The entries claimed, less those told elsewhere (given to another process too), released."""
    kept = []
    for e in entries:
        if _frozen(study, e.trial.number).state == TrialState.RUNNING:
            kept.append(e)
        else:
            say(f"trial {e.trial.number}: finished by another process")
            recipe.unlock(e.workdir)
    return kept


@loop.one_summary()  # the model's table once, not once a trial
def optimize(
    study,
    space: dict,
    config,
    workdir: Path,
    trials: int,
    trial_seeds: int = 1,
    batch: int = 1,
    heartbeat: int = 30,
    hooks: tuple = (),
    say=print,
    runtime: startup.Runtime | None = None,
) -> None:
    """Run trials until the study has `trials` done (every process sharing it counts): `batch`
    at a time, vmapped together when batch > 1 (fresh trials of a batchable space). A trial
    whose directory another process holds waits, beating, while this one goes on with others."""
    runtime = runtime or startup.resolve(config, trial_seeds)
    waited, held = None, {}  # held: trial number -> (entry, its heartbeat), directory busy
    try:
        while True:
            fail_stale(study, heartbeat)  # stale: failed, re-queued by the callback
            done, running = tally(study)
            free = trials - done - len(running)
            if done >= trials:
                return
            ready = [e for e, _ in held.values() if _claim(e)]
            for e in ready:
                held.pop(e.trial.number)[1].close()
            ready = _drop_gone(study, ready, say)
            if not ready and free <= 0:  # the rest are running: here, or elsewhere
                if waited != running:
                    busy = [n for n in running if n in held]
                    say(
                        f"waiting for trial(s) {', '.join(map(str, running))}, running in another process (a dead one's is re-run after {2 * heartbeat}s without a heartbeat)"
                        if not busy
                        else f"waiting for trial(s) {', '.join(map(str, busy))}: a process still holds its directory"
                    )
                    waited = running
                time.sleep(min(heartbeat, 5))
                continue
            entries = ready or [ask(study, space, config, workdir) for _ in range(min(batch, free))]
            for e in [e for e in entries if e not in ready and not _claim(e)]:
                say(
                    f"trial {e.trial.number}: {e.workdir} is held by {recipe.holder(e.workdir)}; it runs here once that process leaves it"
                )
                held[e.trial.number] = (e, Heartbeat(study, [e.trial._trial_id], heartbeat))
                entries.remove(e)
            entries = _drop_gone(study, entries, say)
            resumed = [e for e in entries if _has_run(e.workdir)]  # each alone: its own checkpoint
            fresh = [e for e in entries if e not in resumed]
            runs = [[e] for e in resumed] + ([fresh] if len(fresh) > 1 else [[e] for e in fresh])
            beat = Heartbeat(study, [e.trial._trial_id for e in entries], heartbeat)  # Optuna's id
            try:
                for k, group in enumerate(runs):
                    for e in group:
                        params = ", ".join(f"{n}={_show(v)}" for n, v in e.trial.params.items())
                        say(f"trial {e.trial.number}: {params} in {e.workdir}" + (" (resumed)" if e in resumed else ""))
                    _train_and_tell(study, group, trial_seeds, runtime, hooks, runs[k + 1 :], say)
            finally:
                beat.close()
                for e in entries:
                    recipe.unlock(e.workdir)
    finally:  # trials still waiting for a directory: failed and queued again, for whoever is left
        for e, beat in held.values():
            beat.close()
        requeue(study, [e for e, _ in held.values()])


def _train_and_tell(study, group, trial_seeds, runtime, hooks, later, say) -> None:
    pruned: dict = {}
    lost: dict = {}  # trials failed as stale by another process while this one slept
    try:
        heard = train_entries(study, group, trial_seeds, runtime, pruned, lost, hooks)
    except loop.Diverged as e:
        bad = group[e.member // trial_seeds] if e.member is not None else group[0]
        bad.trial.set_user_attr("error", str(e))
        study.tell(bad.trial, state=TrialState.FAIL)
        say(f"trial {bad.trial.number}: failed: {e}")
        for other in [o for o in group if o is not bad]:  # re-queued: each resumes alone
            if other.trial.number in pruned:
                tell(study, other, pruned) if other.results else requeue(study, [other])
            else:
                requeue(study, [other])
        return
    except ConfigError as e:  # a combination of values no run can take
        for entry in group:
            entry.trial.set_user_attr("error", str(e))
            study.tell(entry.trial, state=TrialState.FAIL)
            say(f"trial {entry.trial.number}: failed: {e}")
        return
    except BaseException:  # a signal, a lost process: every trial asked and not told runs again
        requeue(study, [*group, *(e for g in later for e in g)])
        raise
    for entry in group:
        if _frozen(study, entry.trial.number).state != TrialState.RUNNING:
            epoch = lost.get(entry.trial.number)
            say(
                f"trial {entry.trial.number}: failed as stale by another process (no heartbeat from this one within the grace period: was it paused?); its run stopped"
                + (f" after epoch {epoch}" if epoch else "")
                + " and the trial's retry resumes it"
            )
            continue
        if lost or (len(entry.results) < trial_seeds and entry.trial.number not in pruned):
            requeue(study, [entry])  # stopped short: by a late signal, or with a taken-over one
            continue
        state = tell(study, entry, pruned)
        value = _frozen(study, entry.trial.number).value
        say(f"trial {entry.trial.number}: {state}, validation {value:.2%}")
    if heard is not None:
        requeue(study, [e for g in later for e in g])
        raise loop.Interrupted(heard, f"interrupted ({signal.Signals(heard).name}) as a trial ended")


def _show(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table(study) -> list[dict]:
    """A row per trial: number, state, parameters, validation accuracy (its score; a pruned
    trial's last report), test accuracy (recorded, never told), epochs, work directory."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = t.state.name.lower().replace("fail", "failed")
        if t.state == TrialState.FAIL and "error" not in t.user_attrs:
            state = "re-queued"  # its run goes on in a later trial
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        rows.append(
            {
                "trial": t.number,
                "state": state,
                "params": t.params,
                "val_accuracy": t.value if t.value is not None else last,
                "test_accuracy": t.user_attrs.get("test_accuracy"),
                "epochs": t.user_attrs.get("epochs", max(t.intermediate_values, default=0)),
                "workdir": t.user_attrs.get("workdir"),
                "error": t.user_attrs.get("error"),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    names = sorted({n for r in rows for n in r["params"]})
    pct = lambda v: "" if v is None else f"{v:.2%}"  # noqa: E731
    head = ["trial", "state", *names, "val", "test", "epochs"]
    body = [
        [
            str(r["trial"]),
            r["state"],
            *(_show(r["params"].get(n, "")) for n in names),
            pct(r["val_accuracy"]),
            pct(r["test_accuracy"]),
            str(r["epochs"]),
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head, *body])


def importances(study) -> dict:
    """Optuna's parameter importances (PED-ANOVA, its default: no scikit-learn needed), or {}
    while fewer than 3 trials are complete."""
    if sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)) < 3:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "too few trials": the importances say it, equal
        return dict(optuna.importance.get_param_importances(study))


def summarize(study, space: dict, workdir: Path, plots: bool = True, say=print) -> dict:
    """Print the table and the best trial (chosen on validation; its test accuracy beside),
    write sweep.json and, with plots, plots/ in `workdir`, the study's home (process 0)."""
    rows = table(study)
    complete = [r for r in rows if r["state"] == "complete"]
    best = max(complete, key=lambda r: r["val_accuracy"]) if complete else None
    out = {
        "study": study.study_name,
        "best": best,
        "importances": importances(study),
        "space": {k: repr(v) for k, v in space.items()},
        "trials": rows,
    }
    if not parallel.is_primary():
        return out
    say(format_table(rows))
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "failed", "re-queued")}
    say(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    if best:
        say(
            f"best trial {best['trial']} (chosen on validation {best['val_accuracy']:.2%}): test {best['test_accuracy']:.2%}, in {best['workdir']}"
        )
    flags.write_json(str(workdir / "sweep.json"), out)
    if plots and rows:
        from mnist_jax import plots as plots_lib  # matplotlib only when drawing

        plots_lib.draw_sweep(study, workdir / "plots")
        say(f"Plots in {workdir / 'plots'}")
    return out


def check_config(config) -> str | None:
    """Check the fixed config a sweep needs (validated: startup.start), before a study records it: one seed per run (trials
    have their own seeds), data that load and a validation split they can hold; a split set when
    absent (a tenth of the training images, at most 5,000), returned as the line to say."""
    if config.seeds != 1:
        raise ConfigError("--seeds: a sweep's trials take --trial-seeds")
    ds = data.from_config(config.data)
    note = None
    if config.data.val_split == 0:
        n = len(ds.train_labels)
        config.data.val_split = max(1, min(5000, n // 10))
        note = f"--data-val-split {config.data.val_split}: a sweep chooses on validation images held out of the {n:,} training images (a tenth of them, at most 5,000; set it to change)"
    loop.split_data(ds, config)  # the split and the batch fit the data, or one line now
    return note
