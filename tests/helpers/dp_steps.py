"""Train conv_bn a few steps on 1 device and on N devices (same global batches); print JSON.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=N: `python -m tests.helpers.dp_steps N
STEPS DATA_DIR sgd,adam`, or as a `tests.helpers.commands` item (tests/test_parallel.py).
"""

import json
import sys

import jax
import numpy as np

from experiments import conv_bn
from mnist_jax import data, parallel, train


def run(devices: int, steps: int, images, labels, opt: str):
    config = conv_bn.get_config()
    # Adam's first steps are lr * sign(gradient): float-order noise in a near-zero gradient
    # flips whole updates, so parameters are compared under SGD; losses under both.
    config.opt.name = opt
    mesh = parallel.make_mesh(devices)
    sharding = parallel.batch_sharding(mesh) if devices > 1 else None
    state = parallel.put_replicated(train.create_train_state(config, jax.random.PRNGKey(0)), mesh)
    x, y = parallel.put_replicated((images, labels), mesh)
    idx = np.arange(steps * 64, dtype=np.int32).reshape(steps, 64)
    losses = []
    for i in range(steps):
        state, m = train.train_batch(state, x, y, idx[i], jax.random.PRNGKey(1), sharding=sharding)
        losses.append(float(parallel.to_host(m["loss"])))
    ev = train.eval_dataset(state, x[:1000], y[:1000], sharding=sharding)
    shards = {str(s.device) for s in state.params["Conv_0"]["kernel"].addressable_shards}
    return state, losses, float(ev["accuracy"]), len(shards)


def measure(n: str, steps: str, data_dir: str, opts: str) -> dict:
    """The 1-device and n-device runs of `steps` steps under each optimizer in opts ("sgd,adam")."""
    n, steps = int(n), int(steps)
    ds = data.load_idx(data_dir)
    images, labels = ds.train_images[: steps * 64], ds.train_labels[: steps * 64]
    diff = lambda a, b: max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max() / (np.abs(np.asarray(x)).max() + 1e-12))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )
    out = {"devices": len(jax.devices())}
    for opt in opts.split(","):
        one, loss1, acc1, _ = run(1, steps, images, labels, opt)
        many, loss_n, acc_n, copies = run(n, steps, images, labels, opt)
        out[opt] = {
            "param_copies": copies,
            "loss_1": loss1,
            "loss_n": loss_n,
            "params_rel_diff": diff(one.params, many.params),
            "batch_stats_rel_diff": diff(one.batch_stats, many.batch_stats),
            "eval_acc_1": acc1,
            "eval_acc_n": acc_n,
        }
    return out


if __name__ == "__main__":
    print(json.dumps(measure(*sys.argv[1:5])))
