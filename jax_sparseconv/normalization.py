"""Normalization over active rows only: padding rows never enter a statistic.

The functions take and return ``[capacity, C]`` features with an ``active [capacity]``
mask and keep padding rows at zero. Whatever padding rows hold (NaN included) reaches no
statistic, output or gradient: rows are masked with ``where``, never multiplied by the mask.
Statistics are computed in at least float32.
The Linen and NNX layers (``SparseBatchNorm``, ``SparseLayerNorm``, ``SparseGroupNorm``)
only hold the parameters and call these.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jax_sparseconv._vma import vary_together


def _stats_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def masked_moments(features: jax.Array, active: jax.Array, axis_name: str | None = None,
                   axis_index_groups=None) -> tuple[jax.Array, jax.Array]:
    """Per-channel ``(mean, var)`` over the active rows, ``[C]`` each.

    With ``axis_name`` (inside ``shard_map``/``pmap``) the rows of all devices on that
    axis count as one batch: sums and counts are ``psum``-ed, so devices holding
    different numbers of active rows are weighted correctly (a mean of per-device
    means would not be). The variance is computed around the global mean (two passes).
    """
    mean, var, _ = _moments(features.astype(_stats_dtype(features.dtype)), active, axis_name, axis_index_groups)
    return mean, var


def _moments(x, active, axis_name, axis_index_groups):
    """``(mean, var, count)`` of float32+ rows ``x`` over the active rows of all devices."""
    total = functools.partial(_total, axis_name=axis_name, axis_index_groups=axis_index_groups)
    rows = active[:, None]
    count = jnp.maximum(total(active.astype(x.dtype)), 1)
    mean = total(jnp.where(rows, x, 0)) / count
    var = total(jnp.where(rows, jnp.square(x - mean), 0)) / count
    return mean, var, count


def _total(value, axis_name, axis_index_groups):
    """Column sums of ``value``, over the devices on ``axis_name`` too."""
    return _over_devices(jnp.sum(value, axis=0), axis_name, axis_index_groups)


def _over_devices(value, axis_name, axis_index_groups):
    """``value`` summed over the devices on ``axis_name`` (unchanged without one)."""
    return value if axis_name is None else jax.lax.psum(value, axis_name, axis_index_groups=axis_index_groups)


def batch_norm_act(features: jax.Array, active: jax.Array, scale, bias, epsilon: float, *, residual=None,
                   relu: bool = False, axis_name: str | None = None, axis_index_groups=None,
                   dtype=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch norm, then ``+ residual`` and ReLU if asked, as one op.

    Returns ``(y, mean, var)``: ``y = act(normalize(features) + residual)`` (zero on padding,
    in ``dtype``, default the features' dtype) and the batch statistics (``masked_moments``).
    ``residual`` is ``[capacity, C]`` on the same rows, or None; ``scale`` and ``bias`` may be
    None. The backward pass recomputes the normalized rows from ``features`` (and takes the
    ReLU's mask from ``y``), so training keeps ``features`` and ``y`` only, where
    differentiating the formula would keep several ``[capacity, C]`` intermediates. The
    statistics are returned without gradient, like the running averages they update.
    """
    options = _BatchNormOptions(epsilon, relu, axis_name, axis_index_groups, jnp.dtype(dtype or features.dtype),
                                None if residual is None else jnp.dtype(residual.dtype))
    return _batch_norm_act(*vary_together(features, active, scale, bias, residual), options)


class _BatchNormOptions(NamedTuple):
    epsilon: float
    relu: bool
    axis_name: Any
    axis_index_groups: Any
    dtype: jnp.dtype
    residual_dtype: jnp.dtype | None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _batch_norm_act(features, active, scale, bias, residual, options):
    return _batch_norm_act_fwd(features, active, scale, bias, residual, options)[0]


def _batch_norm_act_fwd(features, active, scale, bias, residual, options):
    epsilon, relu, axis_name, axis_index_groups, dtype, _ = options
    x = features.astype(_stats_dtype(features.dtype))  # padding rows: masked where they are summed
    mean, var, count = _moments(x, active, axis_name, axis_index_groups)
    inv_std = jax.lax.rsqrt(var + epsilon)
    y = _scale_and_shift((x - mean) * inv_std, scale, bias)
    if residual is not None:
        y = y + residual.astype(x.dtype)
    if relu:
        y = jnp.maximum(y, 0)
    y = jnp.where(active[:, None], y, 0).astype(dtype)
    return (y, mean, var), (features, active, scale, bias, y if relu else None, mean, inv_std, count)


