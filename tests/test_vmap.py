"""jax.vmap over stacks of SparseConvTensors: every op and a Linen model equal a loop over the items,
gradients too, on both backends; the ffi backend folds the mapped axis into one native
call instead of looping, and per-item overflow is reported per item."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv as jsc
from jax_sparseconv import linen as spnn
import sparse_testing as T
from jax_sparseconv.functional import sparse_add

SHAPE = (6, 7, 5)
ITEMS = 3


def _stack(rng, channels=3, batch_size=2):
    """ITEMS random tensors with different sites, padded to one capacity, and their stack."""
    xs = [T.random_tensor(rng, batch_size, SHAPE, channels, density=0.2) for _ in range(ITEMS)]
    capacity = max(x.capacity for x in xs)
    xs = [x.pad_to(capacity) for x in xs]
    return xs, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *xs)


def _conv(kind, backend):
    kw = {"subm": dict(subm=True), "regular": dict(strides=2, padding=1, out_capacity=120),
          "transposed": dict(transposed=True, strides=2, out_capacity=4290)}[kind]
    return lambda x, k: jsc.sparse_conv(x, k, backend=backend, indice_key="key", **kw)


OPS = {
    "subm": lambda b: _conv("subm", b),
    "regular": lambda b: _conv("regular", b),
    "transposed": lambda b: _conv("transposed", b),
    "inverse": lambda b: lambda x, k: jsc.sparse_conv(
        _conv("regular", b)(x, k), jnp.swapaxes(k, -1, -2)[..., :3], inverse=True, indice_key="key", backend=b),
    "max_pool": lambda b: lambda x, k: jsc.sparse_max_pool(x, 2, backend=b),
    "avg_pool": lambda b: lambda x, k: jsc.sparse_avg_pool(x, 3, 2, 1, backend=b, out_capacity=150),
    "global_max": lambda b: lambda x, k: jsc.global_max_pool(x),
    "add": lambda b: lambda x, k: sparse_add(x, _conv("subm", b)(x, k)),
}


def _features(y):
    return y.features if isinstance(y, jsc.SparseConvTensor) else y


@pytest.mark.parametrize("op", list(OPS))
def test_vmap_equals_a_loop(op, backend, rng):
    _check_vmap_equals_a_loop(op, backend, rng)


@pytest.mark.parametrize("op", ["max_pool", "avg_pool", "add"])
def test_vmap_of_row_blocks_equals_a_loop(op, rng, small_row_blocks):
    """The xla backend's pools and the union, computed in blocks of rows, under vmap."""
    _check_vmap_equals_a_loop(op, "xla", rng)


def _check_vmap_equals_a_loop(op, backend, rng):
    xs, stacked = _stack(rng)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 3, 3)) / 5, jnp.float32)
    fn = OPS[op](backend)

    def loss(features, x, kernel):
        return jnp.sum(_features(fn(x.replace_feature(features), kernel)) ** 2)

    batched = jax.jit(jax.vmap(fn, in_axes=(0, None)))(stacked, kernel)
    grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 2)), in_axes=(0, 0, None)))(stacked.features, stacked, kernel)
    for i, x in enumerate(xs):
        expected = jax.jit(fn)(x, kernel)
        got = jax.tree_util.tree_map(lambda a: a[i], batched)
        np.testing.assert_allclose(_features(got), _features(expected), rtol=1e-5, atol=1e-5)
        if isinstance(expected, jsc.SparseConvTensor):
            np.testing.assert_array_equal(got.indices, expected.indices)
            np.testing.assert_array_equal(got.overflow, expected.overflow)
        d_features, d_kernel = jax.jit(jax.grad(loss, argnums=(0, 2)))(x.features, x, kernel)
        np.testing.assert_allclose(grads[0][i], d_features, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(grads[1][i], d_kernel, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["subm", "regular"])
def test_ffi_folds_the_mapped_axis_into_one_call(kind, rng):
    _, stacked = _stack(rng)
    kernel = jnp.ones((3, 3, 3, 3, 3), jnp.float32)
    jaxpr = str(jax.make_jaxpr(jax.vmap(_conv(kind, "ffi"), in_axes=(0, None)))(stacked, kernel))
    assert jaxpr.count("jsc_build_rulebook") == 1 and jaxpr.count("jsc_gather_matmul") == 1
    assert "while" not in jaxpr  # no per-item loop


def test_per_item_kernels_and_overflow(backend, rng):
    """An ensemble (one kernel per item) falls back to per-item calls; an item whose
    output does not fit reports its own overflow, the others none."""
    xs, stacked = _stack(rng)
    kernels = jnp.asarray(rng.normal(size=(ITEMS, 3, 3, 3, 3, 3)) / 5, jnp.float32)
    conv = functools.partial(jsc.sparse_conv, subm=True, backend=backend)
    batched = jax.jit(jax.vmap(conv))(stacked, kernels)
    for i, x in enumerate(xs):
        np.testing.assert_allclose(batched.features[i], conv(x, kernels[i]).features, rtol=1e-5, atol=1e-5)

    counts = [int(jsc.sparse_max_pool(x, 2, out_capacity=400).num_active) for x in xs]
    capacity = max(counts) - 1  # the largest item overflows; smaller ones (if any differ) fit
    pooled = jax.jit(jax.vmap(lambda x: jsc.sparse_max_pool(x, 2, out_capacity=capacity, backend=backend)))(stacked)
    for i, count in enumerate(counts):
        expected = [count, capacity] if count > capacity else [0, 0]
        np.testing.assert_array_equal(pooled.overflow[i], expected)
    with pytest.raises(jsc.CapacityOverflowError):
        jsc.check_overflow(pooled)


def test_vmap_of_a_linen_model_equals_a_loop(backend, rng):
    xs, stacked = _stack(rng, batch_size=1)
    model = spnn.SparseSequential([
        spnn.SubMConv3d(6, 3, indice_key="s", backend=backend), spnn.SparseBatchNorm(use_running_average=False), nn.relu,
        spnn.SparseConv3d(8, 2, strides=2, indice_key="down", backend=backend),
        spnn.SparseInverseConv3d(6, 2, indice_key="down", backend=backend), spnn.SparseGlobalMaxPool()])
    variables = model.init(jax.random.key(0), xs[0])
    apply = lambda x: model.apply(variables, x, mutable=["batch_stats"])[0]  # noqa: E731
    batched = jax.jit(jax.vmap(apply))(stacked)
    for i, x in enumerate(xs):
        np.testing.assert_allclose(batched[i], jax.jit(apply)(x), rtol=1e-5, atol=1e-5)
