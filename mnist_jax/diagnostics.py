"""What went wrong in a run that does not learn: a collapse to one class, and dead ReLU units.

A dead ReLU passes no gradient, so it stays dead; a layer all dead passes nothing on, and the
net predicts one class for every image: the collapse the training loop warns of (once) and
`evaluate` and the seed studies count. `fired` and `dead_counts` also count Keras's units
(experiments/references.py), so both frameworks follow one rule.
"""

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import data, parallel


def collapsed_to(predictions) -> int | None:
    """The class predicted for every example when a model has collapsed to one; else None."""
    counts = np.bincount(np.asarray(predictions).ravel())
    return int(counts.argmax()) if counts.max() == counts.sum() else None


def format_dead(dead: dict[str, tuple[int, int]]) -> str:
    """dead_units' counts as 'hidden_0 0/12, hidden_1 21/24, ...'."""
    return ", ".join(f"{k} {d}/{n}" for k, (d, n) in dead.items())


def collapse_warning(epoch: int, label: int, accuracy: float, dead: dict) -> str:
    # Seen in the conv stages: Adam's first steps at lr 0.01 move every weight by about 0.01 at
    # once and kill ReLUs wholesale; in about 1 seed in 8 a whole layer dies. None recovered.
    return (
        f"warning: epoch {epoch}: the model predicts class {label} for every test image "
        f"(val_acc {accuracy:.2%}); dead ReLU units (0 on every test image): "
        f"{format_dead(dead) or 'none'}. A layer all dead passes neither signal nor gradient: "
        "try another --seed or a smaller --opt-lr"
    )


def fired(activations):
    """Per unit (last axis), whether it is > 0 for any image or position: numpy or jax arrays."""
    return (activations.reshape(-1, activations.shape[-1]) > 0).any(0)


def dead_counts(alive: dict) -> dict[str, tuple[int, int]]:
    """{layer: (dead, units)} from {layer: bool array, True where a unit fired on some image}."""
    return {k: (int((~v).sum()), int(v.size)) for k, v in sorted(alive.items())}


@jax.jit
def _alive(state, images):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    _, out = state.apply_fn(
        variables, data.normalize(images), train=False, mutable=["intermediates"]
    )
    hidden = out.get("intermediates", {})  # none in the one-layer softmax
    return {k: fired(a) for k, (a,) in hidden.items()}


def dead_units(state, images, batch_size: int = 1000) -> dict[str, tuple[int, int]]:
    """{hidden layer: (dead units, units)}: units (relu channels) that are 0 on every image."""
    alive = None
    for start in range(0, len(images), batch_size):
        a = _alive(state, images[start : start + batch_size])
        alive = a if alive is None else jax.tree.map(jnp.logical_or, alive, a)
    return dead_counts(parallel.to_host(alive))  # to_host: arrays may span other processes
