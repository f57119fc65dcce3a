"""The member axis: the runs that train together as one group, in one place.

A group's members are seeds config.seed, config.seed + 1, ..., one per work directory. vmapped,
they train in one compiled program (`train.train_seeds`: `jax.vmap` over the initial weights,
the data orders and the dropout keys), their states stacked on a leading axis and spread over
the devices; else a group is one run in the plain program, its batch spread over the devices.
`Members` is the only code that knows which: the loop sees arrays with a leading members axis,
`take(state, i)`, and the words it prints. A member is a seed, and may have its own values of
the numbers that are data in the state (MEMBER_FIELDS: a sweep's trials train together so).
"""

import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from mnist_jax import data, flags, parallel
from mnist_jax import train as train_lib
from mnist_jax.config import ConfigError

# What may differ between the members of one program: the seed, and numbers that are data in the
# state (the optimizer's, optim.py; the loss's, TrainState.loss_args), not constants of its program.
MEMBER_FIELDS = ("seed", "opt.lr", "opt.weight_decay", "loss.label_smoothing")


def member_configs(config, given: list | None, n: int) -> list:
    """Each member's config: `config` with the MEMBER_FIELDS of its `given` config (default:
    seeds config.seed, config.seed + 1, ...). ConfigError if they differ in anything else."""
    given = given or [_with(config, {"seed": config.seed + i}) for i in range(n)]
    program = lambda c: {k: v for k, v in flags.leaves(c) if k not in (*MEMBER_FIELDS, "name", "workdir", "seeds")}  # noqa: E731
    for g in given:
        if program(g) != program(given[0]):
            diff = sorted(k for k in program(g) if program(g)[k] != program(given[0]).get(k))
            raise ConfigError(
                f"members trained together differ only in {', '.join(MEMBER_FIELDS)}; these differ in {', '.join(diff)}"
            )
    return [_with(config, {p: v for p, v in flags.leaves(g) if p in MEMBER_FIELDS}) for g in given]


