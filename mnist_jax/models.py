"""Three Flax Linen models cover all eight stages; stages choose sizes and options.

Keras defaults, not Flax's, so that the stages match the codelab: Glorot-uniform kernels, zero
biases, BatchNorm momentum 0.99 and epsilon 1e-3. Models return logits; the softmax lives in the
loss (optax's fused softmax cross-entropy), which is what keeps the codelab's NaNs away.
"""

import dataclasses
from functools import partial
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from mnist_jax.config import MODEL_CHOICES, ConfigError, flag_name

NHWC = ("NHWC", "HWIO", "NHWC")


def _space_to_depth(x):
    """[B,H,W,C] -> [B,H/2,W/2,4C]: each 2x2 block of pixels becomes one pixel."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // 2, w // 2, 4 * c)


def _kernel_to_depth(k):
    """[2a,2b,C,O] -> [a,b,4C,O], matching _space_to_depth's channel order."""
    kh, kw, c, o = k.shape
    k = k.reshape(kh // 2, 2, kw // 2, 2, c, o).transpose(0, 2, 1, 3, 4, 5)
    return k.reshape(kh // 2, kw // 2, 4 * c, o)


def _conv_s2(x, k):
    return lax.conv_general_dilated(x, k, (2, 2), "SAME", dimension_numbers=NHWC)


@jax.custom_jvp
def conv_stride2(x, k):
    """A SAME, stride-2 convolution on even-sized NHWC images, kernel sides 2, 6, 10...: same values.

    Only its input gradient is computed differently: its derivative along x is written as the
    equal stride-1 convolution over space-to-depth images, whose transpose (reverse mode) XLA:CPU
    runs 4x faster than the transposed strided convolution: 17.9 -> 4.4 ms for conv_bn's second
    layer at batch 64. A custom JVP, not a custom VJP, so forward mode (jvp, jacfwd, linearize)
    works too; reverse mode transposes it into the same backward pass, bit for bit.
    """
    return _conv_s2(x, k)


def _conv_stride2_jvp(primals, tangents):
    (x, k), (dx, dk) = primals, tangents
    parts = []
    if type(dx) is not SymbolicZero:  # the x-derivative: 2x2 blocks, a stride-1 kernel
        s2d = (_space_to_depth(dx), _kernel_to_depth(k))
        parts.append(lax.conv_general_dilated(*s2d, (1, 1), "SAME", dimension_numbers=NHWC))
    if type(dk) is not SymbolicZero:
        parts.append(_conv_s2(x, dk))
    # Zero tangents stay symbolic (no convolution spent on a zero). Instantiated, conv_bn's
    # jacfwd in its input (1,568 directions) came out as garbage in 11 of 80 XLA:CPU compiles.
    return _conv_s2(x, k), sum(parts[1:], parts[0])


conv_stride2.defjvp(_conv_stride2_jvp, symbolic_zeros=True)


def conv_s2d_grad(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
):
    """lax.conv_general_dilated for nn.Conv, with conv_stride2 where it applies: a model's
    choice (ConvNet.s2d_grad), which startup.resolve makes on the CPU."""
    plain = lhs_dilation in (None, (1, 1)) and rhs_dilation in (None, (1, 1))
    if (
        plain
        and tuple(window_strides) == (2, 2)
        and padding == "SAME"
        and feature_group_count == 1
        and lhs.ndim == 4
        and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
        and all(n % 2 == 0 for n in lhs.shape[1:3])
        and all(n % 4 == 2 for n in rhs.shape[:2])  # SAME pads whole 2x2 blocks
    ):
        return conv_stride2(lhs, rhs)
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        precision=precision,
    )


Dense = partial(nn.Dense, kernel_init=nn.initializers.glorot_uniform())
Conv = partial(nn.Conv, kernel_init=nn.initializers.glorot_uniform(), padding="SAME")
ACTIVATIONS = {"relu": nn.relu, "sigmoid": nn.sigmoid}
SHAPE_FLAGS = "--model-kernels, --model-strides, --model-padding, --model-pool"


def _no_pixels(x, before, what: str) -> None:
    """ConfigError naming the layer after which `x` has no pixels left: checked while init
    traces the model (shapes are static), so before training, instead of a ZeroDivisionError
    in the next layer's initializer (a fan-in of 0)."""
    if 0 in x.shape[1:]:
        shape = lambda s: "x".join(map(str, s[1:3]))  # noqa: E731
        raise ConfigError(
            f"{SHAPE_FLAGS}: {what} turns the {shape(before)} pixels into {shape(x.shape)}, leaving none; use SAME padding or smaller kernels, strides or pools"
        )


def _flat(x):
    """[B, ...] -> [B, features]; ConfigError for images of no pixels (a 0-sized side)."""
    if 0 in x.shape[1:]:
        raise ConfigError(f"the images are {'x'.join(map(str, x.shape[1:]))}: no pixels to classify")
    return x.reshape((x.shape[0], -1))


class Softmax(nn.Module):
    """Stage 1: one dense layer, 784 -> 10 on MNIST."""

    num_classes: int = 10
    dtype: str = "float32"  # of the matmuls and convolutions; parameters stay float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:  # [B,H,W,C] -> [B,classes]
        logits = Dense(self.num_classes, dtype=self.dtype)(_flat(x))
        return logits.astype(jnp.float32)


class MLP(nn.Module):
    """Dense layers with an activation, each optionally followed by dropout."""

    features: Sequence[int] = (200, 60)
    activation: str = "relu"
    dropout: float = 0.0
    num_classes: int = 10
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        x = _flat(x)
        for i, n in enumerate(self.features):
            x = ACTIVATIONS[self.activation](Dense(n, dtype=self.dtype)(x))
            self.sow("intermediates", f"hidden_{i}", x)  # dead units: train.eval_dataset
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class ConvNet(nn.Module):
    """Convolutions (relu), one hidden dense layer, optional batch norm and dropout.

    With batch_norm, layers drop their biases and BatchNorm (centre, no scale) sits between each
    layer and its relu, as in the codelab's last model. Dropout goes before the last dense layer.
    The codelab's section 10 building blocks: `padding` VALID, `pool` (a max-pooling size after
    each convolution, 1 for none), `dense` 0 (no hidden dense layer) and `gap` (global average
    pooling before the head; with dense 0 the last convolution has one channel per class and its
    average is the logits: a head of 0 weights).
    """

    channels: Sequence[int] = (12, 24, 32)
    kernels: Sequence[int] = (3, 6, 6)
    strides: Sequence[int] = (1, 2, 2)
    dense: int = 200
    batch_norm: bool = False
    bn_momentum: float = 0.99  # the running statistics' decay (Keras's default; the codelab swept it)
    dropout: float = 0.0
    padding: str = "SAME"
    pool: Sequence[int] = ()  # () or one per layer
    gap: bool = False
    num_classes: int = 10
    dtype: str = "float32"  # bfloat16: convolutions and matmuls in bf16 (GPUs), params float32
    s2d_grad: bool = False  # stride-2 input gradients via space-to-depth (conv_stride2): the CPU's

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        bn = self.batch_norm
        conv = partial(Conv, conv_general_dilated=conv_s2d_grad) if self.s2d_grad else Conv
        norm = partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=1e-3,
            use_scale=False,
            # Variance as mean((x - mean)^2), as Keras and TensorFlow compute it, not flax's
            # one-pass mean(x^2) - mean^2, which loses digits when |mean| >> std.
            use_fast_variance=False,
            dtype=self.dtype,  # statistics are still reduced in float32
        )
        layers = list(zip(self.channels, self.kernels, self.strides, strict=True))
        logits_conv = self.gap and not self.dense  # the last convolution gives the logits
        _flat(x)  # images of no pixels
        for i, (c, k, s) in enumerate(layers):
            last = logits_conv and i == len(layers) - 1
            before = x.shape
            x = conv(c, (k, k), strides=s, padding=self.padding, use_bias=last or not bn, dtype=self.dtype)(x)
            _no_pixels(x, before, f"layer {i + 1}'s {k}x{k} convolution (stride {s}, {self.padding})")
            if not last:
                x = nn.relu(norm()(x) if bn else x)
                # Kept only when apply asks for mutable=["intermediates"] (evaluation does, to
                # count dead units); flax's init leaves that collection out.
                self.sow("intermediates", f"hidden_{i}", x)
            if self.pool and self.pool[i] > 1:
                before = x.shape
                x = nn.max_pool(x, (self.pool[i],) * 2, strides=(self.pool[i],) * 2)
                _no_pixels(x, before, f"layer {i + 1}'s {self.pool[i]}x{self.pool[i]} pooling")
        x = x.mean(axis=(1, 2)) if self.gap else x.reshape((x.shape[0], -1))
        if logits_conv:
            return x.astype(jnp.float32)
        if self.dense:
            x = Dense(self.dense, use_bias=not bn, dtype=self.dtype)(x)
            x = nn.relu(norm()(x) if bn else x)
            self.sow("intermediates", f"hidden_{len(self.channels)}", x)
        if self.dropout:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


