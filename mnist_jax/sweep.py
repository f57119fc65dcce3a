"""Hyperparameter sweeps on Optuna: a study whose trials are ordinary runs, chosen on validation (design.md, Sweeps)."""

import contextlib
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
import sqlalchemy
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution, distribution_to_json
from optuna.storages._heartbeat import is_heartbeat_enabled  # as Study.optimize asks (an RDB store's cache: yes)
from optuna.trial import TrialState

from mnist_jax import checkpoint, data, flags, loop, models, parallel, recipe, seeds, startup
from mnist_jax.config import FIELD_CLASSES, LENGTH, RECIPE, ConfigError, validate

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: "experimental"
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

SYNTAX = (
    "PATH=loguniform(LOW,HIGH), uniform(LOW,HIGH), int(LOW,HIGH[,STEP]), logint(LOW,HIGH) or choice(A,B,...); "
    "PATH a config field (opt.lr) or an element of a tuple field (model.channels[0])"
)
_SPEC = re.compile(r"^\s*([a-z_.]+)(?:\[(\d+)\])?\s*=\s*([a-z]+)\((.*)\)\s*$")
_RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)  # stateless: shared
BEAT = "mnist_jax:heartbeat"  # a trial's last sign of life where the store keeps no heartbeats (journal, gRPC)


def parse_space(specs, config: ml_collections.ConfigDict) -> dict:
    """{name: Optuna distribution} from "PATH=kind(args)" texts (SYNTAX), each end trainable; else ConfigError."""
    paths, space = dict(flags.leaves(config)), {}
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
                nums = [int(v) if re.fullmatch(r"-?\d+", v) else float(v) for v in values]
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
        for end in dist.choices if kind == "choice" else (dist.low, dist.high):  # untrainable: said now, not in a trial
            if type(end) is int and not -(2**63) <= end < 2**63:  # JAX's seeds, XLA's shapes
                raise bad(f"{end} does not fit in 64 bits")
            c = trial_config(config, {name: end})
            try:
                validate(c)
                models.build(**c.model)
            except ConfigError as e:
                raise bad(f"{end!r} cannot be trained with: {e}") from None
        space[name] = dist
    return space


def batchable(space: dict) -> bool:
    """Whether the space changes only numbers that are data (trials can share a program)."""
    low = lambda dist: min(dist.choices) if hasattr(dist, "choices") else dist.low
    numbers = [name in loop.MEMBER_FIELDS and name != "seed" for name in space]
    return all(numbers) and ("opt.ema" not in space or low(space["opt.ema"]) > 0)  # EMA on or off: the program's


def trial_config(config, params: dict) -> ml_collections.ConfigDict:
    """A copy of config with `params` set, each named by a dotted path, or path[i] for a tuple's element."""
    c = ml_collections.ConfigDict(config.to_dict())
    for name, value in params.items():
        path, _, index = name.partition("[")
        if index:
            items = list(dict(flags.leaves(c))[path])
            items[int(index[:-1])] = value
            value = tuple(items)
        c.update_from_flattened_dict({path: value})
    return c


def _recipe(config) -> dict:
    """What makes trials comparable: the recipe and length fields of the fixed config."""
    leaves = dict(flags.leaves(config))
    keep = [p for p, cls in FIELD_CLASSES.items() if cls in (RECIPE, LENGTH) and p in leaves]
    return {p: json.loads(json.dumps(leaves[p])) for p in keep}


def shown(url: str, text: str | None = None) -> str:
    """The storage URL with its password as *** (user:***@host); or `text`, a message that may hold either, masked."""
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
    """Whether `error` is another process creating the same new store at once (not "database is locked": 60 s)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, sqlalchemy.exc.IntegrityError):
            return True
        if isinstance(error, sqlalchemy.exc.OperationalError | sqlalchemy.exc.ProgrammingError):
            return "already exists" in str(error)
        error = error.__cause__ or error.__context__
    return False


def check_name(name: str) -> None:
    """A study's name becomes WORKDIR/NAME/: one path component, none the default study writes."""
    if not name or not name.isprintable() or "/" in name or name in (".", "..") or len(name.encode()) > 255:
        raise ConfigError(f"--study {name!r}: must be a name for a directory (one path component, printable)")
    if re.fullmatch(r"trial_\d+|plots|sweep\.json|study\.db.*", name):  # the default study's, in WORKDIR
        owner = "the default study's (trial_<n>, plots, sweep.json, study.db)"
        raise ConfigError(f"--study {name}: WORKDIR/{name} is {owner}: choose another name")


