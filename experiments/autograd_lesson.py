"""Autograd and backpropagation, the JAX way: the companion lesson, one function per section.

Over 400 lines in one file on purpose: the twelve sections are one lesson, read top to bottom.

PyTorch records a graph as tensors with `requires_grad=True` are used, `.backward()` fills each
leaf's `.grad`, gradients accumulate until `zero_grad()`, and `optimizer.step()` reads them. In JAX
differentiation is a function transformation: `jax.grad(f)` is a new function returning the
gradient; nothing is recorded on the arrays and nothing accumulates. Each section returns a
`Section` whose `values` the tests check and whose `lines` `experiments/autograd.py` prints.
"""

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class Section(NamedTuple):
    title: str
    lines: list[str]
    values: dict


def gradient_of_a_sum() -> Section:
    """1. PyTorch: `x.requires_grad_(); y.sum().backward(); x.grad`. JAX: `jax.grad(f)(x)`."""
    x = jnp.array([1.0, 2.0, 3.0])
    grad = jax.grad(lambda x: jnp.sum(x**2 + 2 * x + 1))(x)
    return Section(
        "Gradient of a sum",
        [
            f"y = sum(x^2 + 2x + 1), x = {x}",
            f"jax.grad -> dy/dx = {grad}",
            "why: dy/dx_i = 2 x_i + 2; grad needs a scalar output, hence the sum (as .backward())",
        ],
        {"grad": grad},
    )


def computation_graph() -> Section:
    """2. The graph PyTorch records on the fly is, in JAX, a jaxpr traced from the function."""

    def z(x, y):
        return x * y + x**2

    jaxpr = jax.make_jaxpr(z)(2.0, 3.0)
    value = z(2.0, 3.0)
    dzdx, dzdy = jax.grad(z, argnums=(0, 1))(2.0, 3.0)
    return Section(
        "The computation graph",
        [
            f"z = x*y + x^2 at x = 2, y = 3: z = {value}; the graph JAX records (jax.make_jaxpr):",
            *("    " + line for line in str(jaxpr).splitlines()),
            f"jax.grad(z, argnums=(0, 1)) -> dz/dx = {dzdx}, dz/dy = {dzdy}",
            "why: dz/dx = y + 2x = 7, dz/dy = x = 2; each primitive in the jaxpr has a known derivative",
        ],
        {"jaxpr": str(jaxpr), "z": value, "dz_dx": dzdx, "dz_dy": dzdy},
    )


def linear_model_loss(w, x, y):
    """Mean squared error of y ~ x @ w, the model of the accumulation example."""
    return jnp.mean((x @ w - y) ** 2)


def no_zero_grad(micro_batches: int = 4) -> Section:
    """3. No `zero_grad()`: gradients are returned, not accumulated. Accumulate when you mean to."""
    g1 = jax.grad(lambda x: x**2 + 3 * x + 2)(2.0)
    g2 = jax.grad(lambda x: x**3)(2.0)  # not 7 + 12: nothing was stored by the first call
    # Explicit accumulation over micro-batches with optax.MultiSteps: it averages the k gradients
    # and applies one update, which equals one step on the whole batch (equal micro-batch sizes).
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 3)), jnp.float32)
    y = x @ jnp.array([1.0, -2.0, 0.5]) + 0.1
    w0 = jnp.zeros(3)
    sgd = optax.sgd(0.1)
    grad_fn = jax.jit(jax.grad(linear_model_loss))
    full, _ = sgd.update(grad_fn(w0, x, y), sgd.init(w0))
    w_full = optax.apply_updates(w0, full)
    acc = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=micro_batches)
    w, state, update = w0, acc.init(w0), jax.jit(acc.update)
    for xb, yb in zip(jnp.split(x, micro_batches), jnp.split(y, micro_batches)):
        updates, state = update(grad_fn(w, xb, yb), state, w)
        w = optax.apply_updates(w, updates)  # zero updates until the k-th micro-batch
    return Section(
        "Gradients are returned, not accumulated",
        [
            f"y = x^2 + 3x + 2 at x = 2: dy/dx = {g1}",
            f"y = x^3 at x = 2: dy/dx = {g2}   (not {g1 + g2}: no .grad to zero between calls)",
            f"to accumulate on purpose: optax.MultiSteps over {micro_batches} micro-batches -> w = {w}",
            f"one SGD step on the whole batch                       -> w = {w_full}",
            f"why: the mean of the {micro_batches} micro-batch gradients is the whole batch's gradient",
        ],
        {"grad_quadratic": g1, "grad_cube": g2, "w_accumulated": w, "w_full_batch": w_full},
    )