def _with(config, values: dict):
    """A copy of config with {dotted path: value} set."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.update_from_flattened_dict(values)
    return c


class Members:
    """A group's members (see the module's doc); vmap: in one program."""

    def __init__(
        self, config, workdirs: list, mesh, vmap: bool, configs: list | None = None, labels: list | None = None
    ):
        """configs: each member's (member_configs; default seeds config.seed, + 1, ...);
        labels: what a line about a member calls it (default "seed <s>")."""
        assert vmap or len(workdirs) == 1, "runs that do not train vmapped train one at a time"
        n = len(workdirs)
        self.configs = configs or member_configs(config, None, n)
        if vmap and n % mesh.size:
            raise ConfigError(
                f"--seeds: {n} seeds do not spread over {mesh.size} devices; use a multiple of {mesh.size}, or --devices 1"
            )
        if vmap and jax.process_count() > 1:
            raise ConfigError("--seed-mode vmap: one process only; use --seed-mode turn")
        if not vmap:
            parallel.check_batch(config.batch_size, mesh)
        self.workdirs, self.mesh, self.vmap = [Path(w) for w in workdirs], mesh, vmap
        self.mode = "vmap" if vmap else "turn"
        self.seeds = [c.seed for c in self.configs]
        self.labels = labels or [f"seed {s}" for s in self.seeds]
        self.batch = config.batch_size
        keys = [tuple(jax.random.split(jax.random.PRNGKey(s), 3)) for s in self.seeds]
        self.init_rngs, self.data_rngs, dropout = zip(*keys)
        self.dropout_rngs = self.put(dropout)
        self.sharding = parallel.batch_sharding(mesh) if mesh.size > 1 and not vmap else None
        self.compiled, self.compile_s = {}, 0.0

    def put(self, trees: list):
        """One tree per member, placed: stacked over the devices, or replicated (one member)."""
        if not self.vmap:
            return parallel.put_replicated(trees[0], self.mesh)
        # Leaf by leaf: each state's optimizer is its own object, so their tree metadata differ.
        leaves = zip(*(jax.device_get(jax.tree.leaves(t)) for t in trees))
        stacked = jax.tree.unflatten(jax.tree.structure(trees[0]), [np.stack(x) for x in leaves])
        return jax.device_put(stacked, parallel.seed_sharding(self.mesh))

    def take(self, tree, i: int):
        """Member i's part of a placed tree."""
        return jax.tree.map(lambda x: x[i], tree) if self.vmap else tree

    def _compiled(self, key, lower):
        if key not in self.compiled:
            t = time.perf_counter()
            self.compiled[key] = lower().compile()
            self.compile_s += time.perf_counter() - t
        return self.compiled[key]

    def train(self, state, images, labels, order, start: int, steps: int, config, step_fn):
        """`steps` steps from row `start` of `order` (Members.order): (state, metrics on the
        device; Members.to_host gives them [members, steps])."""
        args = (state, images, labels, order, np.int32(start), self.dropout_rngs)
        static = dict(steps=steps, shift=config.data.augment_shift, step=step_fn)
        fn = train_lib.train_seeds if self.vmap else train_lib.train_steps
        if not self.vmap:
            static["sharding"] = self.sharding
        if config.debug_nans:  # jax_debug_nans checks jitted calls, not compiled (AOT) ones
            state, m = train_lib.UNDONATED[fn](*args, **static)
        else:
            state, m = self._compiled(("train", steps), lambda: fn.lower(*args, **static))(*args)
        return state, m  # [members, steps] vmapped, else [steps]: to_host adds the axis

    def evaluate(self, state, images, labels, metrics) -> dict:
        """`train.eval_dataset`'s output on the host, each value [members, ...]."""
        fn, static = train_lib.eval_seeds, dict(metrics=metrics)
        if not self.vmap:
            fn, static = train_lib.eval_dataset, dict(static, sharding=self.sharding)
        lower = lambda: fn.lower(state, images, labels, **static)  # noqa: E731
        return self.to_host(self._compiled(("eval", images.shape), lower)(state, images, labels))

    def to_host(self, tree):
        """A tree of the compiled calls' outputs on the host, each with a leading members axis."""
        tree = parallel.to_host(tree)
        return tree if self.vmap else jax.tree.map(lambda v: v[None], tree)

    def order(self, epoch: int, n: int, batch: int):
        """The epoch's batch indices on the device, each member's from its seed: [members, S, B]
        stacked, or one member's [S, B]."""
        return self.put([np.asarray(data.epoch_batches(r, epoch, n, batch)) for r in self.data_rngs])

    # What a person reads: one member is the run; several are seeds and their spread.
    def label(self, i: int) -> str:
        return f"{self.labels[i]}: " if len(self.seeds) > 1 else ""

    @property
    def where(self) -> Path:
        return self.workdirs[0] if len(self.seeds) == 1 else self.workdirs[0].parent

    @property
    def saved_in(self) -> Path:
        return self.where / "checkpoints" if len(self.seeds) == 1 else self.where

    @property
    def where_all(self) -> str:
        if len(self.seeds) == 1:
            return f"work directory {self.workdirs[0]}"
        if not self.labels[0].startswith("seed "):  # a sweep's trials
            return f"work directories {', '.join(map(str, self.workdirs))}"
        return f"work directories {self.where}/seed_*"

    def spread(self, values, fmt: str, full: bool = False) -> str:
        """Members' values: the one, or their median (and range: full)."""
        values = np.asarray(values, np.float64)
        if len(values) == 1:
            return format(values[0], fmt)
        extra = f" ({format(values.min(), fmt)} to {format(values.max(), fmt)})" if full else ""
        return f"{format(np.median(values), fmt)} median{extra}"

    def describe(self) -> list[str]:
        n, devices = len(self.seeds), self.mesh.size
        if self.vmap:
            per = f", {n // devices} per device on {devices} devices" if devices > 1 else ""
            which = (
                f"{n} seeds ({self.seeds[0]}-{self.seeds[-1]})"
                if self.labels[0].startswith("seed ")
                else f"{n} members ({', '.join(self.labels)})"
            )
            return [f"{which} in one vmapped program{per}"]
        if devices > 1:
            return [
                f"Data-parallel over {devices} {self.mesh.devices.flat[0].platform} devices in "
                f"{jax.process_count()} process(es): {self.batch // devices} images per device "
                "per step"
            ]
        return []
