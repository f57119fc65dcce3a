"""Per-operation profile of conv_bn's training step at batch 64: XLA:CPU against PyTorch's kernels.

  python -m experiments.profile_ops                                  # float32, both frameworks
  python -m experiments.profile_ops --dtype bfloat16 --settings default,ynn-no-conv

Each operation of one conv_bn step (the convolutions' forward, kernel and input gradients, the
dense layers' dots and both gradients, batch norm's forward and backward in training mode) runs
alone on conv_bn's shapes: for JAX one jitted function per operation (the stride-2 input
gradients through models.conv_on_cpu, as the CPU trains), for PyTorch the same aten kernels
that its autograd calls (torch.nn.functional, torch.nn.grad; NCHW, as the benchmark's PyTorch
loop). Each framework and XLA_FLAGS setting (experiments.xla_cpu.SETTINGS) runs in its own
process, alternating --rounds times; each operation's figure is the median of --calls timed
calls, and the table gives the fastest round's. The sum leaves out relus, dropout, the loss and
Adam, so compare it with the benchmark's ms per step to see what they cost. Each child also
measures the cores' matmul peak as its framework reaches it (a 2048^3 product), and JAX's (in
float32) times other ways to compute its slowest operations (`alternatives`). Results in --json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

B = 64
CONVS = ((28, 1, 3, 12, 1), (28, 12, 6, 24, 2), (14, 24, 6, 32, 2))  # input side, C, kernel, O, stride
DENSES = ((1568, 200), (200, 10))
NORMS = ((28, 12), (14, 24), (7, 32), (1, 200))  # batch norm's input side and channels (1: the dense layer)


def _median_ms(fn, calls: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def ops_jax(dtype: str, calls: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mnist_jax import models

    rng = np.random.default_rng(0)
    dt = jnp.dtype(dtype)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), dt)  # noqa: E731
    out = {}

    def timed(name, fn, *args):
        f = jax.jit(fn)
        out[name] = _median_ms(lambda: jax.block_until_ready(f(*args)), calls)

    for i, (hw, c, k, o, s) in enumerate(CONVS, 1):
        x, kern, g = arr(B, hw, hw, c), arr(k, k, c, o), arr(B, hw // s, hw // s, o)
        conv = lambda x, w, s=s: models.conv_on_cpu(x, w, (s, s), "SAME", dimension_numbers=models.NHWC)  # noqa: E731
        timed(f"conv{i} forward", conv, x, kern)
        kernel_grad = lambda x, w, g, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](g)[0]  # noqa: E731
        input_grad = lambda x, w, g, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]  # noqa: E731
        timed(f"conv{i} kernel grad", kernel_grad, x, kern, g)
        if i > 1:  # the first layer's input is the images: no gradient taken
            timed(f"conv{i} input grad", input_grad, x, kern, g)
    for i, (n, m) in enumerate(DENSES, 1):
        x, w, g = arr(B, n), arr(n, m), arr(B, m)
        timed(f"dense{i} forward", jnp.dot, x, w)
        timed(f"dense{i} grads", lambda x, w, g: jax.vjp(jnp.dot, x, w)[1](g), x, w, g)

    def norm(y, offset):  # ConvNet's batch norm in training: two-pass variance, no scale, epsilon 1e-3
        axes = tuple(range(y.ndim - 1))
        y32 = y.astype(jnp.float32)
        mean = y32.mean(axes)
        var = ((y32 - mean) ** 2).mean(axes)
        return ((y32 - mean) * jax.lax.rsqrt(var + 1e-3) + offset).astype(y.dtype)

    for i, (hw, c) in enumerate(NORMS, 1):
        y = arr(B, hw, hw, c) if hw > 1 else arr(B, c)
        off, g = jnp.zeros(c, jnp.float32), arr(*y.shape)
        timed(f"batch norm{i} forward+backward", lambda y, off, g: jax.vjp(norm, y, off)[1](g), y, off, g)
    return out


def alternatives(calls: int) -> dict:
    """Other ways to compute our slowest operations against the way the CPU computes them by default:
    ms for each, and the worst relative error against it (float32, conv_bn's shapes)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mnist_jax import models

    rng = np.random.default_rng(0)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    conv = lambda x, w, s: models.conv_on_cpu(x, w, (s, s), "SAME", dimension_numbers=models.NHWC)  # noqa: E731

    def col2im(x, w, g):  # conv2's input gradient: one matmul into patches, then 9 shifted adds (space-to-depth)
        d = jnp.einsum("bhwo,ijco->bhwijc", g, models._kernel_to_depth(w))  # [B,14,14,3,3,48]
        out = jnp.zeros((B, 16, 16, 48), g.dtype)
        for i in range(3):
            for j in range(3):
                out = out.at[:, i : i + 14, j : j + 14, :].add(d[:, :, :, i, j, :])
        return out[:, 1:15, 1:15, :].reshape(B, 14, 14, 2, 2, 12).transpose(0, 1, 3, 2, 4, 5).reshape(B, 28, 28, 12)

    x1, w1 = arr(B, 28, 28, 1), arr(3, 3, 1, 12)
    x2, w2, g2 = arr(B, 28, 28, 12), arr(6, 6, 12, 24), arr(B, 14, 14, 24)
    pairs = {  # name: (the plain path, the alternative, arguments)
        "conv1 forward: 9 shifted multiply-adds (conv_grad shifts)": (lambda x, w: conv(x, w, 1), models.conv_shifts, (x1, w1)),
        "conv2 input grad: matmul + col2im": (
            lambda x, w, g: jax.vjp(lambda x: conv(x, w, 2), x)[1](g)[0], col2im, (x2, w2, g2)),
    }  # fmt: skip
    out = {}
    for name, (plain, alt, args) in pairs.items():
        plain, alt = jax.jit(plain), jax.jit(alt)
        a, b = np.asarray(plain(*args), np.float64), np.asarray(alt(*args), np.float64)
        out[name] = {
            "plain_ms": _median_ms(lambda: jax.block_until_ready(plain(*args)), calls),
            "alternative_ms": _median_ms(lambda: jax.block_until_ready(alt(*args)), calls),
            "error": float(np.max(np.abs(a - b)) / np.max(np.abs(a))),
        }
    return out


def peak_gflops(framework: str, dtype: str, n: int = 2048) -> float:
    """The cores' matmul peak as each framework reaches it: an n x n x n product, median of 20."""
    if framework == "pytorch":
        import torch

        a = torch.randn(n, n, dtype=getattr(torch, dtype))
        ms = _median_ms(lambda: a @ a, 20)
    else:
        import jax
        import jax.numpy as jnp

        a, f = jnp.ones((n, n), dtype), jax.jit(jnp.dot)
        ms = _median_ms(lambda: jax.block_until_ready(f(a, a)), 20)
    return 2 * n**3 / ms / 1e6


def ops_torch(dtype: str, calls: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    arr = lambda *shape: torch.randn(*shape, dtype=dt)  # noqa: E731
    out = {}

    def timed(name, fn):
        with torch.no_grad():
            out[name] = _median_ms(fn, calls)

    for i, (hw, c, k, o, s) in enumerate(CONVS, 1):
        pad = (k - s) // 2  # Keras's SAME on these even sides: symmetric
        x, kern, g = arr(B, c, hw, hw), arr(o, c, k, k), arr(B, o, hw // s, hw // s)
        timed(f"conv{i} forward", lambda x=x, kern=kern, s=s, pad=pad: F.conv2d(x, kern, stride=s, padding=pad))
        timed(f"conv{i} kernel grad",
              lambda x=x, kern=kern, g=g, s=s, pad=pad: torch.nn.grad.conv2d_weight(x, kern.shape, g, s, pad))  # fmt: skip
        if i > 1:
            timed(f"conv{i} input grad",
                  lambda x=x, kern=kern, g=g, s=s, pad=pad: torch.nn.grad.conv2d_input(x.shape, kern, g, s, pad))  # fmt: skip
    for i, (n, m) in enumerate(DENSES, 1):
        x, w, g = arr(B, n), arr(m, n), arr(B, m)
        timed(f"dense{i} forward", lambda x=x, w=w: F.linear(x, w))
        timed(f"dense{i} grads", lambda x=x, w=w, g=g: (g @ w, g.t() @ x))
    for i, (hw, c) in enumerate(NORMS, 1):
        y = (arr(B, c, hw, hw) if hw > 1 else arr(B, c)).requires_grad_()
        off, g = torch.zeros(c, requires_grad=True), arr(*y.shape)

        def fwd_bwd(y=y, off=off, g=g):
            with torch.enable_grad():
                z = F.batch_norm(y, None, None, None, off, training=True, eps=1e-3)
                return torch.autograd.grad(z, (y, off), g)

        timed(f"batch norm{i} forward+backward", fwd_bwd)
    return out


def main(argv=None):
    from experiments.xla_cpu import SETTINGS
    from mnist_jax import flags

    p = flags.Parser(prog="python -m experiments.profile_ops", description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="what both compute in")
    p.add_argument("--settings", default="default", help="XLA_FLAGS settings for JAX: " + ",".join(SETTINGS))
    p.add_argument("--frameworks", default="jax,pytorch", help="subset of jax,pytorch")
    p.add_argument("--rounds", type=int, default=3, help="each framework's runs, alternating (default 3)")
    p.add_argument("--calls", type=int, default=50, help="timed calls per operation (default 50)")
    flags.add(p, json="runs/profile_ops.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        fn = ops_torch if args.child == "pytorch" else ops_jax
        result = {"ops": fn(args.dtype, args.calls), "peak_gflops": peak_gflops(args.child, args.dtype)}
        if args.child == "jax" and args.dtype == "float32":
            result["alternatives"] = alternatives(args.calls)
        print(json.dumps(result))
        return
    settings = [s for s in args.settings.split(",") if s]
    frameworks = [f for f in args.frameworks.split(",") if f]
    for s in settings:
        if s not in SETTINGS:
            p.error(f"--settings: unknown {s!r}; choose from {', '.join(SETTINGS)}")
    for f in frameworks:
        if f not in ("jax", "pytorch"):
            p.error(f"--frameworks: unknown {f!r}; choose from jax,pytorch")
    columns = [f"jax {s}" for s in settings if "jax" in frameworks] + ["pytorch"] * ("pytorch" in frameworks)
    runs = {c: [] for c in columns}
    for r in range(args.rounds):
        for column in columns:
            child = "pytorch" if column == "pytorch" else "jax"
            flags_ = "" if child == "pytorch" else SETTINGS[column.split()[1]]
            env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags_)
            cmd = [sys.executable, "-m", "experiments.profile_ops", "--child", child, "--dtype", args.dtype,
                   "--calls", str(args.calls)]  # fmt: skip
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                flags.fail(f"{column}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}", 1)
            runs[column].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            last = runs[column][-1]
            print(f"round {r + 1} {column}: {sum(last['ops'].values()):.2f} ms in all; "
                  f"matmul peak {last['peak_gflops']:.0f} GFLOP/s", flush=True)  # fmt: skip
    best = {c: min((run["ops"] for run in rs), key=lambda ops: sum(ops.values())) for c, rs in runs.items()}
    ops = list(best[columns[0]])
    print(f"\nms, batch 64, {args.dtype}, the fastest of {args.rounds} rounds (median of {args.calls} calls each)")
    print("| operation | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for op in ops + ["sum"]:
        cells = [f"{sum(best[c].values()) if op == 'sum' else best[c].get(op, float('nan')):.2f}" for c in columns]
        print(f"| {op} | " + " | ".join(cells) + " |")
    peaks = [f"{max(run['peak_gflops'] for run in runs[c]):.0f}" for c in columns]
    print("| matmul peak, GFLOP/s (2048^3, the best round) | " + " | ".join(peaks) + " |")
    alts = [(c, run["alternatives"]) for c in columns for run in runs[c] if "alternatives" in run]
    if alts:
        print(
            "\nJAX alternatives to its slowest operations, ms (plain path -> alternative), error against the plain path"
        )
        for name in alts[0][1]:
            cells = ", ".join(f"{c} {a[name]['plain_ms']:.2f} -> {a[name]['alternative_ms']:.2f}" for c, a in alts)
            print(f"  {name}: {cells}; error {max(a[name]['error'] for _, a in alts):.1e}")
    flags.write_json(args.json, {"dtype": args.dtype, "calls": args.calls, "runs": runs})


if __name__ == "__main__":
    main()