CHECKS: dict[str, tuple[Callable, Callable]] = {
    "sin(x) * x": (lambda x: jnp.sin(x) * x, lambda x: jnp.cos(x) * x + jnp.sin(x)),
    "exp(-x^2)": (lambda x: jnp.exp(-(x**2)), lambda x: -2 * x * jnp.exp(-(x**2))),
    "log(1 + x^2)": (lambda x: jnp.log1p(x**2), lambda x: 2 * x / (1 + x**2)),
    "tanh(x)^3": (lambda x: jnp.tanh(x) ** 3, lambda x: 3 * jnp.tanh(x) ** 2 / jnp.cosh(x) ** 2),
}
FD_STEP, FD_TOL, ANALYTIC_TOL = 1e-5, 1e-8, 1e-12


def finite_differences() -> Section:
    """4. jax.grad against central differences (f(x+h) - f(x-h)) / 2h and the analytic derivative."""
    lines, errors = [], {}
    with jax.enable_x64(True):  # float64 here only: differences of floats need the precision
        xs = jnp.array([-1.5, 0.3, 2.0], jnp.float64)
        for name, (f, df) in CHECKS.items():
            grad = jax.vmap(jax.grad(f))(xs)
            fd = (f(xs + FD_STEP) - f(xs - FD_STEP)) / (2 * FD_STEP)
            errors[name] = (
                float(jnp.max(jnp.abs(grad - fd))),
                float(jnp.max(jnp.abs(grad - df(xs)))),
            )
            lines.append(
                f"{name:13s} max |grad - central diff| = {errors[name][0]:.1e}, "
                f"|grad - analytic| = {errors[name][1]:.1e}"
            )
    lines.append(
        f"why: float64, h = {FD_STEP}: differences err by O(h^2) ~ 1e-10 (tolerance "
        f"{FD_TOL}); grad is exact up to rounding (tolerance {ANALYTIC_TOL})"
    )
    return Section("jax.grad against finite differences", lines, {"errors": errors})