def _batch_norm_act_bwd(options, saved, cotangents):
    features, active, scale, bias, y, mean, inv_std, count = saved
    over_devices = functools.partial(_over_devices, axis_name=options.axis_name,
                                     axis_index_groups=options.axis_index_groups)
    g = cotangents[0]  # the statistics carry no gradient
    stats = _stats_dtype(features.dtype)
    passed = active[:, None] if y is None else active[:, None] & (y > 0)
    d_y = jnp.where(passed, g.astype(stats), 0)  # the cotangent of the normalized-and-shifted rows
    # Padding rows are masked in the product, by the active rows alone, not in a copy of x:
    # XLA (CPU) would form the copy in the forward pass and keep it until here, and masking by
    # `passed` costs the TPU more (xla backend, MinkUNet18's step at 16k: 455 MiB of temp on
    # the CPU, 380 on a TPU v5e; 594 / 380 with the copy, 455 / 430 masking by `passed`).
    x = features.astype(stats)
    sum_d_y = jnp.sum(d_y, axis=0)  # this device's rows
    # sum(d_y * x_hat) without an x_hat array: XLA (CPU) would compute one while the forward
    # runs and keep it until here, a [capacity, C] array per batch norm (MinkUNet18's step:
    # 28.1 -> 20.4 KiB/voxel of temp memory). The cost: float32 rounding grows with
    # |mean| / std of the features (tests/test_norm.py bounds it at mean 10, std 1).
    sum_d_y_x_hat = (jnp.sum(jnp.where(active[:, None], d_y * x, 0), axis=0) - mean * sum_d_y) * inv_std
    d_scale = None if scale is None else sum_d_y_x_hat.astype(scale.dtype)
    d_bias = None if bias is None else sum_d_y.astype(bias.dtype)
    # Through the statistics of all devices' rows: each row's share of the mean and variance
    # (the cotangent of x_hat is d_y * scale).
    gain = inv_std if scale is None else inv_std * scale.astype(stats)
    mean_d = over_devices(sum_d_y) / count
    mean_d_x_hat = over_devices(sum_d_y_x_hat) / count
    d_features = jnp.where(active[:, None], gain * (d_y - mean_d - (x - mean) * (inv_std * mean_d_x_hat)), 0)
    d_residual = None if options.residual_dtype is None else d_y.astype(options.residual_dtype)
    return d_features.astype(features.dtype), None, d_scale, d_bias, d_residual


_batch_norm_act.defvjp(_batch_norm_act_fwd, _batch_norm_act_bwd)


def normalize(features: jax.Array, active: jax.Array, mean, var, scale, bias, epsilon: float,
              dtype=None) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` on active rows, zero on padding.

    ``mean``/``var`` broadcast against ``features`` (``[C]``, or per row); ``scale`` and
    ``bias`` may be None. The result has ``dtype`` (default: the features' dtype).
    """
    y = _scale_and_shift((_active_rows(features, active) - mean) * jax.lax.rsqrt(var + epsilon), scale, bias)
    return jnp.where(active[:, None], y, 0).astype(dtype or features.dtype)


def _active_rows(features, active):
    """``features`` in at least float32, padding rows zero (whatever they held)."""
    return jnp.where(active[:, None], features, 0).astype(_stats_dtype(features.dtype))


def _scale_and_shift(x_hat, scale, bias):
    """``x_hat * scale + bias`` in ``x_hat``'s dtype; either may be None."""
    if scale is not None:
        x_hat = x_hat * scale.astype(x_hat.dtype)
    if bias is not None:
        x_hat = x_hat + bias.astype(x_hat.dtype)
    return x_hat


def layer_norm_moments(features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row ``(mean, var)`` over the channels, ``[capacity, 1]`` each."""
    x = features.astype(_stats_dtype(features.dtype))
    mean = jnp.mean(x, axis=1, keepdims=True)
    return mean, jnp.mean(jnp.square(x - mean), axis=1, keepdims=True)


def group_norm_moments(features: jax.Array, segments: jax.Array, num_segments: int,
                       num_groups: int) -> tuple[jax.Array, jax.Array]:
    """Per-row ``(mean, var)`` of its (batch item, channel group), ``[capacity, C]`` each.

    ``segments [capacity]`` is each row's batch item (``num_segments`` or more for
    padding rows, which are left out). The statistics of a group run over every active
    row of that batch item and the ``C / num_groups`` channels of the group, like
    GroupNorm over the spatial positions of one image.
    """
    capacity, channels = features.shape
    if channels % num_groups:
        raise ValueError(f"{channels} channels do not split into {num_groups} groups")
    x = features.astype(_stats_dtype(features.dtype)).reshape(capacity, num_groups, -1)
    group_size = x.shape[2]

    def per_group(value):  # [capacity, G] -> [num_segments, G]
        return jax.ops.segment_sum(value, segments, num_segments=num_segments)

    rows = per_group(jnp.ones((capacity, 1), x.dtype))
    count = jnp.maximum(rows * group_size, 1)
    mean = per_group(jnp.sum(x, axis=2)) / count
    own = jnp.minimum(segments, num_segments - 1)
    centered = x - mean[own][:, :, None]
    var = per_group(jnp.sum(jnp.square(centered), axis=2)) / count

    def to_rows(value):  # [num_segments, G] -> [capacity, C]
        return jnp.repeat(value[own], group_size, axis=1)

    return to_rows(mean), to_rows(var)
