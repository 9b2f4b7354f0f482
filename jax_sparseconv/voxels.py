"""Points to voxels in JAX, jit-able with static capacities (spconv's ``PointToVoxel``).

Voxels come out sorted by ``(z, y, x)``, the order of ``utils.voxelize`` (its numpy
twin), so the result does not depend on the order of the points except for which points
a voxel keeps when ``max_points_per_voxel`` caps it (the first ones, in input order).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_sparseconv.backends import xla
from jax_sparseconv.tensor import SparseConvTensor, is_concrete, merge_overflow, overflow_record, raise_if_overflow


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["coords", "features", "num_points", "point_to_voxel", "num_voxels",
                                "num_invalid", "overflow"], meta_fields=["spatial_shape"])
@dataclasses.dataclass(frozen=True)
class Voxels:
    """Voxelized points, padded to ``max_voxels`` rows (coords ``-1`` on padding rows).

    Attributes:
      coords: ``[max_voxels, 3]`` int32 ``(z, y, x)``.
      features: ``[max_voxels, F]`` mean (or first) point features of each voxel.
      num_points: ``[max_voxels]`` int32, points kept in each voxel.
      point_to_voxel: ``[N]`` int32, the voxel row of each point, ``-1`` for points dropped
        (outside the range, non-finite, beyond ``max_voxels`` or ``max_points_per_voxel``):
        ``predictions[point_to_voxel]`` scatters voxel outputs back to the points.
      num_voxels: int32, occupied voxels (may exceed ``max_voxels``: see ``overflow``).
      num_invalid: int32, points dropped for a NaN or infinite value.
      overflow: int32 ``[needed, max_voxels]`` if the voxels did not fit, else zeros.
      spatial_shape: the grid as ``(z, y, x)``.
    """

    coords: jax.Array
    features: jax.Array
    num_points: jax.Array
    point_to_voxel: jax.Array
    num_voxels: jax.Array
    num_invalid: jax.Array
    overflow: jax.Array
    spatial_shape: tuple[int, int, int]


def grid_shape(voxel_size, coors_range) -> tuple[int, int, int]:
    """``(z, y, x)`` voxel counts of ``coors_range = (xmin, ymin, zmin, xmax, ymax, zmax)``."""
    size = np.broadcast_to(np.asarray(voxel_size, np.float64), (3,))
    low, high = np.asarray(coors_range[:3], np.float64), np.asarray(coors_range[3:], np.float64)
    grid = np.round((high - low) / size).astype(np.int64)
    if (grid < 1).any():
        raise ValueError(f"empty grid {tuple(grid)} for coors_range {tuple(coors_range)}, voxel_size {tuple(size)}")
    return tuple(int(n) for n in grid[::-1])


def voxelize(points: jax.Array, voxel_size: float | Sequence[float], coors_range: Sequence[float],
             max_voxels: int, max_points_per_voxel: int | None = None, reduce: str = "mean") -> Voxels:
    """Groups ``points [N, F]`` (x, y, z first) into the voxels of a regular grid.

    Args:
      voxel_size: one size, or ``(x, y, z)`` sizes.
      coors_range: ``(xmin, ymin, zmin, xmax, ymax, zmax)``; the grid covers ``[min, max)``.
      max_voxels: static row capacity. More occupied voxels raise ``CapacityOverflowError``
        eagerly; under ``jit`` the ``overflow`` record reports them (``jsc.check_overflow``
        reads it once the voxels are a tensor).
      max_points_per_voxel: keep at most this many points per voxel (the first ones, in
        input order); None keeps all.
      reduce: ``"mean"`` of the kept points' features, or ``"first"`` point's features.
    """
    if reduce not in ("mean", "first"):
        raise ValueError(f"reduce must be 'mean' or 'first', got {reduce!r}")
    points = jnp.asarray(points)
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(f"points must be [N, F] with F >= 3 (x, y, z first), got shape {points.shape}")
    shape = grid_shape(voxel_size, coors_range)
    n, num_features = points.shape
    size = np.broadcast_to(np.asarray(voxel_size, np.float64), (3,))
    finite = jnp.all(jnp.isfinite(points), axis=1)
    # Every [n]-row array is kept as columns: a TPU pads the minor dimension of an [n, 3] or
    # [n, F] array to 128 lanes, 32-40x its size. Divide as spconv does, in the points'
    # dtype; the barrier keeps XLA from turning the division by a broadcast into a
    # multiplication by its reciprocal, which rounds differently and moves points that lie
    # on a voxel boundary.
    sizes = jax.lax.optimization_barrier(tuple(jnp.full((n,), size[d], points.dtype) for d in range(3)))
    cells = [jnp.floor((jnp.where(finite, points[:, d], 0) - jnp.asarray(coors_range[d], points.dtype)) / sizes[d])
             for d in range(3)]
    inside = finite
    for cell, extent in zip(cells[::-1], shape):
        inside = inside & (cell >= 0) & (cell < extent)
    zyx = [jnp.where(inside, cell, 0).astype(jnp.int32) for cell in cells[::-1]]
    # Sort points by voxel (stable: input order within a voxel); runs of one voxel.
    keys, (order,) = xla.sort_keys(xla.site_keys((jnp.zeros((n,), jnp.int32), *zyx), inside, 1, shape),
                                   jnp.arange(n, dtype=jnp.int32), stable=True)
    valid, starts = keys[0] != xla.SENTINEL, xla.run_starts(keys)
    voxel = xla.cumsum(starts) - 1
    position = jnp.arange(n, dtype=jnp.int32)
    position = position - xla.cummax(jnp.where(starts, position, 0))
    kept = valid & (voxel < max_voxels)
    if max_points_per_voxel is not None:
        kept = kept & (position < max_points_per_voxel)
    row = jnp.where(kept, voxel, max_voxels)  # max_voxels: out of range, dropped
    num_points = jnp.zeros((max_voxels,), jnp.int32).at[row].add(1, mode="drop")
    point_to_voxel = jnp.full((n,), -1, jnp.int32).at[order].set(jnp.where(kept, voxel, -1))
    first, stored = xla.nth_starts(starts, max_voxels)  # each voxel's first point, in sorted order
    if reduce == "mean":
        # Scattered from the points as they come, without a sorted copy of them: a voxel still
        # sums its points in input order (the stable sort's order within a run).
        acc = jnp.promote_types(points.dtype, jnp.float32)
        point_row = jnp.where(point_to_voxel >= 0, point_to_voxel, max_voxels)
        count = jnp.maximum(num_points, 1)
        features = [(jnp.zeros((max_voxels,), acc).at[point_row].add(points[:, c].astype(acc), mode="drop")
                     / count).astype(points.dtype) for c in range(num_features)]
    else:
        source = xla.take(order, first)
        features = [jnp.where(num_points > 0, xla.take(points[:, c], source), 0) for c in range(num_features)]
    features = jnp.stack(features, axis=1)
    coords = jnp.stack(xla.key_sites(xla.gather_keys(keys, first, stored), 1, shape)[1:], axis=1)
    num_voxels = jnp.sum(starts, dtype=jnp.int32)
    overflow = overflow_record(num_voxels, max_voxels)
    if is_concrete(overflow):
        raise_if_overflow(overflow, "voxelize (max_voxels)")
    return Voxels(coords, features, num_points, point_to_voxel, num_voxels,
                  jnp.sum(~finite, dtype=jnp.int32), overflow, shape)


def majority_labels(voxels: Voxels, point_labels: jax.Array, num_classes: int) -> jax.Array:
    """The most frequent label of each voxel's points, int32 ``[max_voxels]`` (``-1`` on
    padding rows; ties go to the smaller label, as in ``utils.voxelize_labels``).

    ``point_labels`` are ints in ``[0, num_classes)``, one per point given to ``voxelize``;
    only the points a voxel kept count.
    """
    point_labels = jnp.asarray(point_labels).reshape(-1)
    if point_labels.shape[0] != voxels.point_to_voxel.shape[0]:
        raise ValueError(f"need one label per point: {point_labels.shape[0]} labels for "
                         f"{voxels.point_to_voxel.shape[0]} points")
    max_voxels = voxels.num_points.shape[0]
    row = jnp.where(voxels.point_to_voxel >= 0, voxels.point_to_voxel, max_voxels)  # dropped points: no row
    votes = jnp.zeros((max_voxels, num_classes), jnp.int32).at[row, point_labels].add(1, mode="drop")
    return jnp.where(voxels.num_points > 0, jnp.argmax(votes, axis=1).astype(jnp.int32), -1)


def to_tensor(voxels: Voxels | Sequence[Voxels], features: jax.Array | Sequence[jax.Array] | None = None,
              spatial_shape: Sequence[int] | None = None) -> SparseConvTensor:
    """One SparseConvTensor of several voxelized scans (batch item ``i`` = scan ``i``).

    ``features`` replaces the voxels' own features (one ``[max_voxels, C]`` array per scan;
    its padding rows are zeroed, as ``SparseConvTensor.replace_feature`` does).
    ``spatial_shape`` places the voxels in a larger grid than their own (OpenPCDet's
    backbones take KITTI's ``(40, 1600, 1408)`` voxel grid as ``(41, 1600, 1408)``).
    The rows of scan ``i`` follow those of scan ``i - 1``; overflow records carry over.
    """
    voxels = [voxels] if isinstance(voxels, Voxels) else list(voxels)
    if features is None:
        features = [v.features for v in voxels]
    elif not isinstance(features, (list, tuple)):
        features = [features]
    features = [jnp.where((v.num_points > 0)[:, None], f, 0) for v, f in zip(voxels, features)]
    shapes = {v.spatial_shape for v in voxels}
    if len(shapes) != 1:
        raise ValueError(f"scans voxelized on different grids: {sorted(shapes)}")
    grid = shapes.pop()
    if spatial_shape is None:
        spatial_shape = grid
    elif len(spatial_shape) != 3 or any(s < g for s, g in zip(spatial_shape, grid)):
        raise ValueError(f"spatial_shape {tuple(spatial_shape)} does not hold the voxel grid {grid}")
    indices = jnp.concatenate([
        jnp.concatenate([jnp.where(v.coords[:, :1] >= 0, i, -1), v.coords], axis=1) for i, v in enumerate(voxels)])
    overflow = functools.reduce(merge_overflow, [v.overflow for v in voxels])  # the first scan's that overflowed
    return SparseConvTensor(jnp.concatenate(features), indices, tuple(spatial_shape), len(voxels), overflow=overflow,
                            validate=False)
