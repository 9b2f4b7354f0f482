"""Numpy helpers for real point clouds: load KITTI scans and boxes, voxelize, batch into
a tensor.

These run on the host with numpy (no JAX tracing; ``position_features`` takes either); the
result of ``kitti_tensor`` is a padded ``SparseConvTensor`` ready for a jitted network.
``jsc.voxelize`` is the jit-able voxelizer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jax_sparseconv.tensor import SparseConvTensor, from_numpy
from jax_sparseconv.voxels import grid_shape

KITTI_RANGE = (0.0, -40.0, -3.0, 70.4, 40.0, 1.0)  # xmin, ymin, zmin, xmax, ymax, zmax (metres)


def load_kitti_points(path: str | os.PathLike) -> np.ndarray:
    """A KITTI Velodyne ``.bin`` scan as float32 ``[N, 4]``: x, y, z, reflectance."""
    return np.fromfile(path, dtype=np.float32).reshape(-1, 4)


def read_kitti_calib(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A KITTI ``calib.txt`` as float64 arrays by key (``"R0_rect"`` ``[3, 3]``,
    ``"Tr_velo_to_cam"`` ``[3, 4]``, ``"P2"`` ``[3, 4]``, ...)."""
    calib = {}
    for line in Path(path).read_text().splitlines():
        if ":" not in line:
            continue
        key, values = line.split(":", 1)
        values = np.array(values.split(), np.float64)
        calib[key.strip()] = values.reshape(3, 3) if values.size == 9 else values.reshape(3, 4)
    return calib


def load_kitti_boxes(label_path: str | os.PathLike, calib_path: str | os.PathLike
                     ) -> tuple[list[str], np.ndarray]:
    """The 3D boxes of a KITTI ``label_2`` file in the LiDAR frame (OpenPCDet's convention).

    Returns ``(names, boxes)``: the object types (``"Car"``, ``"Pedestrian"``, ...; the
    ``DontCare`` regions left out) and float64 ``[M, 7]`` boxes ``(x, y, z, l, w, h, yaw)``:
    the box centre in metres, its length along the heading, width, height, and the heading
    angle around the LiDAR z axis (0 = along x).
    """
    names, rows = [], []
    for line in Path(label_path).read_text().splitlines():
        fields = line.split()
        if fields and fields[0] != "DontCare":
            names.append(fields[0])
            rows.append([float(v) for v in fields[8:15]])  # h, w, l, x, y, z (camera), ry
    rows = np.asarray(rows, np.float64).reshape(-1, 7)
    h, w, l, ry = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 6]
    bottom_centre = rows[:, 3:6]
    centre_rect = bottom_centre - np.stack([np.zeros_like(h), h / 2, np.zeros_like(h)], axis=1)  # camera y points down
    calib = read_kitti_calib(calib_path)
    rectify = np.eye(4)
    rectify[:3, :3] = calib["R0_rect"]
    velo_to_cam = np.eye(4)
    velo_to_cam[:3] = calib["Tr_velo_to_cam"]
    centre = np.linalg.solve(rectify @ velo_to_cam, np.concatenate([centre_rect, np.ones((len(h), 1))], axis=1).T).T[:, :3]
    return names, np.concatenate([centre, np.stack([l, w, h, -ry - np.pi / 2], axis=1)], axis=1)


def points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """bool ``[M, N]``: which of ``points [N, >=3]`` lie inside each of ``boxes [M, 7]``
    (``(x, y, z, l, w, h, yaw)`` as ``load_kitti_boxes`` gives them)."""
    offset = points[None, :, :3] - boxes[:, None, :3]
    cos, sin = np.cos(boxes[:, 6, None]), np.sin(boxes[:, 6, None])
    along = offset[..., 0] * cos + offset[..., 1] * sin
    across = -offset[..., 0] * sin + offset[..., 1] * cos
    return ((np.abs(along) <= boxes[:, 3, None] / 2) & (np.abs(across) <= boxes[:, 4, None] / 2)
            & (np.abs(offset[..., 2]) <= boxes[:, 5, None] / 2))


