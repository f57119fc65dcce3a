"""What went wrong in a run that does not learn: a collapse to one class, and dead units.

A unit is dead when it is 0 on every image. A dead ReLU passes no gradient, so it stays dead; a
layer all dead passes nothing on, and the net predicts one class for every image: the collapse
the training loop warns of (once) and `evaluate` and the seed studies count. `fired` and
`dead_counts` also count Keras's units (experiments/references.py), so both frameworks follow
one rule.
"""

import jax.numpy as jnp
import numpy as np

from mnist_jax import parallel, train


def collapsed_to(predictions) -> int | None:
    """The class predicted for every example when a model has collapsed to one; else None."""
    counts = np.bincount(np.asarray(predictions).ravel())
    return int(counts.argmax()) if counts.max() == counts.sum() else None


def format_dead(dead: dict[str, tuple[int, int]]) -> str:
    """dead_units' counts as 'hidden_0 0/12, hidden_1 21/24, ...'."""
    return ", ".join(f"{k} {d}/{n}" for k, (d, n) in dead.items())


def dead_what(activation: str = "relu") -> str:
    """What the units counted dead are, for the hidden layers' activation (config.model)."""
    if activation == "relu":
        return "dead ReLU units (0 on every test image)"
    # The count is still of units exactly 0 on every image. A sigmoid is exactly 0 only where
    # it underflows (pre-activation below about -87 in float32): saturated off, gradient 0.
    # Units saturated near 1, or near but not at 0, are not counted.
    return f"{activation} units saturated at 0 (exactly 0 on every test image)"


def collapse_warning(epoch: int, label: int, accuracy: float, dead: dict, activation: str = "relu") -> str:
    # Seen in the conv stages: Adam's first steps at lr 0.01 move every weight by about 0.01 at
    # once and kill ReLUs wholesale; in about 1 seed in 8 a whole layer dies. None recovered.
    head = f"warning: epoch {epoch}: the model predicts class {label} for every test image (test_acc {accuracy:.2%})"
    if not dead:  # no hidden layer (linear): no units to count
        return f"{head}: try another --seed or a smaller --opt-lr"
    return (
        f"{head}; {dead_what(activation)}: {format_dead(dead)}. A layer all 0 passes neither "
        "signal nor gradient: try another --seed or a smaller --opt-lr"
    )


fired = train.fired  # the rule: a unit is alive if > 0 for some image or position


def dead_counts(alive: dict) -> dict[str, tuple[int, int]]:
    """{layer: (dead, units)} from {layer: bool array, True where a unit fired on some image}."""
    return {k: (int((~v).sum()), int(v.size)) for k, v in sorted(alive.items())}


def dead_units(state, images, batch_size: int = 1000) -> dict[str, tuple[int, int]]:
    """{hidden layer: (dead units, units)} of `images` (see `dead_what`): the count that
    `train.eval_dataset` makes in its pass, which the loop and `evaluate` read without this one."""
    labels = jnp.zeros(len(images), jnp.int32)  # unused: only the activations count here
    alive = train.eval_dataset(state, images, labels, batch_size)["alive"]
    return dead_counts(parallel.to_host(alive))  # to_host: arrays may span other processes
