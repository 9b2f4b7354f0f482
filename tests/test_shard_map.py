"""Ops, layers, models and synchronized batch norm under ``jax.shard_map`` on 2 host devices
(conftest asks for 2 CPU devices), with its default ``check_vma=True`` and with
``check_vma=False``, forward and gradients, against the unsharded computation (in float64,
to 1e-10).

Each case is a per-device loss ``local_loss(params, features, indices)`` of one shard. The
unsharded reference runs the same function on both shards on one device, under ``jax.vmap``
with the mesh axis name (so that the batch norms' ``psum`` spans both shards), and
differentiates the sum of the two losses. Sharded, the loss is summed with ``psum``.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jax_sparseconv as jsc
from jax_sparseconv import functional as F
from jax_sparseconv import linen as spnn
from jax_sparseconv import models
from jax_sparseconv import nnx as spnnx
import sparse_testing as T

AXIS = "d"
SHAPE = (8, 8, 8)
GRID_SITES = int(np.prod(SHAPE))  # an out_capacity that cannot overflow
C_IN, C_OUT = 4, 5


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices("cpu")) < 2:
        pytest.fail("conftest.py should have set jax_num_cpu_devices to 2 before JAX started")
    return Mesh(np.array(jax.devices("cpu")[:2]), (AXIS,))


def _shards(rng, shape=SHAPE, channels=C_IN, density=0.15):
    """``(features [2, capacity, C], indices [2, capacity, ndim + 1])``: one random tensor per device."""
    xs = [T.random_tensor(rng, 1, shape, channels, density=density) for _ in range(2)]
    capacity = max(x.capacity for x in xs)
    xs = [x.pad_to(capacity) for x in xs]
    return jnp.stack([x.features for x in xs]), jnp.stack([x.indices for x in xs])


def _sharded(local_loss, mesh, check_vma, params, features, indices):
    """``(loss, d_params, d_features)`` of the summed loss of the shards, under shard_map."""
    def per_device(params, features, indices):
        if check_vma:  # the gradient of the psum-ed loss is the global one
            total = lambda p, f: jax.lax.psum(local_loss(p, f, indices[0]), AXIS)  # noqa: E731
            loss, (d_params, d_features) = jax.value_and_grad(total, argnums=(0, 1))(params, features[0])
        else:  # without types of varying axes: sum the local gradients
            loss, (d_params, d_features) = jax.value_and_grad(local_loss, argnums=(0, 1))(
                params, features[0], indices[0])
            loss, d_params = jax.lax.psum((loss, d_params), AXIS)
        return loss, d_params, d_features[None]

    step = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)),
                         out_specs=(P(), P(), P(AXIS)), check_vma=check_vma)
    return jax.jit(step)(params, features, indices)


def _unsharded(local_loss, params, features, indices):
    """The same on one device: both shards under vmap with the mesh axis name."""
    def total(params, features):
        losses = jax.vmap(local_loss, in_axes=(None, 0, 0), axis_name=AXIS)(params, features, indices)
        return jnp.sum(losses)

    loss, (d_params, d_features) = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(params, features)
    return loss, d_params, d_features


def _assert_matches_unsharded(local_loss, mesh, check_vma_modes, params, features, indices):
    """In float64: summed in another order, float32 gradients of deep networks (batch norms
    over both devices) differ by more than any bound that would still tell errors apart."""
    with jax.enable_x64(True):
        params, features = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), (params, features))
        expected = _unsharded(local_loss, params, features, indices)
        for check_vma in check_vma_modes:
            got = _sharded(local_loss, mesh, check_vma, params, features, indices)
            _assert_close(got, expected, f"check_vma={check_vma}")


def _assert_close(got, expected, where):
    for name, a, b in zip(("loss", "params gradient", "features gradient"), got, expected):
        name = f"{where}: {name}"
        leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
        assert len(leaves_a) == len(leaves_b) > 0
        assert all(leaf.dtype == np.float64 for leaf in leaves_a), f"{name}: not computed in float64"
        # Bounds relative to the largest entry of the whole tree: some entries are zero up to
        # rounding (a bias before a batch norm, a kernel an op does not use).
        scale = max(float(np.abs(y).max()) for y in leaves_b)
        assert scale > 0, f"{name}: a zero reference tells nothing apart"
        for x, y in zip(leaves_a, leaves_b):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-10, atol=1e-10 * scale, err_msg=name)


def _tensor(features, indices, shape=SHAPE):
    return jsc.SparseConvTensor(features, indices, shape, 1, validate=False)


def _squares(x: jsc.SparseConvTensor):
    """A loss whose gradient differs in every entry: sum of (features + 1)^2 on active rows."""
    return jnp.sum(jnp.where(x.active[:, None], jnp.square(x.features + 1.0), 0.0))


# Per-device losses of every op: params is a dict of kernels.
def _subm(params, f, i, backend):
    return F.sparse_conv(_tensor(f, i), params["k3"], subm=True, indice_key="subm", backend=backend)


OPS = {
    "subm": lambda p, f, i, b: _squares(_subm(p, f, i, b)),
    "regular": lambda p, f, i, b: _squares(
        F.sparse_conv(_tensor(f, i), p["k3"], strides=2, padding=1, out_capacity=2 * f.shape[0], backend=b)),
    "transposed": lambda p, f, i, b: _squares(
        F.sparse_conv(_tensor(f, i), p["k2"], strides=2, transposed=True, backend=b)),
    "inverse": lambda p, f, i, b: _squares(F.sparse_conv(
        F.sparse_conv(_tensor(f, i), p["k3"], strides=2, padding=1, indice_key="down", backend=b),
        p["k3_back"], inverse=True, indice_key="down", backend=b)),
    "max_pool": lambda p, f, i, b: _squares(F.sparse_max_pool(_subm(p, f, i, b), 2, backend=b)),
    "avg_pool": lambda p, f, i, b: _squares(F.sparse_avg_pool(_subm(p, f, i, b), 3, 2, padding=1, backend=b)),
    "global_max_pool": lambda p, f, i, b: jnp.sum(jnp.square(F.global_max_pool(_subm(p, f, i, b)) + 1)),
    "global_avg_pool": lambda p, f, i, b: jnp.sum(jnp.square(F.global_avg_pool(_subm(p, f, i, b)) + 1)),
    # The union paths: the sites of a padded stride-1 conv are a superset of the input's.
    "sparse_add": lambda p, f, i, b: _squares(F.sparse_add(
        _subm(p, f, i, b), F.sparse_conv(_tensor(f, i), p["k3"], padding=1, out_capacity=GRID_SITES, backend=b))),
    "sparse_cat": lambda p, f, i, b: _squares(F.sparse_cat(
        _subm(p, f, i, b), F.sparse_conv(_tensor(f, i), p["k3"], padding=1, out_capacity=GRID_SITES, backend=b))),
}


def _kernels(rng):
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape) * 0.3, jnp.float32)  # noqa: E731
    return {"k3": normal(3, 3, 3, C_IN, C_OUT), "k2": normal(2, 2, 2, C_IN, C_OUT),
            "k3_back": normal(3, 3, 3, C_OUT, C_IN)}


@pytest.mark.parametrize("op", sorted(OPS))
def test_ops_match_unsharded(op, backend, mesh, rng):
    _check_op_matches_unsharded(op, backend, mesh, rng)


@pytest.mark.parametrize("op", ["max_pool", "avg_pool", "sparse_add", "sparse_cat"])
def test_row_blocks_match_unsharded(op, mesh, rng, small_row_blocks):
    """The xla backend's pools and the union, computed in blocks of rows, under shard_map."""
    _check_op_matches_unsharded(op, "xla", mesh, rng)