def two_layer_forward(params, x):
    h = jax.nn.sigmoid(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"], h


def two_layer_loss(params, x, labels):
    logits, _ = two_layer_forward(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def backprop_by_hand(params, x, labels):
    """The chain rule written out for L = mean CE(softmax(sigmoid(x W1 + b1) W2 + b2), labels):

    dL/dlogits = (softmax(logits) - onehot(labels)) / B
    dL/dW2 = h^T dL/dlogits           dL/db2 = sum_batch dL/dlogits
    dL/dh  = dL/dlogits W2^T
    dL/dz1 = dL/dh * h * (1 - h)      (sigmoid' = s (1 - s))
    dL/dW1 = x^T dL/dz1               dL/db1 = sum_batch dL/dz1
    """
    logits, h = two_layer_forward(params, x)
    d_logits = (jax.nn.softmax(logits) - jax.nn.one_hot(labels, logits.shape[-1])) / x.shape[0]
    d_z1 = (d_logits @ params["w2"].T) * h * (1 - h)
    return {"w1": x.T @ d_z1, "b1": d_z1.sum(0), "w2": h.T @ d_logits, "b2": d_logits.sum(0)}


def hand_vs_grad() -> Section:
    """5. What `.backward()` does for a two-layer net, by hand, against jax.grad."""
    rng = np.random.default_rng(0)  # numpy draws: no per-op compilation for a demo's inputs
    params = {
        "w1": rng.normal(0, 0.05, (784, 64)).astype(np.float32),
        "b1": np.zeros(64, np.float32),
        "w2": rng.normal(0, 0.1, (64, 10)).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }
    x = rng.uniform(size=(32, 784)).astype(np.float32)
    labels = rng.integers(0, 10, 32)
    # jit: one compilation for each function, rather than one per operation
    by_hand = jax.device_get(jax.jit(backprop_by_hand)(params, x, labels))
    auto = jax.device_get(jax.jit(jax.grad(two_layer_loss))(params, x, labels))
    diffs = {n: float(np.abs(by_hand[n] - auto[n]).max()) for n in params}
    scale = {n: float(np.abs(auto[n]).max()) for n in params}
    return Section(
        "Backpropagation by hand vs jax.grad",
        [
            "784 -> dense 64 sigmoid -> dense 10 -> softmax cross-entropy, batch 32",
            *(f"d loss/d {n}: max |hand - jax.grad| = {diffs[n]:.1e} (largest entry {scale[n]:.1e})" for n in params),
            "why: jax.grad applies the same chain rule, primitive by primitive, in reverse order",
        ],
        {"by_hand": by_hand, "jax_grad": auto, "max_diff": diffs},
    )


def linear_regression(epochs: int = 100, seed: int = 0) -> Section:
    """6. The training loop: `loss.backward(); optimizer.step()` becomes grad + optax update."""
    rng = np.random.default_rng(seed)  # the lesson's torch.randn: other draws, the same law
    x = jnp.asarray(rng.normal(size=(100, 1)), jnp.float32)
    y = 3 * x + jnp.asarray(rng.normal(size=(100, 1)), jnp.float32)
    model = nn.Dense(1)
    params = model.init(jax.random.PRNGKey(seed), x)
    w0 = float(params["params"]["kernel"][0, 0])
    tx = optax.sgd(0.01)
    opt_state = tx.init(params)

    def mse(params):
        return jnp.mean((model.apply(params, x) - y) ** 2)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(mse)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    lines, losses = (
        ["y = 3x + noise, 100 points, nn.Dense(1), MSE, optax.sgd(0.01), full batch"],
        [],
    )
    for epoch in range(epochs):  # the loss before each epoch's step, printed from epoch 0
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
        if epoch % 10 == 0:
            lines.append(f"epoch {epoch:3d}  loss {float(loss):.4f}")
    w = float(params["params"]["kernel"][0, 0])
    lines.append(f"learned weight {w:.4f} (true 3, initial {w0:.4f}), bias {float(params['params']['bias'][0]):.4f}")  # fmt: skip
    lines.append("why not 3 yet: each step shrinks the gap to 3 by 1 - 2 * 0.01 * var(x), about 0.98; 0.98^100 = 0.13")  # fmt: skip
    return Section(
        "Training with gradients: linear regression",
        lines,
        {"losses": losses, "weight": w, "initial_weight": w0},
    )


def nan_and_stable_loss() -> Section:
    """7. The codelab's "NaN???": log(softmax(logits)) underflows; the fused loss does not."""
    logits = jnp.array([[1000.0, 0.0, -1000.0]], jnp.float32)
    labels = jnp.array([2])

    def naive(logits):
        return -jnp.log(jax.nn.softmax(logits))[0, labels[0]]

    def fused(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)[0]

    naive_loss, naive_grad = jax.jit(jax.value_and_grad(naive))(logits)
    fused_loss, fused_grad = jax.jit(jax.value_and_grad(fused))(logits)
    return Section(
        'Why the loss becomes NaN (the codelab\'s "NaN???")',
        [
            f"logits {logits[0]}, true class 2, float32",
            f"naive -log(softmax(logits)): loss {naive_loss}, gradient {naive_grad[0]}",
            f"optax.softmax_cross_entropy:  loss {fused_loss}, gradient {fused_grad[0]}",
            "why: softmax gives exactly 0 for class 2, log(0) = -inf and its gradient inf * 0 = nan; "
            "the fused loss computes log-softmax as logits - logsumexp(logits), never taking log(0)",
        ],
        {
            "naive_loss": naive_loss,
            "naive_grad": naive_grad,
            "fused_loss": fused_loss,
            "fused_grad": fused_grad,
        },
    )


@jax.custom_vjp
def clip_gradient(x, limit):
    """Identity on the way forward; on the way back the gradient is clipped to [-limit, limit]."""
    return x


def _clip_fwd(x, limit):
    return x, limit


def _clip_bwd(limit, g):
    return jnp.clip(g, -limit, limit), None


clip_gradient.defvjp(_clip_fwd, _clip_bwd)


@jax.custom_vjp
def round_ste(x):
    """Round forward, identity backward: the straight-through estimator."""
    return jnp.round(x)


round_ste.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))


