"""The numpy voxelizer and its labeled variant, against hand-built point sets."""

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