def _check_op_matches_unsharded(op, backend, mesh, rng):
    features, indices = _shards(rng)
    local_loss = functools.partial(lambda p, f, i, fn: fn(p, f, i, backend), fn=OPS[op])
    _assert_matches_unsharded(local_loss, mesh, (True, False), _kernels(rng), features, indices)


def test_voxelize_matches_unsharded(mesh, rng):
    """Each device voxelizes its own points; the gradient reaches the points' features."""
    points = jnp.asarray(np.concatenate([rng.uniform(0, 4, size=(2, 300, 3)), rng.normal(size=(2, 300, 2))],
                                        axis=-1), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 5, 3)), jnp.float32)

    def local_loss(kernel, points, indices):
        del indices
        voxels = jsc.voxelize(points, 0.5, (0, 0, 0, 4, 4, 4), max_voxels=256)
        return _squares(F.sparse_conv(jsc.voxels.to_tensor(voxels), kernel, subm=True))

    dummy_indices = jnp.zeros((2, 1), jnp.int32)
    _assert_matches_unsharded(local_loss, mesh, (True, False), kernel, points, dummy_indices)


# ---- layers and models, with batch norms synchronized over the mesh axis ------------------

def _linen_case(backend, rng):
    """Every Linen layer kind in one network; its batch norm reduces over both devices."""
    layers = spnn.SparseSequential([
        spnn.SubMConv3d(6, 3, indice_key="s", backend=backend), spnn.SparseBatchNorm(axis_name=AXIS), nn.relu,
        spnn.SparseConv3d(6, 3, strides=2, padding=1, indice_key="down", out_capacity=2.0, backend=backend),
        spnn.SparseLayerNorm(), spnn.SparseMaxPool3d(2, strides=1, padding=1, out_capacity=4.0, backend=backend),
        spnn.SparseGroupNorm(num_groups=2), spnn.SparseAvgPool3d(3, strides=1, padding=1, out_capacity=2.0,
                                                                 backend=backend),
        spnn.SparseConvTranspose3d(6, 2, strides=2, out_capacity=8.0, backend=backend),
        spnn.SparseGlobalMaxPool()])
    features, indices = _shards(rng)
    variables = layers.init(jax.random.key(0), _tensor(features[0], indices[0]), use_running_average=True)

    def local_loss(params, f, i):
        pooled, _ = layers.apply({**variables, "params": params}, _tensor(f, i), use_running_average=False,
                                 mutable=["batch_stats"])
        return jnp.sum(jnp.square(pooled + 1))

    return local_loss, variables["params"], features, indices