def custom_gradients() -> Section:
    """8. PyTorch's `autograd.Function` with its own `backward` is `jax.custom_vjp` in JAX."""
    x = jnp.array([0.5, 2.0, -3.0])
    plain = jax.grad(lambda x: jnp.sum(10 * x))(x)
    clipped = jax.grad(lambda x: jnp.sum(10 * clip_gradient(x, 1.0)))(x)
    round_grad = jax.grad(lambda x: jnp.sum(jnp.round(x) * 4))(x)
    ste_grad = jax.grad(lambda x: jnp.sum(round_ste(x) * 4))(x)
    return Section(
        "A custom backward rule with jax.custom_vjp",
        [
            f"d/dx sum(10 x) = {plain}; d/dx sum(10 clip_gradient(x, 1)) = {clipped}",
            f"d/dx sum(4 round(x)) = {round_grad}; with the straight-through round = {ste_grad}",
            "why: custom_vjp replaces the derivative JAX would derive with the rule we wrote; "
            "the forward values are unchanged",
        ],
        {"plain": plain, "clipped": clipped, "round_grad": round_grad, "ste_grad": ste_grad},
    )


def small_function(v):
    return jnp.array([v[0] * v[1], jnp.sin(v[0]), v[1] ** 2])


def jacobians() -> Section:
    """9. Reverse mode (vjp: one row per call) and forward mode (jvp: one column per call)."""

    @jax.jit
    def rows_and_columns(v):
        _, vjp = jax.vjp(small_function, v)
        rows = jnp.stack([vjp(e)[0] for e in jnp.eye(3)])  # one reverse pass per output
        cols = [jax.jvp(small_function, (v,), (e,))[1] for e in jnp.eye(2)]  # one per input
        return rows, jnp.stack(cols, axis=1)

    v = jnp.array([1.0, 2.0])
    rows, cols = rows_and_columns(v)
    analytic = jnp.array([[v[1], v[0]], [jnp.cos(v[0]), 0.0], [0.0, 2 * v[1]]])
    jacrev, jacfwd = jax.jit(jax.jacrev(small_function))(v), jax.jit(jax.jacfwd(small_function))(v)
    agree = bool(jnp.allclose(jacrev, analytic) and jnp.allclose(jacfwd, analytic))
    return Section(
        "Reverse and forward mode: vjp, jvp, jacobian",
        [
            f"f(a, b) = (a b, sin a, b^2) at {v}",
            f"rows from jax.vjp:\n{rows}",
            f"columns from jax.jvp:\n{cols}",
            f"jax.jacrev == jax.jacfwd == analytic: {agree}",
            "why: reverse mode costs one pass per output, forward mode one per input; "
            "grad is reverse mode for one scalar output",
        ],
        {
            "vjp_rows": rows,
            "jvp_cols": cols,
            "jacrev": jacrev,
            "jacfwd": jacfwd,
            "analytic": analytic,
        },
    )


def one_step_by_hand() -> Section:
    """10. The lesson's first model, one step: nn.Linear(2, 1), MSE, SGD(0.01), by hand and by
    jax.grad. PyTorch draws nn.Linear's weights at random; here they are stated, so the step is
    a number to check: w = [[0.1], [0.2]], b = [0]."""
    x, y = jnp.array([[1.0, 2.0], [2.0, 3.0]]), jnp.array([[1.0], [2.0]])
    params = {"kernel": jnp.array([[0.1], [0.2]]), "bias": jnp.array([0.0])}
    model = nn.Dense(1)

    def mse(params):
        return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

    loss, grads = jax.value_and_grad(mse)(params)
    tx = optax.sgd(0.01)
    updates, _ = tx.update(grads, tx.init(params))
    new = optax.apply_updates(params, updates)
    error = x @ params["kernel"] + params["bias"] - y  # by hand: dL/dw = 2/N x^T e, dL/db = 2/N sum e
    by_hand = {"kernel": 2 / 2 * x.T @ error, "bias": 2 / 2 * error.sum(0)}
    return Section(
        "One step by hand: nn.Linear(2, 1), MSE, SGD(0.01)",
        [
            "x = [[1, 2], [2, 3]], y = [[1], [2]], w = [[0.1], [0.2]], b = [0]",
            f"predictions {(x @ params['kernel']).ravel()}, loss = {float(loss):.4f}",
            f"jax.grad: dL/dw = {grads['kernel'].ravel()}, dL/db = {grads['bias']}",
            f"by hand (2/N x^T e, 2/N sum e): {by_hand['kernel'].ravel()}, {by_hand['bias']}",
            f"after optax.sgd(0.01): w = {new['kernel'].ravel()}, b = {new['bias']}",
            "PyTorch: loss.backward(); optimizer.step() -- here the update is a value, params -> new",
        ],
        {"loss": loss, "grads": grads, "by_hand": by_hand, "new": new},
    )


