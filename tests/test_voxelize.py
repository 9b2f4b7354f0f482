"""jit-able voxelization against the numpy voxelizer and hand-checked properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv as jsc
from jax_sparseconv import utils
from jax_sparseconv import voxels as V

RANGE = (-4.0, -3.0, -1.0, 4.0, 3.0, 1.0)


def _points(rng, n=3000, features=4, nan=20, outside=30):
    points = rng.uniform([-4, -3, -1, 0], [4, 3, 1, 1], size=(n, features)).astype(np.float32)
    points[rng.choice(n, outside, replace=False), 0] = 9.0  # outside the range
    points[rng.choice(n, nan, replace=False), rng.integers(0, features)] = np.nan
    return points


@pytest.mark.parametrize("voxel_size", [0.5, (0.4, 0.5, 0.25)])
def test_mean_voxels_match_numpy(voxel_size, rng):
    points = _points(rng)
    coords, features, shape = utils.voxelize(points, voxel_size, RANGE)
    v = jax.jit(V.voxelize, static_argnums=(1, 2, 3))(points, voxel_size, RANGE, len(coords) + 10)
    assert v.spatial_shape == shape and int(v.num_voxels) == len(coords) and int(v.num_invalid) == 20
    np.testing.assert_array_equal(v.coords[:len(coords)], coords)
    assert np.all(np.asarray(v.coords[len(coords):]) == -1) and np.all(np.asarray(v.num_points[len(coords):]) == 0)
    np.testing.assert_allclose(v.features[:len(coords)], features, rtol=1e-5, atol=1e-6)
    # Every kept point lies in its voxel; dropped points are the invalid and outside ones.
    p2v = np.asarray(v.point_to_voxel)
    finite = np.isfinite(points).all(axis=1)
    size = np.broadcast_to(np.float32(voxel_size), 3)
    cells = np.floor((points[:, :3] - np.float32(RANGE[:3])) / size)[:, ::-1]  # float32, as spconv
    inside = finite & np.all((cells >= 0) & (cells < np.asarray(shape)), axis=1)
    np.testing.assert_array_equal(p2v >= 0, inside)
    np.testing.assert_array_equal(np.asarray(v.coords)[p2v[inside]], cells[inside].astype(np.int32))
    np.testing.assert_array_equal(np.bincount(p2v[inside], minlength=v.coords.shape[0]), v.num_points)


def test_point_cap_and_first_point(rng):
    points = _points(rng, n=500, nan=0, outside=0)
    cap = 3
    v = V.voxelize(points, 1.0, RANGE, 200, max_points_per_voxel=cap)
    first = V.voxelize(points, 1.0, RANGE, 200, reduce="first")
    cells = np.floor((points[:, :3] - np.asarray(RANGE[:3])) / 1.0)[:, ::-1].astype(np.int32)
    for row, coord in enumerate(np.asarray(v.coords)[:int(v.num_voxels)]):
        members = np.flatnonzero(np.all(cells == coord, axis=1))  # input order
        kept = members[:cap]
        np.testing.assert_allclose(v.features[row], points[kept].mean(axis=0), rtol=1e-5, atol=1e-6)
        assert int(v.num_points[row]) == len(kept)
        np.testing.assert_array_equal(np.flatnonzero(np.asarray(v.point_to_voxel) == row), kept)
        np.testing.assert_array_equal(first.features[row], points[members[0]])


def test_max_voxels_overflow_is_reported(rng):
    points = _points(rng)
    needed = len(utils.voxelize(points, 0.5, RANGE)[0])
    with pytest.raises(jsc.CapacityOverflowError, match=f"needed {needed}"):
        V.voxelize(points, 0.5, RANGE, 10)
    v = jax.jit(V.voxelize, static_argnums=(1, 2, 3))(points, 0.5, RANGE, 10)
    np.testing.assert_array_equal(v.overflow, [needed, 10])
    assert int(jnp.sum(v.point_to_voxel >= 0)) == int(jnp.sum(v.num_points))  # only the stored voxels' points
    with pytest.raises(jsc.CapacityOverflowError):
        jsc.check_overflow(V.to_tensor(v))


def test_batching_scans_into_one_tensor(rng):
    scans = [_points(rng, n=n) for n in (800, 1200)]
    voxelize = jax.jit(V.voxelize, static_argnums=(1, 2, 3))
    x = V.to_tensor([voxelize(points, 0.5, RANGE, 768) for points in scans])
    assert x.batch_size == 2 and x.capacity == 1536 and x.spatial_shape == (4, 12, 16)
    jsc.check_overflow(x)
    for b, points in enumerate(scans):
        coords, features, _ = utils.voxelize(points, 0.5, RANGE)
        rows = np.asarray(x.indices[:, 0]) == b
        np.testing.assert_array_equal(np.asarray(x.indices)[rows, 1:], coords)
        np.testing.assert_allclose(np.asarray(x.features)[rows], features, rtol=1e-5, atol=1e-6)
    y = jsc.sparse_conv(x, jnp.ones((3, 3, 3, 4, 2)), subm=True)  # a valid tensor for the ops
    assert y.features.shape == (1536, 2)


def test_real_scan_voxels_match_numpy_on_voxel_boundaries(shared_data):
    """KITTI points at 0.05 x 0.05 x 0.1 m: many lie within one float32 rounding of a voxel
    boundary, where dividing by the voxel size and multiplying by its reciprocal disagree."""
    points = utils.load_kitti_points(shared_data("kitti/000000.bin"))
    size = (0.05, 0.05, 0.1)
    coords, features, _ = utils.voxelize(points, size, utils.KITTI_RANGE)
    v = jax.jit(V.voxelize, static_argnums=(1, 2, 3))(points, size, utils.KITTI_RANGE, 45_000)
    assert int(v.num_voxels) == len(coords)
    np.testing.assert_array_equal(v.coords[:len(coords)], coords)
    np.testing.assert_allclose(v.features[:len(coords)], features, rtol=1e-5, atol=1e-5)


def test_majority_labels_match_numpy(rng):
    points = _points(rng, nan=10, outside=10)
    labels = rng.integers(0, 5, len(points)).astype(np.int32)
    finite = np.isfinite(points).all(axis=1)
    coords, _, voxel_labels, _ = utils.voxelize_labels(points[finite], labels[finite], 5, 0.5, RANGE)
    v = V.voxelize(points, 0.5, RANGE, len(coords) + 7)
    majority = np.asarray(jax.jit(V.majority_labels, static_argnums=2)(v, labels, 5))
    np.testing.assert_array_equal(majority[:len(coords)], voxel_labels)
    assert np.all(majority[len(coords):] == -1)
    with pytest.raises(ValueError, match="one label per point"):
        V.majority_labels(v, labels[1:], 5)


def test_to_tensor_in_a_larger_grid(rng):
    v = V.voxelize(_points(rng), 0.5, RANGE, 800)  # grid (4, 12, 16)
    x = V.to_tensor(v, spatial_shape=(5, 12, 16))
    assert x.spatial_shape == (5, 12, 16)
    np.testing.assert_array_equal(x.indices[:, 1:], v.coords)
    with pytest.raises(ValueError, match="does not hold the voxel grid"):
        V.to_tensor(v, spatial_shape=(4, 11, 16))
    ones = V.to_tensor(v, jnp.ones((800, 2)))  # given features: zero on the padding rows
    np.testing.assert_array_equal(ones.features[:, 0], np.asarray(v.num_points) > 0)