def _nnx_case(backend, rng):
    """NNX layers, with an inverse conv and a batch norm across devices."""
    rngs = nnx.Rngs(0)
    layers = spnnx.SparseSequential(
        spnnx.SubMConv3d(C_IN, 6, 3, indice_key="s", backend=backend, rngs=rngs),
        spnnx.SparseBatchNorm(6, use_running_average=False, axis_name=AXIS, rngs=rngs), nnx.relu,
        spnnx.SparseConv3d(6, 6, 3, strides=2, padding=1, indice_key="down", backend=backend, rngs=rngs),
        spnnx.SparseInverseConv3d(6, 5, 3, indice_key="down", backend=backend, rngs=rngs),
        spnnx.SparseGroupNorm(5, num_groups=1, rngs=rngs), spnnx.SparseGlobalAvgPool())
    graph, params, rest = nnx.split(layers, nnx.Param, ...)

    def local_loss(params, f, i):
        return jnp.sum(jnp.square(nnx.merge(graph, params, rest, copy=True)(_tensor(f, i)) + 1))

    features, indices = _shards(rng)
    return local_loss, params, features, indices


def _model_case(model, shape, density, rng):
    features, indices = _shards(rng, shape, density=density)
    variables = model.init(jax.random.key(0), _tensor(features[0], indices[0], shape))

    def local_loss(params, f, i):
        out, _ = model.apply({**variables, "params": params}, _tensor(f, i, shape), train=True,
                             mutable=["batch_stats"])
        return _squares(out) / 1000.0

    return local_loss, variables["params"], features, indices


CASES = {
    "linen_layers": _linen_case,
    "nnx_layers": _nnx_case,
    "minkunet": lambda backend, rng: _model_case(
        models.MinkUNet(7, stem_features=8, encoder_features=(8,), decoder_features=(8,), blocks_per_stage=1,
                        out_capacities=(1.0,), axis_name=AXIS, backend=backend), SHAPE, 0.15, rng),
    "voxel_backbone": lambda backend, rng: _model_case(
        models.VoxelBackBone8x(features=(4, 8, 8, 8, 8), axis_name=AXIS, backend=backend), (25, 16, 16), 0.05, rng),
}


# The xla backend's larger programs compile slowly: on the default run its MinkUNet and NNX cases
# stand for them (the ops above run on both backends).
SLOW_ON_XLA = {"linen_layers", "voxel_backbone"}


@pytest.mark.parametrize("case,backend", [
    pytest.param(case, backend, marks=[pytest.mark.slow] if backend == "xla" and case in SLOW_ON_XLA else [])
    for case in sorted(CASES) for backend in ("ffi", "xla")])
def test_layers_and_models_match_unsharded(case, backend, mesh, rng):
    """With the default check_vma; without it too on the ffi backend (the xla backend's
    whole networks compile slowly, and check_vma=False adds nothing to what they test)."""
    local_loss, params, features, indices = CASES[case](backend, rng)
    modes = (True, False) if backend == "ffi" else (True,)
    _assert_matches_unsharded(local_loss, mesh, modes, params, features, indices)