def which_inputs_get_gradients() -> Section:
    """11. `requires_grad`: in JAX, the arguments `grad` differentiates (argnums) are the ones
    that get gradients; `lax.stop_gradient` is `.detach()`, a value the gradient does not
    flow through."""

    def z(x, y):
        return x * y + x**2

    def z_detached(x, y):
        return x * y + jax.lax.stop_gradient(x) ** 2  # x^2 as a constant

    only_x = jax.grad(z)(2.0, 3.0)  # argnums=0, the default: y is like requires_grad=False
    both = jax.grad(z, argnums=(0, 1))(2.0, 3.0)
    detached = jax.grad(z_detached)(2.0, 3.0)
    return Section(
        "Which inputs get gradients: argnums and stop_gradient",
        [
            f"z = x*y + x^2 at (2, 3): jax.grad(z) -> dz/dx = {only_x} (y gets none: argnums=0)",
            f"jax.grad(z, argnums=(0, 1)) -> {both[0]}, {both[1]}",
            f"z = x*y + stop_gradient(x)^2: dz/dx = {detached} (= y: x^2 is a constant, .detach())",
        ],
        {"only_x": only_x, "both": both, "detached": detached},
    )


def tracing() -> Section:
    """12. PyTorch builds its graph anew at each call (a dynamic graph). JAX traces the Python
    function to a jaxpr: per shape and dtype under jit (a new shape retraces), and a Python `if`
    on a traced value cannot be decided while tracing; `lax.cond` puts the branch in the graph."""
    traces = []

    @jax.jit
    def f(x):
        traces.append(x.shape)  # runs while tracing only
        return jnp.sum(x**2)

    f(jnp.ones(3)), f(jnp.ones(3) * 2), f(jnp.ones(4))

    @jax.jit
    def relu_if(x):
        return x if x > 0 else 0.0  # a traced x has no truth value

    try:
        relu_if(2.0)
        error = None
    except jax.errors.TracerBoolConversionError as e:
        error = type(e).__name__
    relu_cond = jax.jit(lambda x: jax.lax.cond(x > 0, lambda x: x, jnp.zeros_like, x))
    grads = [float(jax.grad(relu_cond)(v)) for v in (2.0, -2.0)]
    return Section(
        "The graph per input: tracing, retracing, and control flow",
        [
            f"jit(f) called on shapes (3,), (3,), (4,): traced {len(traces)} times, for {traces}",
            f"a Python `if x > 0` under jit: {error}",
            f"lax.cond(x > 0, ...): at 2 -> {float(relu_cond(2.0))}, at -2 -> {float(relu_cond(-2.0))}; its gradient {grads}",
            "without jit, Python runs op by op and `if` works, as in PyTorch: jit buys one compiled graph per shape",
        ],
        {
            "traces": traces,
            "error": error,
            "cond": [float(relu_cond(v)) for v in (2.0, -2.0)],
            "cond_grads": grads,
        },
    )


SECTIONS = [
    gradient_of_a_sum,
    computation_graph,
    no_zero_grad,
    finite_differences,
    hand_vs_grad,
    linear_regression,
    nan_and_stable_loss,
    custom_gradients,
    jacobians,
    one_step_by_hand,
    which_inputs_get_gradients,
    tracing,
]