MODELS = {"softmax": Softmax, "mlp": MLP, "conv": ConvNet}
MODEL_CHOICES.update({"model.name": tuple(MODELS), "model.activation": tuple(ACTIVATIONS)})  # --help
# Set by the data (num_classes) and the backend (how it computes): build's keywords, not the
# config's model fields.
NOT_FIELDS = ("num_classes", "dtype", "s2d_grad")


def fields(name: str) -> dict:
    """A model's config fields and their defaults: {"features": (200, 60), ...}."""
    return {
        f.name: f.default for f in dataclasses.fields(MODELS[name]) if f.name not in ("parent", "name", *NOT_FIELDS)
    }


def _check(name: str, kwargs: dict) -> None:
    """ConfigError naming the flag for a field `name` lacks or a value it cannot train with."""
    if name not in MODELS:
        raise ConfigError(f"--model-name: must be one of {', '.join(MODELS)}, got {name!r}")
    known = fields(name)
    foreign = sorted(k for k in kwargs if k not in known)
    if foreign:
        raise ConfigError(
            f"--model-name {name}: the {name} model has no "
            + ", ".join(flag_name(f"model.{k}") for k in foreign)
            + " (set by the stage or a flag); "
            + (f"its fields are {', '.join(flag_name(f'model.{k}') for k in known)}" if known else "it has no fields")
            + "; use a stage built on that model"
        )
    values = {**known, **kwargs}
    n = len(values.get("channels", ()))
    sizes = lambda v: len(v) > 0 and all(x >= 1 for x in v)  # noqa: E731
    per_layer = (lambda v: len(v) == n and sizes(v), f"must be {n} positive sizes, one per layer")
    rules = {
        "features": (sizes, "must be positive sizes"),
        "channels": (sizes, "must be positive sizes"),
        "kernels": per_layer,  # one per --model-channels entry
        "strides": per_layer,
        "dense": (lambda v: v >= 0, "must be 0 (no hidden dense layer) or more"),
        "padding": (lambda v: v in ("SAME", "VALID"), "must be SAME or VALID"),
        "pool": (
            lambda v: len(v) == 0 or (len(v) == n and sizes(v)),
            f"must be empty or {n} sizes, one per layer (1: none)",
        ),
        "dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
        "bn_momentum": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
        "activation": (lambda v: v in ACTIVATIONS, f"must be one of {', '.join(ACTIVATIONS)}"),
    }
    for key, (ok, what) in rules.items():
        if key in values and not ok(values[key]):
            raise ConfigError(f"{flag_name('model.' + key)}: {what}, got {values[key]!r}")


def build(name: str, *, num_classes: int = 10, dtype: str = "float32", s2d_grad: bool = False, **fields) -> nn.Module:
    """A model from its config section: `build(**config.model)`, with the data's number of
    classes and how it computes (NOT_FIELDS: the models that have those fields take them). A
    field the model does not have, or a value it cannot train with, is a ConfigError naming
    the flag."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    _check(name, fields)
    cls = MODELS[name]
    if fields.get("gap") and not fields.get("dense", cls.dense):
        channels = fields.get("channels", cls.channels)
        if channels[-1] != num_classes:
            raise ConfigError(
                f"--model-gap with --model-dense 0: the last convolution gives the logits, so its channels must be the {num_classes} classes, got --model-channels {','.join(map(str, channels))}"
            )
        if fields.get("dropout"):
            raise ConfigError("--model-dropout: the gap head without a dense layer has no layer to drop into; use 0")
    given = dict(num_classes=num_classes, dtype=dtype, s2d_grad=s2d_grad)
    return cls(**fields, **{k: v for k, v in given.items() if hasattr(cls, k)})


def summary(model: nn.Module, image_shape=(28, 28, 1)) -> str:
    """Flax's layer table (output shapes, parameters per layer), then the trainable total."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
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