def rdb(url: str, heartbeat: int | None = None) -> optuna.storages.RDBStorage:
    """An RDB store (SQLite waits 60 s for a lock); with heartbeats, a stale trial is queued again."""
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    beats = {}
    if heartbeat:
        beats = dict(heartbeat_interval=heartbeat, grace_period=2 * heartbeat, heartbeat_stale_trial_callback=_RETRY)
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, **beats)


def _create(url: str, name: str, heartbeat: int, sampler: str, pruner: str, warmup: int = 0) -> optuna.Study:
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        if not path.parent.is_dir():
            raise OSError(f"no directory {path.parent}")
        store = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    elif url.startswith("grpc://"):  # experiments.study_server, once it answers (10 s); BEAT its trials' heartbeats
        parts = urllib.parse.urlsplit(url)
        if not parts.hostname or not parts.port:
            raise ValueError("give grpc://HOST:PORT")
        store = optuna.storages.GrpcStorageProxy(host=parts.hostname, port=parts.port)
        try:
            store.wait_server_ready(timeout=10)
        except Exception:
            where = f"{parts.hostname}:{parts.port}"
            raise OSError(f"no study server answers at {where} (python -m experiments.study_server)") from None
    else:
        store = rdb(url, heartbeat)
    sampler = optuna.samplers.TPESampler(constant_liar=True) if sampler == "tpe" else optuna.samplers.RandomSampler()
    # Epochs are the trials' steps, from 1: warmup W judges a trial from epoch W + 1 (an average of the weights,
    # a one-cycle schedule: behind at epoch 1, ahead later).
    median = optuna.pruners.MedianPruner(n_warmup_steps=warmup + 1)
    pruner = median if pruner == "median" else optuna.pruners.NopPruner()
    return optuna.create_study(
        storage=store, study_name=name, direction="maximize", sampler=sampler, pruner=pruner, load_if_exists=True
    )


def open_study(
    storage: str, name: str, workdir: Path, heartbeat: int, sampler, pruner, space: dict, config, tries=5, warmup=0
) -> optuna.Study:
    """Create or load the study `name` ("": WORKDIR/study.db); refused if made with another space or recipe, a new one
    records them (give only checked ones). Creating a new store races: retried `tries` times, a moment apart.
    warmup: the median pruner's epochs before it judges a trial."""
    check_name(name)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or f"sqlite:///{workdir / 'study.db'}"
    for attempt in range(tries):
        try:
            study = _create(url, name, heartbeat, sampler, pruner, warmup)
            break
        except Exception as e:  # sqlalchemy's, OSError, ...: the reason's first line
            if attempt + 1 == tries or not _racing(e):
                raise cannot_open(url, e) from None
            time.sleep(random.uniform(0.05, 0.25) * (attempt + 1))
    given = {"space": {k: distribution_to_json(v) for k, v in space.items()}, "recipe": _recipe(config)}
    known = {k: study.user_attrs[k] for k in given if k in study.user_attrs}
    if not known:
        top = name == config.name and not any(workdir.glob("trial_*"))  # the stage's own, if WORKDIR is free
        for k, v in {**given, "home": "" if top else name}.items():
            study.set_user_attr(k, v)
    for key in [k for k in known if known[k] != given[k]]:
        diff = sorted(k for k in {**known[key], **given[key]} if known[key].get(k) != given[key].get(k))
        raise ConfigError(
            f"--study {name} in {shown(url)} was made with another {key} ({', '.join(diff)} differ); use another --study or --workdir"
        )
    return study


def home(study: optuna.Study, workdir: Path) -> Path:
    """Where the study's trials, table and plots live: WORKDIR (the stage's own, or an older study) or WORKDIR/NAME."""
    return workdir / study.user_attrs.get("home", "")


