"""XLA:CPU's kernel libraries: speed and precision of conv_bn's step under each XLA_FLAGS setting.

  python -m experiments.xla_cpu --data-dir ../shared/data/mnist

jaxlib 0.10.2 routes CPU convolutions, dots and fusions to XNNPACK, YNNPACK or oneDNN as
XLA_FLAGS say; the flags are read once, when JAX's CPU backend starts, so each setting runs in
its own process, the settings alternating --repeats times. Each process reports conv_bn's
training step at batch 64 (train.train_steps, one call per step, as the loop runs it on the
CPU): ms per step, the median of timed windows; and each operation's error against float64 on
conv_bn's shapes at batch 64: the worst over its layers of max|x32 - x64| / max|x64|, for the
convolutions' forward, kernel gradient and input gradient, the dense layers' dots (forward and
both gradients), batch norm's statistics, and the whole gradient of one batch's loss.
Results go to --json. docs/performance.md has the table and what was kept (config.xla_cpu).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

SETTINGS = {  # name: XLA_FLAGS; mnist_jax.config.XLA_CPU holds the ones kept as --xla-cpu
    "default": "",
    "ynn-no-conv": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    "ynn-no-reduce": "--xla_cpu_experimental_ynn_fusion_type=-reduce",
    "ynn-none": "--xla_cpu_experimental_ynn_fusion_type=invalid",
    "onednn-calls": "--xla_cpu_experimental_onednn_custom_call=true",
    "ynn-no-conv+onednn-calls": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
    " --xla_cpu_experimental_onednn_custom_call=true",
    "ynn-none+onednn-calls": "--xla_cpu_experimental_ynn_fusion_type=invalid"
    " --xla_cpu_experimental_onednn_custom_call=true",
    "no-xnnpack": "--xla_cpu_use_xnnpack=false",
}


def _rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def errors(data_dir: str | None) -> dict:
    """Each operation's worst relative error against float64 (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from experiments import conv_bn
    from mnist_jax import data, models

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)  # noqa: E731
    f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)  # noqa: E731

    def worst(fn, args):  # fn's outputs in float32 under this setting against float64
        lo, hi = jax.jit(fn)(*f32(args)), jax.jit(fn)(*f64(args))
        return max(_rel(a, b) for a, b in zip(jax.tree.leaves(lo), jax.tree.leaves(hi), strict=True))  # fmt: skip

    def vjps(fn, x, k, g):  # forward, kernel gradient, input gradient
        out, back = jax.vjp(fn, x, k)
        dx, dk = back(g)
        return out, dk, dx

    glorot = lambda shape: rng.uniform(-1, 1, shape) * np.sqrt(6 / (np.prod(shape[:-2]) * sum(shape[-2:])))  # fmt: skip # noqa: E731
    result = {"conv forward": 0.0, "conv kernel grad": 0.0, "conv input grad": 0.0}
    # conv_bn's layers at batch 64: (input [B,H,W,C], kernel [k,k,C,O], stride)
    for hw, c, k, o, s in ((28, 1, 3, 12, 1), (28, 12, 6, 24, 2), (14, 24, 6, 32, 2)):
        x = np.abs(rng.standard_normal((64, hw, hw, c)))  # after a relu: non-negative
        kern = glorot((k, k, c, o))
        g = rng.standard_normal((64, hw // s, hw // s, o)) / (64 * hw * hw)
        conv = lambda x, k, s=s: models.conv_on_cpu(  # noqa: E731  (the CPU path)
            x, k, (s, s), "SAME", dimension_numbers=models.NHWC
        )
        for i, name in enumerate(result):
            result[name] = max(result[name], worst(lambda x, k, g: vjps(conv, x, k, g)[i], (x, kern, g)))  # fmt: skip
    dots = [
        worst(
            lambda x, w, g: vjps(jnp.dot, x, w, g),
            (np.abs(rng.standard_normal((64, n))), glorot((n, m)), rng.standard_normal((64, m))),
        )  # fmt: skip
        for n, m in ((1568, 200), (200, 10))
    ]
    result["dot"] = max(dots)
    y = rng.standard_normal((64, 28, 28, 12)) * 0.5 + 2.0  # |mean| > std, as before a BN
    result["batch-norm statistics"] = worst(
        lambda y: (y.mean((0, 1, 2)), ((y - y.mean((0, 1, 2))) ** 2).mean((0, 1, 2))), (y,)
    )
    ds = data.load(data_dir)
    images = data.normalize(jnp.asarray(ds.train_images[:64]))
    labels = jnp.asarray(ds.train_labels[:64])
    config = conv_bn.get_config()
    model = models.build(**config.model)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False)

    def grad(dtype):
        m = models.build(**config.model, dtype=dtype)

        def loss(params, stats, x):
            logits, _ = m.apply({"params": params, "batch_stats": stats}, x, train=True,
                                rngs={"dropout": jax.random.PRNGKey(1)}, mutable=["batch_stats"])  # fmt: skip
            logits = logits.astype(dtype)  # the model ends in float32: keep the reference float64
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        return jax.jit(jax.grad(loss))

    lo = grad("float32")(*f32((variables["params"], variables["batch_stats"], images)))
    hi = grad("float64")(*f64((variables["params"], variables["batch_stats"], images)))
    per_tensor = {jax.tree_util.keystr(path): _rel(a, b) for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(lo), jax.tree.leaves(hi), strict=True)}  # fmt: skip
    result["whole gradient"] = max(per_tensor.values())
    result["worst tensor"] = max(per_tensor, key=per_tensor.get)
    return result


