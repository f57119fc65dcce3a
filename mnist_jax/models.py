"""Three Flax Linen models for all eight stages, with Keras's defaults (Glorot-uniform, zero biases,
BatchNorm momentum 0.99, epsilon 1e-3). They return logits: the loss's fused softmax avoids NaNs."""

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
    """A SAME, stride-2 convolution on even-sized NHWC images, kernel sides 2, 6, 10...; its x-derivative
    is the stride-1 convolution over space-to-depth images, whose transpose XLA:CPU runs 4x faster
    (17.9 -> 4.4 ms, conv_bn's 2nd layer, batch 64). A custom JVP: forward mode works too."""
    return _conv_s2(x, k)


@partial(conv_stride2.defjvp, symbolic_zeros=True)  # instantiated zeros: garbage jacfwd (performance.md)
def _conv_stride2_jvp(primals, tangents):
    (x, k), (dx, dk) = primals, tangents
    parts = []
    if type(dx) is not SymbolicZero:  # the x-derivative: 2x2 blocks, a stride-1 kernel
        s2d = (_space_to_depth(dx), _kernel_to_depth(k))
        parts.append(lax.conv_general_dilated(*s2d, (1, 1), "SAME", dimension_numbers=NHWC))
    if type(dk) is not SymbolicZero:
        parts.append(_conv_s2(x, dk))
    return _conv_s2(x, k), sum(parts[1:], parts[0])


def _conv_s1(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC)


@jax.custom_jvp
def conv_shifts(x, k):
    """A SAME stride-1 convolution of one-channel images (odd kernel) as one fusion of shifted
    multiply-adds: 7x faster than XLA:CPU's convolution for conv_bn's first layer (profile_ops).
    Its derivatives are XLA's convolutions, so their transposes are XLA's gradients."""
    kh, kw = k.shape[:2]
    h, w = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    return sum(xp[:, i : i + h, j : j + w] * k[i, j, 0] for i in range(kh) for j in range(kw))


@partial(conv_shifts.defjvp, symbolic_zeros=True)
def _conv_shifts_jvp(primals, tangents):
    (x, k), (dx, dk) = primals, tangents
    parts = [] if type(dx) is SymbolicZero else [_conv_s1(dx, k)]
    parts += [] if type(dk) is SymbolicZero else [_conv_s1(x, dk)]
    return conv_shifts(x, k), sum(parts[1:], parts[0])


def conv_on_cpu(lhs, rhs, window_strides, padding, *, path: str = "space_to_depth", **keywords):
    """lax.conv_general_dilated for nn.Conv, with the CPU's faster forms where they apply
    (ConvNet.conv_grad): space_to_depth, stride-2 layers through conv_stride2; shifts, also
    one-channel stride-1 layers through conv_shifts."""
    get = keywords.get  # lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, precision
    plain = get("lhs_dilation") in (None, (1, 1)) and get("rhs_dilation") in (None, (1, 1))
    plain = plain and padding == "SAME" and get("feature_group_count", 1) == 1 and lhs.ndim == 4
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    plain = plain and lax.conv_dimension_numbers(lhs.shape, rhs.shape, get("dimension_numbers")) == nhwc
    odd = all(n % 2 == 1 for n in rhs.shape[:2])
    if plain and tuple(window_strides) == (2, 2):
        if all(n % 2 == 0 for n in lhs.shape[1:3]) and all(n % 4 == 2 for n in rhs.shape[:2]):  # SAME: whole blocks
            return conv_stride2(lhs, rhs)
    if plain and path == "shifts" and tuple(window_strides) == (1, 1) and lhs.shape[3] == 1 and odd:
        return conv_shifts(lhs, rhs)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **keywords)


Dense = partial(nn.Dense, kernel_init=nn.initializers.glorot_uniform())
Conv = partial(nn.Conv, kernel_init=nn.initializers.glorot_uniform(), padding="SAME")
ACTIVATIONS = {"relu": nn.relu, "sigmoid": nn.sigmoid}


