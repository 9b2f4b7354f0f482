"""What the Linen and NNX layers share: everything except declaring parameters.

``jax_sparseconv.linen`` and ``jax_sparseconv.nnx`` hold parameters the way their
framework does and call the functions here, which call the functional core. Keeping
the math here means both namespaces compute exactly the same thing.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jax_sparseconv import functional, normalization
from jax_sparseconv.geometry import normalize_tuple
from jax_sparseconv.tensor import SparseConvTensor

SUBM, REGULAR, TRANSPOSED, INVERSE = "subm", "regular", "transposed", "inverse"

CONV_DOC = """
    Args (spconv name in brackets):
      features: output channels [out_channels]; NNX layers take ``in_features`` and
        ``out_features`` [in_channels, out_channels].
      kernel_size: int or one per spatial dim [kernel_size].
      strides: int or one per dim [stride]; ignored by SubMConv, as in spconv.
      padding: int or one per dim [padding]; ignored by SubMConv.
      kernel_dilation: int or one per dim [dilation].
      use_bias: add a learned bias at active output sites [bias].
      dtype: computation dtype (default: promoted from inputs and params).
      param_dtype: dtype of ``kernel`` ``(*kernel_size, C_in, C_out)`` and ``bias`` ``(C_out,)``.
      precision: matmul precision (see ``functional.sparse_conv``: TF32 on CUDA unless "highest").
      kernel_init, bias_init: initializers, as in ``flax.linen.Conv``; ``kernel_init`` is
        called with the shape ``(kernel volume, C_in, C_out)`` (same fans, faster compile).
      indice_key: rulebook cache key [indice_key]; an inverse conv needs the key of the
        strided conv it inverts.
      out_capacity: static row capacity of the output of a strided or transposed conv:
        an int, or a float for a multiple of the input capacity (``1.5``: 50% more rows).
      backend: ``"xla"``, ``"ffi"`` or None (automatic).
