"""Dense references and random inputs for testing sparse ops (float64, numpy/JAX).

The references densify, run the dense operation with ``jax.lax`` in float64, and
read the result at the sparse output sites; ``dense_sites`` gives the exact set of
output sites a sparse op must produce.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_sparseconv.geometry import REGULAR, SUBM, TRANSPOSED, ConvGeometry
from jax_sparseconv.tensor import SparseConvTensor


def random_tensor(rng: np.random.Generator, batch_size: int, spatial_shape, channels: int, density: float = 0.3,
                  padding_rows: int = 3, dtype=np.float32, min_active: int = 1) -> SparseConvTensor:
    """Random unique sites in shuffled order, with padding rows scattered among them."""
    spatial_shape = tuple(spatial_shape)
    volume = batch_size * int(np.prod(spatial_shape))
    n = min(volume, max(min_active, int(rng.binomial(volume, density))))
    flat = rng.choice(volume, size=n, replace=False)
    sites = np.stack(np.unravel_index(flat, (batch_size, *spatial_shape)), axis=1).astype(np.int32)
    features = rng.normal(size=(n, channels)).astype(dtype)
    capacity = n + padding_rows
    order = rng.permutation(capacity)
    indices = np.full((capacity, len(spatial_shape) + 1), -1, np.int32)
    padded = np.zeros((capacity, channels), dtype)
    indices[order[:n]] = sites
    padded[order[:n]] = features
    return SparseConvTensor(jnp.asarray(padded), jnp.asarray(indices), spatial_shape, batch_size)


def with_raw_features(t: SparseConvTensor, features) -> SparseConvTensor:
    """``t`` with new features, padding rows as given (``replace_feature`` would zero them)."""
    return SparseConvTensor(features, t.indices, t.spatial_shape, t.batch_size, t.indice_dict, validate=False)


def _dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
    spatial = tuple(range(1, ndim + 1))
    return lax.ConvDimensionNumbers(lhs_spec=(0, ndim + 1) + spatial, rhs_spec=(ndim + 1, ndim) + tuple(range(ndim)),
                                    out_spec=(0, ndim + 1) + spatial)


def dense_conv(x: jax.Array, kernel: jax.Array, geometry: ConvGeometry) -> jax.Array:
    """Dense ``[B, *out_shape, C_out]`` result of ``geometry`` on ``x [B, *in_shape, C_in]``.

    subm and regular are cross-correlations (subm padded by ``(k // 2) * d``);
    transposed is the gradient-of-conv geometry ``o = i * s - p + k * d``, written as
    a conv of the stride-dilated input with the flipped kernel.
    """
    g, nd = geometry, geometry.ndim
    dn = _dimension_numbers(nd)
    if g.mode == SUBM:
        pad = [((k // 2) * d,) * 2 for k, d in zip(g.kernel_size, g.dilation)]
        return lax.conv_general_dilated(x, kernel, (1,) * nd, pad, rhs_dilation=g.dilation, dimension_numbers=dn,
                                        precision=lax.Precision.HIGHEST)
    if g.mode == REGULAR:
        pad = [(p, p) for p in g.padding]
        return lax.conv_general_dilated(x, kernel, g.strides, pad, rhs_dilation=g.dilation, dimension_numbers=dn,
                                        precision=lax.Precision.HIGHEST)
    pad = [(d * (k - 1) - p,) * 2 for k, d, p in zip(g.kernel_size, g.dilation, g.padding)]
    flipped = kernel[(slice(None, None, -1),) * nd]
    return lax.conv_general_dilated(x, flipped, (1,) * nd, pad, lhs_dilation=g.strides, rhs_dilation=g.dilation,
                                    dimension_numbers=dn, precision=lax.Precision.HIGHEST)


def dense_inverse_conv(y: jax.Array, kernel: jax.Array, forward: ConvGeometry) -> jax.Array:
    """Dense ``[B, *forward.in_shape, C_out]`` transpose of the regular conv ``forward`` applied to
    its output grid ``y`` (spconv's SparseInverseConv before masking to the input sites)."""
    unpadded = dataclasses.replace(forward, mode=TRANSPOSED, in_shape=forward.out_shape,
                                   padding=(0,) * forward.ndim)
    out = dense_conv(y, kernel, unpadded)  # site i + padding
    sizes = [min(n, t - p) for n, t, p in zip(forward.in_shape, out.shape[1:-1], forward.padding)]
    out = out[(slice(None),) + tuple(slice(p, p + m) for p, m in zip(forward.padding, sizes)) + (slice(None),)]
    return jnp.pad(out, [(0, 0)] + [(0, n - m) for n, m in zip(forward.in_shape, sizes)] + [(0, 0)])


def dense_sites(mask: jax.Array, geometry: ConvGeometry) -> jax.Array:
    """``[B, *out_shape]`` bool: the output sites a sparse op produces from active ``mask``."""
    if geometry.mode == SUBM:
        return mask
    ones = jnp.ones(geometry.kernel_size + (1, 1), jnp.float32)
    reached = dense_conv(mask[..., None].astype(jnp.float32), ones, geometry)
    return reached[..., 0] > 0.5


def _windows(x: jax.Array, fill, geometry: ConvGeometry) -> jax.Array:
    """``[B, *out_shape, K, C]``: the input under each kernel offset of each output window."""
    g = geometry
    padded = jnp.pad(x, [(0, 0)] + [(p, p) for p in g.padding] + [(0, 0)], constant_values=fill)
    taps = []
    for offset in g.offsets():
        start = [0] + [int(k) * d for k, d in zip(offset, g.dilation)] + [0]
        limit = [x.shape[0]] + [b + (n - 1) * s + 1 for b, n, s in zip(start[1:], g.out_shape, g.strides)]
        taps.append(lax.slice(padded, start, limit + [x.shape[-1]], [1, *g.strides, 1]))
    return jnp.stack(taps, axis=-2)


def dense_max_pool(x: jax.Array, mask: jax.Array, geometry: ConvGeometry) -> jax.Array:
    """Max over the active inputs of each window (``-inf`` where there are none)."""
    return jnp.max(_windows(jnp.where(mask[..., None], x, -jnp.inf), -jnp.inf, geometry), axis=-2)


def dense_avg_pool(x: jax.Array, mask: jax.Array, geometry: ConvGeometry) -> jax.Array:
    """Mean over the active inputs of each window (``nan`` where there are none)."""
    total = jnp.sum(_windows(jnp.where(mask[..., None], x, 0), 0, geometry), axis=-2)
    count = jnp.sum(_windows(mask[..., None].astype(x.dtype), 0, geometry), axis=-2)
    return total / count


def active_mask(x: SparseConvTensor) -> jax.Array:
    """``[B, *spatial_shape]`` bool occupancy of ``x``."""
    ones = x.replace_feature(jnp.ones((x.capacity, 1), jnp.float32))
    return ones.dense()[..., 0] > 0


def at_sites(dense: jax.Array, indices) -> np.ndarray:
    """Rows of ``dense [B, *shape, C]`` at the active ``indices`` (padding rows dropped)."""
    indices = np.asarray(indices)
    indices = indices[indices[:, 0] >= 0]
    return np.asarray(dense)[tuple(indices.T)]


def site_set(indices) -> set[tuple[int, ...]]:
    """The active sites of an indices array, as a set of tuples."""
    indices = np.asarray(indices)
    return {tuple(int(v) for v in row) for row in indices[indices[:, 0] >= 0]}


def dense_site_set(mask) -> set[tuple[int, ...]]:
    """The active sites of a dense ``[B, *spatial]`` bool mask, as index tuples."""
    return {tuple(int(v) for v in row) for row in np.argwhere(np.asarray(mask))}


def gather_matmul_grad_reference(x, g, nbr) -> np.ndarray:
    """``dw[k] = sum_r x[nbr[k, r]]^T g[r]`` (the ffi kernel-gradient handler's sum) in float64
    with NumPy, ``-1`` entries skipped; the xla backend has no such function (its
    ``conv_backward`` reads the transposed map)."""
    x, g, nbr = np.asarray(x, np.float64), np.asarray(g, np.float64), np.asarray(nbr)
    gathered = np.zeros(nbr.shape + x.shape[1:])  # [K, M, Cin]
    if len(x):
        gathered = np.where((nbr >= 0)[..., None], x[np.maximum(nbr, 0)], 0.0)
    return np.einsum("kmc,md->kcd", gathered, g)
