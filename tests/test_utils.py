"""The numpy voxelizer and its labeled variant, against hand-built point sets."""

import jax.numpy as jnp
import numpy as np
import pytest

from jax_sparseconv import utils

RANGE = (0.0, 0.0, 0.0, 4.0, 2.0, 1.0)  # a 4 x 2 x 1 grid of 1 m voxels


def test_voxelize_averages_points_and_drops_outside_and_nan():
    points = np.array([[0.5, 0.5, 0.5, 1.0], [0.7, 0.1, 0.2, 3.0],  # voxel (z, y, x) = (0, 0, 0)
                       [3.5, 1.5, 0.5, 5.0],                        # voxel (0, 1, 3)
                       [4.5, 0.5, 0.5, 7.0], [np.nan, 0.5, 0.5, 1.0]], np.float32)  # outside, NaN
    coords, features, shape = utils.voxelize(points, 1.0, RANGE)
    assert shape == (1, 2, 4)
    np.testing.assert_array_equal(coords, [[0, 0, 0], [0, 1, 3]])
    np.testing.assert_allclose(features, [[0.6, 0.3, 0.35, 2.0], [3.5, 1.5, 0.5, 5.0]], rtol=1e-6)


def test_voxelize_labels_takes_the_most_frequent_label():
    points = np.array([[0.5, 0.5, 0.5], [0.6, 0.5, 0.5], [0.7, 0.5, 0.5],  # voxel 0: labels 2, 3, 3
                       [1.5, 0.5, 0.5], [1.6, 0.5, 0.5]], np.float32)      # voxel 1: labels 4, 1 (tie)
    labels = np.array([[2], [3], [3], [4], [1]], np.int32)
    coords, features, voxel_labels, shape = utils.voxelize_labels(points, labels, 5, 1.0, RANGE)
    np.testing.assert_array_equal(coords, [[0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(voxel_labels, [3, 1])  # a tie goes to the smaller label
    np.testing.assert_allclose(features[:, 0], [0.6, 1.55], rtol=1e-6)
    with pytest.raises(ValueError, match="one label in"):
        utils.voxelize_labels(points, labels + 1, 5, 1.0, RANGE)


def test_position_features_numpy_and_jax():
    xyz = np.array([[1.0, 2.0, 3.0], [11.0, -8.0, 3.0]], np.float32)
    expected = [[0.0, 0.0, 0.0, 1.0], [1.0, -1.0, 0.0, 1.0]]
    np.testing.assert_allclose(utils.position_features(xyz, (1.0, 2.0, 3.0)), expected)
    assert isinstance(utils.position_features(jnp.asarray(xyz), (1.0, 2.0, 3.0)), jnp.ndarray)
    np.testing.assert_allclose(utils.position_features(jnp.asarray(xyz), (1.0, 2.0, 3.0)), expected)


def test_points_in_boxes_by_hand():
    box = np.array([[10.0, 2.0, -1.0, 4.0, 2.0, 1.5, np.pi / 2]])  # 4 m long along +y, 2 m wide along x
    points = np.array([[10.0, 3.9, -1.0], [10.0, 4.1, -1.0], [10.9, 2.0, -1.0], [11.1, 2.0, -1.0],
                       [10.0, 2.0, -0.3], [10.0, 2.0, -0.2]])
    np.testing.assert_array_equal(utils.points_in_boxes(points, box), [[True, False, True, False, True, False]])


@pytest.mark.parametrize("frame", ["000000", "000001", "000002"])
def test_kitti_boxes_hold_the_object_points(frame, shared_data):
    """Camera-frame labels moved into the LiDAR frame: each box holds LiDAR points, and more
    of them than the same box turned by 90 degrees or moved 3 m sideways."""
    names, boxes = utils.load_kitti_boxes(shared_data(f"kitti/{frame}_label_2.txt"),
                                          shared_data(f"kitti/{frame}_calib.txt"))
    points = utils.load_kitti_points(shared_data(f"kitti/{frame}.bin"))
    assert len(names) == len(boxes) > 0 and "DontCare" not in names
    inside = utils.points_in_boxes(points, boxes).sum(axis=1)
    turned, moved = boxes.copy(), boxes.copy()
    turned[:, 6] += np.pi / 2
    moved[:, 1] += 3.0
    assert np.all(inside >= 5)
    assert inside.sum() > utils.points_in_boxes(points, turned).sum()
    assert inside.sum() > utils.points_in_boxes(points, moved).sum()
