"""Normalization over active rows only: padding rows never enter a statistic.

The functions take and return ``[capacity, C]`` features with an ``active [capacity]``
mask and keep padding rows at zero. Statistics are computed in at least float32.
The Linen and NNX layers (``SparseBatchNorm``, ``SparseLayerNorm``, ``SparseGroupNorm``)
only hold the parameters and call these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
    dtype = _stats_dtype(features.dtype)
    x = features.astype(dtype)
    weight = active.astype(dtype)[:, None]

    def total(value):
        value = jnp.sum(value, axis=0)
        return value if axis_name is None else jax.lax.psum(value, axis_name, axis_index_groups=axis_index_groups)

    count = jnp.maximum(total(weight[:, 0]), 1)
    mean = total(x * weight) / count
    var = total(jnp.square(x - mean) * weight) / count
    return mean, var


def normalize(features: jax.Array, active: jax.Array, mean, var, scale, bias, epsilon: float,
              dtype=None) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` on active rows, zero on padding.

    ``mean``/``var`` broadcast against ``features`` (``[C]``, or per row); ``scale`` and
    ``bias`` may be None. The result has ``dtype`` (default: the features' dtype).
    """
    stats = _stats_dtype(features.dtype)
    y = (features.astype(stats) - mean) * jax.lax.rsqrt(var + epsilon)
    if scale is not None:
        y = y * scale.astype(stats)
    if bias is not None:
        y = y + bias.astype(stats)
    return jnp.where(active[:, None], y, 0).astype(dtype or features.dtype)


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