class Report:
    """A group callback: each epoch, each trial's median validation accuracy to Optuna, and its pruner's verdict."""

    def __init__(self, trials: list, groups: list, pruned: dict, lost: dict):
        self.trials, self.groups, self.pruned, self.lost, self.signal = trials, groups, pruned, lost, None

    def on_epoch_end(self, group):
        accuracy, epoch = [r.evaluation["val"]["accuracy"] for r in group.runs], group.runs[0].row["epoch"]
        for trial, members in zip(self.trials, self.groups):
            if trial.number in self.pruned or trial.number in self.lost:
                continue
            frozen = _frozen(trial.study, trial.number)
            if frozen.state != TrialState.RUNNING:  # failed as stale while this process slept
                self.lost[trial.number] = epoch
                continue
            if epoch not in frozen.intermediate_values:  # a resumed retry has its first epochs already
                try:
                    trial.report(float(np.median([accuracy[j] for j in members])), epoch)
                except optuna.exceptions.UpdateFinishedTrialError:  # failed since the read above
                    self.lost[trial.number] = epoch  # (paused between them: seen in a test)
                    continue
            if trial.should_prune():
                self.pruned[trial.number] = epoch
                if group.primary:
                    print(f"trial {trial.number}: pruned after epoch {epoch}", flush=True)
        if self.lost or all(t.number in self.pruned for t in self.trials):  # all pruned, or one taken over: stop
            for run in group.runs:
                run.stop = run.stop or "epoch"

    def on_train_end(self, group):
        self.signal = group.signal  # heard after the group's last host sync: it ended anyway


class Heartbeat:
    """Record the trials' heartbeats every `interval` s in a thread (ask-and-tell leaves it to us): native, or BEAT."""

    def __init__(self, study: optuna.Study, ids: list, interval: int):
        self.stop, storage, native = threading.Event(), study._storage, is_heartbeat_enabled(study._storage)

        def beat():
            while True:
                for i in ids:  # one failed as stale elsewhere (this process was paused): Report stops it
                    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                        storage.record_heartbeat(i) if native else storage.set_trial_system_attr(i, BEAT, time.time())
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


def ask(study: optuna.Study, space: dict, config, workdir: Path) -> Entry:
    """The next trial, in WORKDIR/trial_<n>/; a retry in the directory its first trial recorded."""
    trial = study.ask(space)  # Optuna suggests each parameter (a retry's: its first trial's)
    frozen = _frozen(study, trial.number)
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    recorded = _frozen(study, retried).user_attrs.get("workdir") if retried is not None else None
    where = Path(recorded) if recorded else workdir / f"trial_{trial.number if retried is None else retried}"
    trial.set_user_attr("workdir", str(where))
    return Entry(trial, trial_config(config, frozen.params), where)


def requeue(study: optuna.Study, entries: list) -> None:
    """Fail the trials and queue each again with its parameters (their runs resume)."""
    for e in [e for e in entries if _frozen(study, e.trial.number).state == TrialState.RUNNING]:
        study.tell(e.trial, state=TrialState.FAIL)
        _RETRY(study, _frozen(study, e.trial.number))


def train_entries(entries: list, trial_seeds: int, runtime, pruned: dict, lost: dict, hooks) -> int | None:
    """Train the runs (trial x seed), trials vmapped together; returns a signal heard too late to stop them."""
    members = [(i, s) for i in range(len(entries)) for s in range(trial_seeds)]
    for group in seeds.in_groups(members, len(entries) > 1 or runtime.seed_mode == "vmap"):
        live = [i for i in sorted({i for i, _ in group}) if entries[i].trial.number not in pruned]
        if not live or lost:  # pruned on an earlier seed, or taken over: the rest not trained
            continue
        configs = [loop.with_values(entries[i].config, {"seed": entries[i].config.seed + s}) for i, s in group]
        ran = [(entries[i], c) for (i, _), c in zip(group, configs)]
        workdirs = [e.workdir if trial_seeds == 1 else checkpoint.seed_dir(e.workdir, c.seed) for e, c in ran]
        labels = [f"trial {e.trial.number}" + (f" seed {c.seed}" if trial_seeds > 1 else "") for e, c in ran]
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
    """Tell the trial pruned, or complete with its seeds' median final validation accuracy; returns the state."""
    med = lambda key: statistics.median(x[key] for x in entry.results)  # noqa: E731
    entry.trial.set_user_attr("test_accuracy", med("test_accuracy"))
    entry.trial.set_user_attr("epochs", max(x["epochs"] for x in entry.results))
    if entry.trial.number in pruned:
        study.tell(entry.trial, state=TrialState.PRUNED)
        return "pruned"
    study.tell(entry.trial, med("val_accuracy"))
    return "complete"