def _no_pixels(x, before, what: str) -> None:
    """ConfigError naming the layer that leaves `x` no pixels (at init, not a ZeroDivisionError later)."""
    if 0 in x.shape[1:]:
        shape = lambda s: "x".join(map(str, s[1:3]))  # noqa: E731
        raise ConfigError(
            f"--model-kernels, --model-strides, --model-padding, --model-pool: {what} turns the {shape(before)} pixels into {shape(x.shape)}, leaving none; use SAME padding or smaller kernels, strides or pools"
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
        return Dense(self.num_classes, dtype=self.dtype)(_flat(x)).astype(jnp.float32)


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
    """Convolutions (relu), a hidden dense layer, optional batch norm (no biases, before each relu)
    and dropout (before the last layer). `pool`: per layer (1: none); `gap` with dense 0: the last
    convolution's channel means are the logits."""

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
    conv_grad: str = "xla"  # space_to_depth or shifts: conv_on_cpu's faster forms for XLA:CPU

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        bn = self.batch_norm
        cpu = partial(conv_on_cpu, path=self.conv_grad)
        conv = Conv if self.conv_grad == "xla" else partial(Conv, conv_general_dilated=cpu)
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-3)
        # Keras's variance, mean((x - mean)^2): flax's one-pass form loses digits when |mean| >> std.
        norm = partial(norm, use_scale=False, use_fast_variance=False, dtype=self.dtype)  # stats in float32
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
                self.sow("intermediates", f"hidden_{i}", x)  # kept under mutable=["intermediates"] only
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
NOT_FIELDS = ("num_classes", "dtype", "conv_grad")  # set by the data and the backend, not the config


def fields(name: str) -> dict:
    """A model's config fields and their defaults: {"features": (200, 60), ...}."""
    skip = ("parent", "name", *NOT_FIELDS)
    return {f.name: f.default for f in dataclasses.fields(MODELS[name]) if f.name not in skip}


def _check(name: str, kwargs: dict) -> None:
    """ConfigError naming the flag for a field `name` lacks or a value it cannot train with."""
    if name not in MODELS:
        raise ConfigError(f"--model-name: must be one of {', '.join(MODELS)}, got {name!r}")
    known = fields(name)
    foreign = sorted(k for k in kwargs if k not in known)
    if foreign:
        flags = lambda keys: ", ".join(flag_name(f"model.{k}") for k in keys)
        has = f"its fields are {flags(known)}" if known else "it has no fields"
        raise ConfigError(
            f"--model-name {name}: the {name} model has no {flags(foreign)} (set by the stage or a flag); {has}; use a stage built on that model"
        )
    values = {**known, **kwargs}
    n = len(values.get("channels", ()))
    sizes = lambda v: len(v) > 0 and all(x >= 1 for x in v)
    per_layer = (lambda v: len(v) == n and sizes(v), f"must be {n} positive sizes, one per layer")
    rules = {
        **dict.fromkeys(("features", "channels"), (sizes, "must be positive sizes")),
        **dict.fromkeys(("kernels", "strides"), per_layer),  # one per --model-channels entry
        "dense": (lambda v: v >= 0, "must be 0 (no hidden dense layer) or more"),
        "padding": (lambda v: v in ("SAME", "VALID"), "must be SAME or VALID"),
        "pool": (lambda v: len(v) == 0 or per_layer[0](v), f"must be empty or {n} sizes, one per layer (1: none)"),
        **dict.fromkeys(("dropout", "bn_momentum"), (lambda v: 0 <= v < 1, "must be in [0, 1)")),
        "activation": (lambda v: v in ACTIVATIONS, f"must be one of {', '.join(ACTIVATIONS)}"),
    }
    for key, (ok, what) in rules.items():
        if key in values and not ok(values[key]):
            raise ConfigError(f"{flag_name('model.' + key)}: {what}, got {values[key]!r}")


def build(name: str, *, num_classes: int = 10, dtype: str = "float32", conv_grad: str = "xla", **fields) -> nn.Module:
    """A model from `build(**config.model)` and NOT_FIELDS; a bad field or value: ConfigError naming the flag."""
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
    given = dict(num_classes=num_classes, dtype=dtype, conv_grad=conv_grad)
    return cls(**fields, **{k: v for k, v in given.items() if hasattr(cls, k)})


def summary(model: nn.Module, image_shape=(28, 28, 1)) -> str:
    """Flax's layer table (output shapes, parameters per layer), then the trainable total."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    console = {"width": 120, "force_terminal": False, "color_system": None}
    table = nn.tabulate(model, jax.random.PRNGKey(0), compute_flops=False, console_kwargs=console)(x, train=False)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    count = {k: sum(a.size for a in jax.tree.leaves(v)) for k, v in shapes.items()}
    line = f"Trainable parameters: {count['params']:,}"
    if count.get("batch_stats"):
        line += f"  (plus {count['batch_stats']:,} batch-norm statistics, not trained)"
    return table.rstrip() + "\n" + line