def child(data_dir: str | None, windows: int) -> dict:
    from experiments import conv_bn, timing

    config = conv_bn.get_config()
    config.steps_per_call = 1
    result = {"ms_per_step": None, "compile_s": None}
    if windows:  # 0: precision only
        speed = timing.measure_ours(config, data_dir, windows, window_images=1920)
        ms = [1000 * config.batch_size / ips for ips in speed["window_images_per_s"]]
        result.update(ms_per_step=round(statistics.median(ms), 2), compile_s=speed["first_step_s"])  # fmt: skip
    return result | {"errors": errors(data_dir)}


def main(argv=None):
    from mnist_jax import flags

    p = flags.Parser(prog="python -m experiments.xla_cpu", description=__doc__.splitlines()[0])
    flags.add(p, "data_dir")
    p.add_argument("--settings", default=",".join(SETTINGS), help="subset of " + ",".join(SETTINGS))
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting (default 2)")
    p.add_argument(
        "--windows",
        type=int,
        default=5,
        help="timed windows of 30 steps (default 5; 0: precision only)",
    )
    flags.add(p, json="runs/xla_cpu.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.data_dir, args.windows)))
        return
    names = [s for s in args.settings.split(",") if s]
    for name in names:
        if name not in SETTINGS:
            p.error(f"--settings: unknown {name!r}; choose from {', '.join(SETTINGS)}")
    runs = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names:
            env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=SETTINGS[name])
            cmd = [sys.executable, "-m", "experiments.xla_cpu", "--child", "--windows", str(args.windows)]  # fmt: skip
            if args.data_dir:
                cmd += ["--data-dir", args.data_dir]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                flags.fail(f"setting {name}: {proc.stderr.strip().splitlines()[-1:]}", 1)
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{name} (run {r + 1}): {runs[name][-1]['ms_per_step']} ms/step, whole gradient "
                  f"{runs[name][-1]['errors']['whole gradient']:.1e}", flush=True)  # fmt: skip
    ops = [op for op in runs[names[0]][0]["errors"] if op != "worst tensor"]
    print("\n| setting | ms/step | " + " | ".join(ops) + " | worst gradient |")
    print("| --- | ---: |" + " ---: |" * len(ops) + " --- |")
    for name in names:
        ms = ", ".join(f"{r['ms_per_step'] or float('nan'):.1f}" for r in runs[name])
        errs = " | ".join(f"{max(r['errors'][op] for r in runs[name]):.1e}" for op in ops)
        print(f"| {name} | {ms} | {errs} | {runs[name][0]['errors']['worst tensor']} |")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"settings": SETTINGS, "runs": runs}, f, indent=1)
    print(f"\nWrote {args.json}")


if __name__ == "__main__":
    main()
