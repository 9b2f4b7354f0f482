"""A real KITTI scan at 0.05 m through a small network under jit, checked against dense convs on a crop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv as jsc
import sparse_testing as T
from jax_sparseconv.geometry import REGULAR, SUBM, make_geometry
from jax_sparseconv.utils import KITTI_RANGE, kitti_tensor

CHANNELS = (4, 8, 16, 16, 8)
# A 64 x 64 column (all z) around the densest part of scan 000000, at even voxel coordinates so
# that the stride-2 grid of the crop lines up with that of the scan; results are compared
# MARGIN voxels away from the crop's sides, beyond the network's receptive field.
CROP_YX, CROP_SIZE, MARGIN = (656, 64), 64, 12


@pytest.fixture(scope="module")
def scan(shared_data):
    return kitti_tensor(shared_data("kitti/000000.bin"), voxel_size=0.05, coors_range=KITTI_RANGE)


def network(x, weights, backend):
    """SubM -> strided conv -> SubM -> inverse conv, ReLUs between (a MinkUNet-like level)."""
    relu = lambda t: t.replace_feature(jax.nn.relu(t.features))  # noqa: E731
    x1 = relu(jsc.sparse_conv(x, weights[0], subm=True, indice_key="subm1", backend=backend))
    x2 = relu(jsc.sparse_conv(x1, weights[1], strides=2, padding=1, indice_key="down1",
                              out_capacity=2 * x.capacity, backend=backend))
    x3 = relu(jsc.sparse_conv(x2, weights[2], subm=True, indice_key="subm2", backend=backend))
    x4 = jsc.sparse_conv(x3, weights[3], inverse=True, indice_key="down1", backend=backend)
    return x1, x3, x4


def dense_network(xd, mask, weights, shape):
    sub1 = make_geometry(SUBM, shape, 3)
    down = make_geometry(REGULAR, shape, 3, 2, 1)
    sub2 = make_geometry(SUBM, down.out_shape, 3)
    coarse = T.dense_sites(mask, down)[..., None]
    x1 = jnp.where(mask[..., None], jax.nn.relu(T.dense_conv(xd, weights[0], sub1)), 0)
    x2 = jnp.where(coarse, jax.nn.relu(T.dense_conv(x1, weights[1], down)), 0)
    x3 = jnp.where(coarse, jax.nn.relu(T.dense_conv(x2, weights[2], sub2)), 0)
    x4 = jnp.where(mask[..., None], T.dense_inverse_conv(x3, weights[3], down), 0)
    return x1, x3, x4


def _inside(indices, low, high):
    return np.all((indices[:, 2:] >= low) & (indices[:, 2:] < high), axis=1) & (indices[:, 0] >= 0)


@pytest.mark.parametrize("backend", [pytest.param("xla", marks=pytest.mark.slow), "ffi"])
def test_kitti_network_matches_dense_on_crop(scan, backend, rng):
    weights = [jnp.asarray(rng.normal(size=(3, 3, 3, ci, co)) / np.sqrt(27 * ci), jnp.float32)
               for ci, co in zip(CHANNELS, CHANNELS[1:])]
    outputs = jax.jit(functools.partial(network, backend=backend))(scan, weights)
    jsc.check_overflow(outputs)
    assert int(scan.num_active) > 40_000 and scan.spatial_shape == (80, 1600, 1408)
    np.testing.assert_array_equal(outputs[2].indices, scan.indices)

    # The crop of the scan, as its own grid.
    low, size = np.asarray(CROP_YX), CROP_SIZE
    indices = np.asarray(scan.indices)
    keep = _inside(indices, low, low + size)
    crop_shape = (scan.spatial_shape[0], size, size)
    crop = jsc.SparseConvTensor(np.asarray(scan.features)[keep], (indices[keep] - np.r_[0, 0, low]).astype(np.int32),
                             crop_shape, 1)
    with jax.enable_x64(True):
        w64 = [jnp.asarray(np.asarray(w, np.float64)) for w in weights]
        xd = jnp.asarray(np.asarray(crop.dense(), np.float64))
        dense = jax.jit(dense_network, static_argnums=3)(xd, T.active_mask(crop), w64, crop_shape)

    for out, ref, scale in zip(outputs, dense, (1, 2, 1)):
        rows = np.asarray(out.indices)
        crop_low, crop_high = low // scale, (low + size) // scale
        interior = _inside(rows, crop_low + MARGIN // scale, crop_high - MARGIN // scale)
        local = rows[interior] - np.r_[0, 0, crop_low]
        assert interior.sum() > 200
        np.testing.assert_allclose(np.asarray(out.features)[interior], np.asarray(ref)[tuple(local.T)],
                                   rtol=2e-4, atol=2e-5)
        # Exactly these sites are active in the interior of the dense result.
        sites = (T.dense_sites(T.active_mask(crop), make_geometry(REGULAR, crop_shape, 3, 2, 1)) if scale == 2
                 else T.active_mask(crop))
        inner = slice(MARGIN // scale, (size - MARGIN) // scale)
        assert np.asarray(sites)[0][:, inner, inner].sum() == interior.sum()