"""


def takes_sparse_tensor(layer: Any) -> bool:
    """True for layers that take a whole SparseConvTensor (all layers of this library).

    Set ``takes_sparse_tensor = True`` on your own module or function to receive the
    tensor in a ``SparseSequential``; other callables receive the active features.
    """
    return bool(getattr(layer, "takes_sparse_tensor", False))


def check_input(layer_name: str, x: Any, num_spatial_dims: int | None) -> None:
    if not isinstance(x, SparseConvTensor):
        raise TypeError(f"{layer_name} expects a SparseConvTensor, got {type(x).__name__}")
    if num_spatial_dims is not None and x.ndim != num_spatial_dims:
        raise ValueError(f"{layer_name} expects a tensor with {num_spatial_dims} spatial dims, "
                         f"got spatial_shape {x.spatial_shape}")


def kernel_shape(kernel_size, num_spatial_dims: int, in_features: int, out_features: int) -> tuple[int, ...]:
    return (*normalize_tuple(kernel_size, num_spatial_dims, "kernel_size"), in_features, out_features)


def flat_kernel_init(kernel_init: Callable) -> Callable:
    """``kernel_init`` drawn on the shape ``(kernel volume, C_in, C_out)``, then reshaped.

    Flax's variance-scaling initializers see the same fan-in and fan-out either way,
    but XLA on CPU compiles random draws of rank-5 shapes much more slowly than of
    rank-3 ones (seconds per kernel shape here, which dominated a small U-Net's ``init``).
    """
    def init(key, shape, dtype=jnp.float32):
        return kernel_init(key, (math.prod(shape[:-2]), *shape[-2:]), dtype).reshape(shape)

    return init


def output_rows(out_capacity: int | float | None, x: SparseConvTensor) -> int | None:
    """A layer's ``out_capacity`` as rows: a float is a multiple of the input capacity."""
    return math.ceil(out_capacity * x.capacity) if isinstance(out_capacity, float) else out_capacity


def conv(mode: str, x: SparseConvTensor, kernel, bias, *, strides, padding, kernel_dilation, indice_key,
         out_capacity, precision, backend, dtype) -> SparseConvTensor:
    """A conv layer's forward pass: promote dtypes as Flax does, then ``sparse_conv``."""
    if mode == INVERSE and (strides, padding, kernel_dilation, out_capacity) != (1, 0, 1, None):
        raise ValueError("SparseInverseConv takes its strides, padding, dilation and capacity from the "
                         f"conv stored under indice_key {indice_key!r}; do not pass them")
    out_capacity = output_rows(out_capacity, x)
    if dtype is None:
        dtype = jnp.result_type(x.features, kernel, *([] if bias is None else [bias]))
    if x.features.dtype != dtype:  # (a conv reads active rows only: no need to re-mask a same-dtype input)
        x = x.replace_feature(x.features.astype(dtype))
    kernel = jnp.asarray(kernel, dtype)
    bias = None if bias is None else jnp.asarray(bias, dtype)
    return functional.sparse_conv(x, kernel, bias, strides=strides, padding=padding, dilation=kernel_dilation,
                                  subm=mode == SUBM, transposed=mode == TRANSPOSED, inverse=mode == INVERSE,
                                  indice_key=indice_key, out_capacity=out_capacity, precision=precision,
                                  backend=backend)


POOLS = {"max": functional.sparse_max_pool, "avg": functional.sparse_avg_pool}


def pool_call(layer: Any, x: SparseConvTensor) -> SparseConvTensor:
    """``__call__`` of the Linen and NNX window pools: the layer's fields are the arguments."""
    check_input(type(layer).__name__, x, layer.num_spatial_dims)
    kernel_size = normalize_tuple(layer.kernel_size, x.ndim, "kernel_size")
    return POOLS[layer.kind](x, kernel_size, layer.strides, layer.padding, layer.kernel_dilation,
                             indice_key=layer.indice_key, out_capacity=output_rows(layer.out_capacity, x),
                             backend=layer.backend)


GLOBAL_POOLS = {"max": functional.global_max_pool, "avg": functional.global_avg_pool}


def global_pool_call(layer: Any, x: SparseConvTensor) -> jax.Array:
    """``__call__`` of the Linen and NNX global pools: ``[B, C]``."""
    check_input(type(layer).__name__, x, None)
    return GLOBAL_POOLS[layer.kind](x)


def to_dense_call(layer: Any, x: SparseConvTensor) -> jax.Array:
    """``__call__`` of the Linen and NNX ``ToDense``."""
    check_input("ToDense", x, None)
    return x.dense(channels_first=layer.channels_first)


# ---- normalization -----------------------------------------------------------------------

def batch_norm(x: SparseConvTensor, *, use_running_average: bool, running_mean, running_var, scale, bias,
               momentum: float, epsilon: float, axis_name, axis_index_groups, dtype,
               residual: SparseConvTensor | None = None, relu: bool = False):
    """Returns ``(y, (mean, var))``: the output and the updated running averages.

    Training mode normalizes with the statistics of the active rows (across devices
    with ``axis_name``) and moves the running averages by ``1 - momentum`` (Flax's
    convention: spconv's PyTorch momentum 0.01 is Flax momentum 0.99). The running
    variance is the biased batch variance, as in Flax. ``residual`` is added to the
    normalized features, then ReLU if ``relu``: in training one fused op
    (``normalization.batch_norm_act``) when ``residual`` is on the same rows as ``x``
    (the same ``indices`` array), else ``sparse_add`` on the union of the sites.
    """
    if residual is not None and residual.indices is not x.indices:
        y, updated = batch_norm(x, use_running_average=use_running_average, running_mean=running_mean,
                                running_var=running_var, scale=scale, bias=bias, momentum=momentum, epsilon=epsilon,
                                axis_name=axis_name, axis_index_groups=axis_index_groups, dtype=dtype)
        y = functional.sparse_add(y, residual)
        return (y.replace_feature(jax.nn.relu(y.features)) if relu else y), updated
    if residual is not None and residual.num_channels != x.num_channels:
        raise ValueError(f"the residual has {residual.num_channels} channels, the batch norm's input "
                         f"{x.num_channels}")
    residual_features = None if residual is None else residual.features
    if use_running_average:
        y = normalization.normalize(x.features, x.active, running_mean, running_var, scale, bias, epsilon, dtype)
        if residual is not None:
            y = y + residual_features.astype(y.dtype)
        if relu:
            y = jax.nn.relu(y)
        return x.replace_feature(y), (running_mean, running_var)
    y, mean, var = normalization.batch_norm_act(x.features, x.active, scale, bias, epsilon,
                                                residual=residual_features, relu=relu, axis_name=axis_name,
                                                axis_index_groups=axis_index_groups, dtype=dtype)
    updated = tuple((momentum * running + (1 - momentum) * batch).astype(running.dtype)
                    for running, batch in ((running_mean, mean), (running_var, var)))
    # y is zero on padding rows already.
    return SparseConvTensor(y, x.indices, x.spatial_shape, x.batch_size, x.indice_dict, x.overflow,
                            validate=False), updated


def layer_norm(x: SparseConvTensor, *, scale, bias, epsilon: float, dtype) -> SparseConvTensor:
    features = _zero_padding(x)
    mean, var = normalization.layer_norm_moments(features)
    return x.replace_feature(normalization.normalize(features, x.active, mean, var, scale, bias, epsilon, dtype))


def group_norm(x: SparseConvTensor, *, num_groups: int, scale, bias, epsilon: float, dtype) -> SparseConvTensor:
    features = _zero_padding(x)
    segments = jnp.where(x.active, x.indices[:, 0], x.batch_size)
    mean, var = normalization.group_norm_moments(features, segments, x.batch_size, num_groups)
    return x.replace_feature(normalization.normalize(features, x.active, mean, var, scale, bias, epsilon, dtype))


def _zero_padding(x: SparseConvTensor) -> jax.Array:
    """``x``'s features with zero padding rows: what padding rows hold (NaN) must not reach
    the moments, whose gradients would carry it into every row of a batch item."""
    return jnp.where(x.active[:, None], x.features, 0)


# ---- sequential ----------------------------------------------------------------------------

def apply_sequential(layers: Sequence[Callable], x: Any, feature_layer_check: Callable[[Any], None],
                     **kwargs) -> Any:
    """Applies ``layers`` in order.

    Sparse layers get the tensor; any other callable gets the ``[capacity, C]`` features,
    padding rows zero whatever the tensor held there (a NaN would reach ``nn.Dense``'s kernel
    gradient), and its result becomes the new features, with padding rows zeroed (so
    ``nn.relu``, ``nn.Dense``, ``nn.Dropout`` just work). Once a layer returns a dense array (``ToDense``,
    a global pool), later layers get that array. Each layer also gets those ``kwargs``
    that its call signature names (``use_running_average``, ``deterministic``, ...).
    ``feature_layer_check`` rejects layers whose feature-wise use would be wrong (a batch
    norm that would count padding rows). A batch norm followed by ``relu`` runs as one op
    (``SparseBatchNorm(relu=True)``: the same values, less kept for the backward pass).
    """
    layers = list(layers)
    fused_relu = False
    for layer, following in zip(layers, layers[1:] + [None]):
        if fused_relu:  # this relu ran inside the batch norm before it
            fused_relu = False
            continue
        layer_kwargs = _accepted_kwargs(layer, kwargs)
        if takes_sparse_tensor(layer) or not isinstance(x, SparseConvTensor):
            fused_relu = getattr(layer, "fuses_relu", False) and following is jax.nn.relu
            x = layer(x, **layer_kwargs, **({"relu": True} if fused_relu else {}))
        else:
            feature_layer_check(layer)
            x = x.replace_feature(layer(_zero_padding(x), **layer_kwargs))
    return x


def _accepted_kwargs(layer: Callable, kwargs: dict) -> dict:
    if not kwargs:
        return {}
    try:
        parameters = inspect.signature(layer).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return {}
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in parameters}


def reject_layer(layer: Any, rejected: dict[type, str]) -> None:
    for kind, advice in rejected.items():
        if isinstance(layer, kind):
            raise TypeError(f"{type(layer).__name__} applied to the features of a sparse tensor would count "
                            f"padding rows in its statistics; use {advice} instead")


def define_dimension_variants(namespace: dict, *bases: type) -> None:
    """Adds ``Base1d`` ... ``Base4d`` to ``namespace`` for each base class (``SubMConv3d`` is
    ``SubMConv`` fixed to 3 spatial dims, spconv's ``SubMConv3d``)."""
    for base in bases:
        for num_spatial_dims in range(1, 5):
            name = f"{base.__name__}{num_spatial_dims}d"
            doc = (f"{base.__name__} on {num_spatial_dims} spatial dims (spconv's ``{name}``).\n\n"
                   f"    See ``{base.__name__}`` for the arguments.\n")
            namespace[name] = type(name, (base,), {"num_spatial_dims": num_spatial_dims, "__doc__": doc,
                                                   "__module__": base.__module__, "__qualname__": name})