def voxelize(points: np.ndarray, voxel_size: float | Sequence[float],
             coors_range: Sequence[float]) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Averages points into the voxels of a regular grid (spconv's conventions).

    Args:
      points: ``[N, F]`` float, ``F >= 3``; the first three columns are x, y, z.
      voxel_size: one size for all axes, or ``(x, y, z)`` sizes.
      coors_range: ``(xmin, ymin, zmin, xmax, ymax, zmax)``; the grid has
        ``round((max - min) / voxel_size)`` voxels per axis, covering ``[min, max)``.

    Returns:
      ``coords`` int32 ``[M, 3]`` in ``(z, y, x)`` order, sorted by coordinate;
      ``features`` float32 ``[M, F]``, the mean of each voxel's points (all columns);
      ``spatial_shape``, the grid as ``(z, y, x)``.
      Points outside the grid or with a non-finite value are dropped.
    """
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(f"points must be [N, F] with F >= 3 (x, y, z first), got shape {points.shape}")
    shape_zyx = grid_shape(voxel_size, coors_range)
    grid_xyz = np.asarray(shape_zyx[::-1])
    dtype = np.result_type(points.dtype, np.float32)  # spconv's arithmetic: float32 for float32 points
    low = np.asarray(coors_range[:3], dtype)
    size = np.broadcast_to(np.asarray(voxel_size, np.float64).astype(dtype), (3,))

    points = points[np.isfinite(points).all(axis=1)]
    cells = np.floor((points[:, :3].astype(dtype) - low) / size).astype(np.int64)
    inside = ((cells >= 0) & (cells < grid_xyz)).all(axis=1)
    points, cells = points[inside], cells[inside]

    zyx = cells[:, ::-1]
    keys = np.ravel_multi_index(tuple(zyx.T), shape_zyx)  # row-major over (z, y, x): sorts like the coords
    unique_keys, voxel_of_point, counts = np.unique(keys, return_inverse=True, return_counts=True)
    sums = np.zeros((len(unique_keys), points.shape[1]), np.float64)
    np.add.at(sums, voxel_of_point, points)
    features = (sums / counts[:, None]).astype(np.float32)
    coords = np.stack(np.unravel_index(unique_keys, shape_zyx), axis=1).astype(np.int32)
    return coords, features, shape_zyx


def voxelize_labels(points: np.ndarray, labels: np.ndarray, num_classes: int,
                    voxel_size: float | Sequence[float], coors_range: Sequence[float]):
    """``voxelize`` with per-point class labels: each voxel gets its most frequent label.

    Returns ``(coords, features, voxel_labels, spatial_shape)``; ties go to the smaller
    label. ``labels`` are ints in ``[0, num_classes)``, one per point.
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != len(points) or labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
        raise ValueError(f"need one label in [0, {num_classes}) per point, got {labels.shape[0]} labels "
                         f"for {len(points)} points")
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    coords, features, shape = voxelize(np.concatenate([np.asarray(points, np.float32), one_hot], axis=1),
                                       voxel_size, coors_range)
    return coords, features[:, :-num_classes], features[:, -num_classes:].argmax(axis=1).astype(np.int32), shape


def position_features(xyz, centre, scale: float = 10.0):
    """Network inputs from voxel positions: ``(xyz - centre) / scale`` and a constant 1,
    float32 ``[M, 4]`` (numpy in, numpy out; JAX in, JAX out). The segmentation examples
    and tests feed these to a ``MinkUNet``: centred, metre-scale coordinates keep the first
    layer's inputs near unit size, and the constant channel lets it see occupancy alone."""
    xp = np if isinstance(xyz, np.ndarray) else jnp
    xyz = xp.asarray(xyz, xp.float32)
    centre = xp.asarray(centre, xp.float32)
    return xp.concatenate([(xyz - centre) / scale, xp.ones((xyz.shape[0], 1), xp.float32)], axis=1)


def kitti_tensor(paths_or_points, voxel_size: float | Sequence[float] = 0.05,
                 coors_range: Sequence[float] = KITTI_RANGE, capacity: int | None = None) -> SparseConvTensor:
    """A batch of voxelized scans as one ``SparseConvTensor``.

    Args:
      paths_or_points: a ``.bin`` path or a ``[N, F]`` point array, or a list of them
        (one batch item each, in order).
      voxel_size, coors_range: as in ``voxelize``.
      capacity: row capacity; None picks ``capacity_bucket`` of the total voxel count.

    Returns:
      Features float32 ``[capacity, F]`` (per-voxel means), indices int32
      ``[capacity, 4]`` as ``(batch, z, y, x)``, ``spatial_shape`` ``(z, y, x)``.
    """
    if isinstance(paths_or_points, (str, os.PathLike, np.ndarray)):
        paths_or_points = [paths_or_points]
    coords, features, spatial_shape = [], [], None
    for b, item in enumerate(paths_or_points):
        points = item if isinstance(item, np.ndarray) else load_kitti_points(item)
        c, f, spatial_shape = voxelize(points, voxel_size, coors_range)
        coords.append(np.concatenate([np.full((len(c), 1), b, np.int32), c], axis=1))
        features.append(f)
    if not coords:
        raise ValueError("kitti_tensor needs at least one scan")
    if len({f.shape[1] for f in features}) > 1:
        raise ValueError(f"scans have different numbers of point features: {[f.shape[1] for f in features]}")
    return from_numpy(np.concatenate(features), np.concatenate(coords), spatial_shape,
                      batch_size=len(coords), capacity=capacity)