def fail_stale(study, interval: int) -> None:
    """Fail and queue again each trial silent for 2 x interval: Optuna's check, or BEAT (the clocks must agree)."""
    if is_heartbeat_enabled(study._storage):
        return optuna.storages.fail_stale_trials(study)
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if now - (t.system_attrs.get(BEAT) or t.datetime_start.timestamp()) > 2 * interval:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # another process failed it first
                if study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                    _RETRY(study, study._storage.get_trial(t._trial_id))


def _claim(entry: Entry) -> bool:
    """Hold the trial's directory until it is told; False while another holds it (paused, or given it too: SQLite)."""
    try:
        if parallel.is_primary():
            recipe.lock(entry.workdir)
    except recipe.Busy:
        return parallel.agree(False)
    return parallel.agree(True)


def _drop_gone(study, entries: list, say) -> list:
    """The entries claimed, less those told elsewhere (given to another process too), released."""
    kept = [e for e in entries if _frozen(study, e.trial.number).state == TrialState.RUNNING]
    for e in [e for e in entries if e not in kept]:
        say(f"trial {e.trial.number}: finished by another process")
        recipe.unlock(e.workdir)
    return kept


@loop.one_summary()  # the model's table once, not once a trial
def optimize(
    study, space, config, workdir, trials, trial_seeds=1, batch=1, heartbeat=30, hooks=(), say=print, runtime=None
) -> None:
    """Run trials until `trials` are done (all processes count), `batch` at a time; runtime: a startup.Runtime."""
    runtime = runtime or startup.resolve(config, trial_seeds)
    waited, held = None, {}  # held: trial number -> (entry, its heartbeat), directory busy
    try:
        while True:
            fail_stale(study, heartbeat)  # stale: failed, re-queued by the callback
            now = study.get_trials(deepcopy=False)  # done: complete, pruned, or failed (not re-queued)
            done = sum(t.state.is_finished() and (t.state != TrialState.FAIL or "error" in t.user_attrs) for t in now)
            running = [t.number for t in now if t.state == TrialState.RUNNING]
            # A killed trial's retry runs even past the budget: another process may have asked for a fresh
            # trial while the retry was being queued (Optuna's ask pops a waiting trial only if it sees one).
            retries = sum(t.state == TrialState.WAITING and "failed_trial" in t.system_attrs for t in now)
            free = max(trials - done - len(running), retries)
            if done >= trials and not retries:
                return
            ready = [e for e, _ in held.values() if _claim(e)]
            for e in ready:
                held.pop(e.trial.number)[1].close()
            ready = _drop_gone(study, ready, say)
            if not ready and free <= 0:  # the rest are running: here, or elsewhere
                if waited != running:
                    busy = ", ".join(str(n) for n in running if n in held)
                    elsewhere = f"waiting for trial(s) {', '.join(map(str, running))}, running in another process (a dead one's is re-run after {2 * heartbeat}s without a heartbeat)"
                    say(f"waiting for trial(s) {busy}: a process still holds its directory" if busy else elsewhere)
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
            resumed = [e for e in entries if any(e.workdir.glob("**/checkpoints/*"))]  # each alone: its own checkpoint
            fresh = [e for e in entries if e not in resumed]
            runs = [[e] for e in resumed] + ([fresh] if fresh else [])
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
    pruned, lost = {}, {}  # lost: trials failed as stale by another process while this one slept
    try:
        heard = train_entries(group, trial_seeds, runtime, pruned, lost, hooks)
    except (loop.Diverged, ConfigError) as e:  # one trial diverged, or a combination of values no run can take
        failed = group if isinstance(e, ConfigError) else [group[(e.member or 0) // trial_seeds]]
        for entry in failed:
            entry.trial.set_user_attr("error", str(e))
            study.tell(entry.trial, state=TrialState.FAIL)
            say(f"trial {entry.trial.number}: failed: {e}")
        for other in [o for o in group if o not in failed]:  # re-queued (each resumes alone), or told if pruned
            tell(study, other, pruned) if other.trial.number in pruned and other.results else requeue(study, [other])
        return
    except BaseException:  # a signal, a lost process: every trial asked and not told runs again
        requeue(study, [*group, *(e for g in later for e in g)])
        raise
    for entry in group:
        if _frozen(study, entry.trial.number).state != TrialState.RUNNING:
            epoch = lost.get(entry.trial.number)
            say(
                f"trial {entry.trial.number}: failed as stale by another process (no heartbeat from this one within the grace period: was it paused?); its run stopped{f' after epoch {epoch}' if epoch else ''} and the trial's retry resumes it"
            )
        elif lost or (len(entry.results) < trial_seeds and entry.trial.number not in pruned):
            requeue(study, [entry])  # stopped short: by a late signal, or with a taken-over one
        else:
            state, value = tell(study, entry, pruned), _frozen(study, entry.trial.number).value
            say(f"trial {entry.trial.number}: {state}, validation {value:.2%}")
    if heard is not None:
        requeue(study, [e for g in later for e in g])
        raise loop.Interrupted(heard, f"interrupted ({signal.Signals(heard).name}) as a trial ended")


def _show(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table(study) -> list[dict]:
    """A row per trial: validation accuracy its score (a pruned trial's last report), test accuracy never told."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = t.state.name.lower().replace("fail", "failed")
        if t.state == TrialState.FAIL and "error" not in t.user_attrs:
            state = "re-queued"  # its run goes on in a later trial
        val = t.value if t.value is not None else t.intermediate_values.get(max(t.intermediate_values, default=None))
        attrs = {k: t.user_attrs.get(k) for k in ("test_accuracy", "epochs", "workdir", "error")}
        attrs["epochs"] = t.user_attrs.get("epochs", max(t.intermediate_values, default=0))
        rows.append({"trial": t.number, "state": state, "params": t.params, "val_accuracy": val, **attrs})
    return rows


def format_table(rows: list[dict]) -> str:
    names = sorted({n for r in rows for n in r["params"]})
    pct = lambda v: "" if v is None else f"{v:.2%}"  # noqa: E731
    head = ["trial", "state", *names, "val", "test", "epochs"]
    body = [
        [str(r["trial"]), r["state"], *(_show(r["params"].get(n, "")) for n in names)]
        + [pct(r["val_accuracy"]), pct(r["test_accuracy"]), str(r["epochs"])]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head, *body])


def summarize(study, space: dict, workdir: Path, plots: bool = True, say=print) -> dict:
    """Print the table and the best trial (on validation), write sweep.json and plots/ in `workdir` (process 0)."""
    rows = table(study)
    complete = [r for r in rows if r["state"] == "complete"]
    best = max(complete, key=lambda r: r["val_accuracy"], default=None)
    with warnings.catch_warnings(action="ignore"):  # "too few trials": the importances say it, equal
        weights = dict(optuna.importance.get_param_importances(study)) if len(complete) >= 3 else {}  # PED-ANOVA
    dists = {k: repr(v) for k, v in space.items()}
    out = {"study": study.study_name, "best": best, "importances": weights, "space": dists, "trials": rows}
    if not parallel.is_primary():
        return out
    say(format_table(rows))
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "failed", "re-queued")}
    say(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    if best:
        chosen = f"best trial {best['trial']} (chosen on validation {best['val_accuracy']:.2%})"
        say(f"{chosen}: test {best['test_accuracy']:.2%}, in {best['workdir']}")
    flags.write_json(str(workdir / "sweep.json"), out)
    if plots and rows:
        from mnist_jax import plots as plots_lib  # matplotlib only when drawing

        plots_lib.draw_sweep(study, workdir / "plots")
        say(f"Plots in {workdir / 'plots'}")
    return out


def check_config(config) -> str | None:
    """Check the fixed config before a study records it; a validation split set when absent, returned as a line."""
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
