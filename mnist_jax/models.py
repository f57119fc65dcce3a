"""Three Flax Linen models cover all eight stages; stages choose sizes and options.

Keras defaults, not Flax's, so that the stages match the codelab: Glorot-uniform kernels, zero
biases, BatchNorm momentum 0.99 and epsilon 1e-3. Models return logits; the softmax lives in the
loss (optax's fused softmax cross-entropy), which is what keeps the codelab's NaNs away.
"""

from functools import partial
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NUM_CLASSES = 10
Dense = partial(nn.Dense, kernel_init=nn.initializers.glorot_uniform())
Conv = partial(nn.Conv, kernel_init=nn.initializers.glorot_uniform(), padding="SAME")
ACTIVATIONS = {"relu": nn.relu, "sigmoid": nn.sigmoid}


class Softmax(nn.Module):
    """Stage 1: one dense layer, 784 -> 10."""

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:  # [B,28,28,1] -> [B,10]
        return Dense(NUM_CLASSES)(x.reshape((x.shape[0], -1)))


class MLP(nn.Module):
    """Dense layers with an activation, each optionally followed by dropout."""

    features: Sequence[int] = (200, 60)
    activation: str = "relu"
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        x = x.reshape((x.shape[0], -1))
        for n in self.features:
            x = ACTIVATIONS[self.activation](Dense(n)(x))
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return Dense(NUM_CLASSES)(x)


class ConvNet(nn.Module):
    """Convolutions (SAME, relu), one hidden dense layer, optional batch norm and dropout.

    With batch_norm, layers drop their biases and BatchNorm (centre, no scale) sits between each
    layer and its relu, as in the codelab's last model. Dropout goes before the last dense layer.
    """

    channels: Sequence[int] = (12, 24, 32)
    kernels: Sequence[int] = (3, 6, 6)
    strides: Sequence[int] = (1, 2, 2)
    dense: int = 200
    batch_norm: bool = False
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        bn = self.batch_norm
        norm = partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.99,
            epsilon=1e-3,
            use_scale=False,
        )
        for c, k, s in zip(self.channels, self.kernels, self.strides, strict=True):
            x = Conv(c, (k, k), strides=s, use_bias=not bn)(x)
            x = nn.relu(norm()(x) if bn else x)
        x = x.reshape((x.shape[0], -1))
        x = Dense(self.dense, use_bias=not bn)(x)
        x = nn.relu(norm()(x) if bn else x)
        if self.dropout:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return Dense(NUM_CLASSES)(x)


def build(name: str, **kwargs) -> nn.Module:
    """A model from its config section: `build(**config.model)`."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return {"softmax": Softmax, "mlp": MLP, "conv": ConvNet}[name](**kwargs)


def summary(model: nn.Module) -> str:
    """Flax's layer table (output shapes, parameters per layer), then the trainable total."""
    x = jnp.zeros((1, 28, 28, 1), jnp.float32)
    table = nn.tabulate(
        model,
        jax.random.PRNGKey(0),
        compute_flops=False,
        console_kwargs={"width": 120, "force_terminal": False, "color_system": None},
    )(x, train=False)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    count = {k: sum(a.size for a in jax.tree.leaves(v)) for k, v in shapes.items()}
    line = f"Trainable parameters: {count['params']:,}"
    if count.get("batch_stats"):
        line += f"  (plus {count['batch_stats']:,} batch-norm statistics, not trained)"
    return table.rstrip() + "\n" + line
