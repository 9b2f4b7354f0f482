"""SparseConvTensor: construction, conversion, pytree behaviour, bad input, capacities and overflow."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv as jsc
import sparse_testing as T


def _tensor(rng, **kwargs):
    return T.random_tensor(rng, 2, (6, 7, 5), 4, **kwargs)


# ---- construction and conversion --------------------------------------------------

def test_dense_round_trip(rng):
    x = _tensor(rng)
    dense = x.dense()
    assert dense.shape == (2, 6, 7, 5, 4)
    np.testing.assert_array_equal(T.at_sites(dense, x.indices), np.asarray(x.features)[np.asarray(x.active)])
    assert np.count_nonzero(np.any(np.asarray(dense) != 0, axis=-1)) == int(x.num_active)
    np.testing.assert_array_equal(x.dense(channels_first=True), np.moveaxis(np.asarray(dense), -1, 1))
    back = jsc.SparseConvTensor.from_dense(dense)
    assert T.site_set(back.indices) == T.site_set(x.indices)
    np.testing.assert_array_equal(back.dense(), dense)


def test_from_dense_under_jit_with_capacity(rng):
    x = _tensor(rng)
    n = int(x.num_active)
    y = jax.jit(functools.partial(jsc.SparseConvTensor.from_dense, capacity=n + 5))(x.dense())
    assert y.capacity == n + 5 and int(y.num_active) == n
    np.testing.assert_array_equal(y.dense(), x.dense())
    small = jax.jit(functools.partial(jsc.SparseConvTensor.from_dense, capacity=n - 1))(x.dense())
    with pytest.raises(jsc.CapacityOverflowError, match=f"needed {n} active rows but its capacity is {n - 1}"):
        jsc.check_overflow(small)
    with pytest.raises(jsc.CapacityOverflowError, match=f"needed {n}"):
        jsc.SparseConvTensor.from_dense(x.dense(), capacity=n - 1)


def test_attributes_and_replace_feature(rng):
    x = _tensor(rng, padding_rows=5)
    assert x.capacity == x.features.shape[0] and x.ndim == 3 and x.num_channels == 4
    assert int(x.num_active) == x.capacity - 5
    y = x.replace_feature(jnp.ones((x.capacity, 2)))
    np.testing.assert_array_equal(np.asarray(y.features)[:, 0], np.asarray(x.active, np.float32))
    assert y.indices is x.indices


def test_pad_to_and_capacity_bucket(rng):
    x = _tensor(rng)
    y = x.pad_to(x.capacity + 7)
    assert y.capacity == x.capacity + 7 and int(y.num_active) == int(x.num_active)
    np.testing.assert_array_equal(y.dense(), x.dense())
    with pytest.raises(ValueError, match="below the current capacity"):
        x.pad_to(x.capacity - 1)
    for n in [0, 1, 255, 256, 257, 1000, 5000, 80_000, 91_234]:
        bucket = jsc.capacity_bucket(n)
        assert bucket >= max(n, 256) and bucket <= max(1.25 * n, 256) + 1
    assert len({jsc.capacity_bucket(n) for n in range(70_000, 90_000, 100)}) <= 3


def test_from_numpy_pads_to_a_bucket(rng):
    x = _tensor(rng, padding_rows=0)
    t = jsc.from_numpy(np.asarray(x.features), np.asarray(x.indices), x.spatial_shape, 2)
    assert t.capacity == jsc.capacity_bucket(x.capacity)
    np.testing.assert_array_equal(t.dense(), x.dense())
    with pytest.raises(jsc.CapacityOverflowError, match="do not fit"):
        jsc.from_numpy(np.asarray(x.features), np.asarray(x.indices), x.spatial_shape, 2, capacity=3)


def test_numpy_inputs_work_eagerly(rng):
    x = _tensor(rng)
    t = jsc.SparseConvTensor(np.asarray(x.features), np.asarray(x.indices), x.spatial_shape, 2)
    y = jsc.sparse_conv(t, np.ones((3, 3, 3, 4, 2), np.float32), subm=True)
    assert y.features.shape == (x.capacity, 2)


# ---- transformations ----------------------------------------------------------------

def test_pytree_through_jit_grad_vmap_scan(backend, rng):
    x = _tensor(rng)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4, 4)) / 10, jnp.float32)
    conv = functools.partial(jsc.sparse_conv, subm=True, indice_key="s", backend=backend)

    leaves, treedef = jax.tree_util.tree_flatten(conv(x, kernel))
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.spatial_shape == x.spatial_shape and "s" in rebuilt.indice_dict

    eager = conv(x, kernel)
    jitted = jax.jit(conv)(x, kernel)
    np.testing.assert_allclose(jitted.features, eager.features, rtol=1e-6, atol=1e-6)

    # vmap over a stack of tensors equals a loop.
    xs = [_tensor(rng, padding_rows=0, density=0.1).pad_to(200) for _ in range(3)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *xs)
    batched = jax.vmap(lambda t: conv(t, kernel).features)(stacked)
    for i, xi in enumerate(xs):
        np.testing.assert_allclose(batched[i], conv(xi, kernel).features, rtol=1e-6, atol=1e-6)

    # lax.scan carries a tensor through repeated layers sharing one rulebook.
    def layer(t, _):
        return t.replace_feature(jax.nn.relu(conv(t, kernel).features)), None
    scanned, _ = jax.lax.scan(layer, conv(x, kernel), None, length=3)
    looped = conv(x, kernel)
    for _ in range(3):
        looped = looped.replace_feature(jax.nn.relu(conv(looped, kernel).features))
    np.testing.assert_allclose(scanned.features, looped.features, rtol=1e-5, atol=1e-6)

    grad = jax.grad(lambda t: jnp.sum(conv(t, kernel).features ** 2), allow_int=True)(x)
    assert isinstance(grad, jsc.SparseConvTensor) and grad.features.shape == x.features.shape


def test_indice_key_reuses_one_rulebook(backend, rng, monkeypatch):
    impl = jsc.backends.get(backend)
    builds = []
    original = impl.build_rulebook
    monkeypatch.setattr(impl, "build_rulebook", lambda *a: builds.append(a[1].mode) or original(*a))
    x = _tensor(rng)
    k3 = jnp.ones((3, 3, 3, 4, 4), jnp.float32)

    @jax.jit
    def net(x):
        x = jsc.sparse_conv(x, k3, subm=True, indice_key="subm1", backend=backend)
        x = jsc.sparse_conv(x, k3, subm=True, indice_key="subm1", backend=backend)
        y = jsc.sparse_conv(x, k3, strides=2, padding=1, indice_key="down", out_capacity=200, backend=backend)
        y = jsc.sparse_conv(y, k3, subm=True, indice_key="subm2", backend=backend)
        y = jsc.sparse_conv(y, k3, subm=True, indice_key="subm2", backend=backend)
        return jsc.sparse_conv(y, k3, inverse=True, indice_key="down", backend=backend)

    out = net(x)
    assert builds == ["subm", "regular", "subm"]
    assert sorted(out.indice_dict) == ["down", "subm1", "subm2"]
    np.testing.assert_array_equal(out.indices, x.indices)


# ---- bad input ----------------------------------------------------------------------

def _bad_tensor(change):
    features = np.ones((3, 2), np.float32)
    indices = np.array([[0, 1, 2], [0, 3, 4], [-1, -1, -1]], np.int32)
    kwargs = dict(features=features, indices=indices, spatial_shape=(5, 6), batch_size=2)
    change(kwargs)
    return jsc.SparseConvTensor(**kwargs)


def _set(name, value):
    return lambda kw: kw.__setitem__(name, value)


def _set_site(row, value):
    def change(kw):
        kw["indices"] = kw["indices"].copy()
        kw["indices"][row] = value
    return change


@pytest.mark.parametrize("change,message", [
    (_set_site(1, [0, 5, 0]), "outside spatial_shape"),
    (_set_site(1, [0, 1, 6]), "outside spatial_shape"),
    (_set_site(1, [0, -2, 1]), "negative"),
    (_set_site(1, [2, 1, 1]), "batch index 2 >= batch_size 2"),
    (_set_site(2, [0, 1, 2]), "duplicate site \\(0, 1, 2\\)"),
    (_set("features", np.ones((3, 2), np.int32)), "floating point"),
    (_set("indices", np.zeros((3, 3), np.float32)), "int32"),
    (_set("indices", np.zeros((3, 3), np.int64)), "int32"),
    (_set("features", np.ones((3,), np.float32)), "features must be \\[capacity, C\\]"),
    (_set("indices", np.zeros((3, 4), np.int32)), "indices must be \\[capacity, ndim \\+ 1\\]"),
    (_set("features", np.ones((4, 2), np.float32)), "features has 4 rows but indices has 3"),
    (_set("spatial_shape", (5, 6, 7, 8, 9)), "1 to 4 dims"),
    (_set("spatial_shape", (5, 0)), "must be positive"),
    (_set("batch_size", 0), "must be positive"),
])
def test_bad_tensor_raises(change, message):
    with pytest.raises(ValueError, match=message):
        _bad_tensor(change)


@pytest.mark.parametrize("kwargs,kernel_shape,message", [
    (dict(subm=True), (2, 2, 2, 3), "odd kernel sizes"),
    (dict(subm=True, transposed=True), (3, 3, 2, 3), "at most one of"),
    (dict(), (3, 3, 3, 3), "kernel must be"),
    (dict(), (3, 3, 3), "kernel must be"),
    (dict(strides=(1, 2, 3)), (3, 3, 2, 3), "strides must be an int or 2 ints"),
    (dict(strides=0), (3, 3, 2, 3), "strides must be >= 1"),
    (dict(padding=-1), (3, 3, 2, 3), "padding must be >= 0"),
    (dict(kernel_dilation=1), (3, 3, 2, 3), "unexpected keyword"),
    (dict(backend="cuda"), (3, 3, 2, 3), "unknown backend"),
    (dict(inverse=True), (3, 3, 2, 3), "needs the indice_key"),
    (dict(inverse=True, indice_key="nope"), (3, 3, 2, 3), "not in the tensor's indice_dict"),
    (dict(), (9, 9, 2, 3), "empty output shape"),
])
def test_bad_conv_arguments_raise(kwargs, kernel_shape, message):
    x = _bad_tensor(lambda kw: None)
    with pytest.raises((ValueError, TypeError), match=message):
        jsc.sparse_conv(x, jnp.ones(kernel_shape), **kwargs)


def test_mismatched_indice_key_raises():
    x = _bad_tensor(lambda kw: None)
    y = jsc.sparse_conv(x, jnp.ones((3, 3, 2, 2)), subm=True, indice_key="a")
    with pytest.raises(ValueError, match="does not match"):
        jsc.sparse_conv(y, jnp.ones((5, 5, 2, 2)), subm=True, indice_key="a")
    with pytest.raises(ValueError, match="inverts a regular"):
        jsc.sparse_conv(y, jnp.ones((3, 3, 2, 2)), inverse=True, indice_key="a")
    z = jsc.sparse_conv(y, jnp.ones((3, 3, 2, 2)), strides=2, indice_key="down")
    with pytest.raises(ValueError, match="differs from the kernel_size"):
        jsc.sparse_conv(z, jnp.ones((2, 2, 2, 2)), inverse=True, indice_key="down")


@pytest.mark.parametrize("row,message", [([0, 9, 0], "lies outside"), ([0, 1, 2], "duplicate site")])
@pytest.mark.parametrize("subm", [True, False])
def test_ffi_rejects_bad_sites_under_jit(row, message, subm):
    """Under jit the Python checks cannot see values; the ffi rulebook builder still refuses."""
    indices = jnp.asarray(np.array([[0, 1, 2], [0, 3, 4], row], np.int32))
    x = jsc.SparseConvTensor(jnp.ones((3, 2)), indices, (5, 6), 2, validate=False)
    conv = jax.jit(lambda x: jsc.sparse_conv(x, jnp.ones((3, 3, 2, 2)), subm=subm, backend="ffi").features)
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(conv(x))


# ---- capacity overflow ----------------------------------------------------------------

def test_overflow_raises_eagerly_and_is_flagged_under_jit(backend, rng):
    x = _tensor(rng, density=0.5)
    kernel = jnp.ones((3, 3, 3, 4, 1), jnp.float32)
    full = jsc.sparse_conv(x, kernel, padding=1, out_capacity=10_000, backend=backend)  # sites grow
    needed = int(full.num_active)
    assert needed > x.capacity
    with pytest.raises(jsc.CapacityOverflowError, match=f"needed {needed} active rows but its capacity is 20"):
        jsc.sparse_conv(x, kernel, padding=1, out_capacity=20, backend=backend)

    conv = jax.jit(functools.partial(jsc.sparse_conv, padding=1, out_capacity=20, backend=backend))
    y = conv(x, kernel)
    np.testing.assert_array_equal(y.overflow, [needed, 20])
    with pytest.raises(jsc.CapacityOverflowError, match=f"needed {needed}"):
        jsc.check_overflow({"out": y, "other": jnp.ones(3)})
    with pytest.raises(jsc.CapacityOverflowError):
        y.check_overflow()
    # The flag travels through later layers, and a roomy capacity clears nothing it should not.
    z = jax.jit(functools.partial(jsc.sparse_conv, subm=True, backend=backend))(y, jnp.ones((3, 3, 3, 1, 1)))
    np.testing.assert_array_equal(z.overflow, [needed, 20])
    ok = jax.jit(functools.partial(jsc.sparse_conv, padding=1, out_capacity=needed, backend=backend))(x, kernel)
    jsc.check_overflow(ok)
    np.testing.assert_array_equal(ok.features, full.features[:needed])


def test_indice_key_on_other_sites_raises_or_is_dropped():
    """A cached rulebook never applies to rows it was not built on."""
    x = jsc.SparseConvTensor(jnp.asarray([[1.0], [10.0], [100.0]]), jnp.asarray([[0, 2], [0, 0], [0, 1]], jnp.int32),
                             (4,), 1)
    shift = jnp.asarray([[[1.0]], [[0.0]], [[0.0]]])  # y[i] = x[i - 1]
    x = jsc.sparse_conv(x, shift, subm=True, indice_key="k")
    moved = jsc.SparseConvTensor(x.features, jnp.asarray([[0, 1], [0, 0], [0, 2]], jnp.int32), (4,), 1, x.indice_dict)
    with pytest.raises(ValueError, match="built on other sites"):
        jsc.sparse_conv(moved, shift, subm=True, indice_key="k")
    down = jsc.sparse_conv(x, jnp.ones((2, 1, 1)), strides=2, indice_key="down")
    swapped = jsc.SparseConvTensor(down.features, down.indices[::-1], (2,), 1, down.indice_dict)
    with pytest.raises(ValueError, match="sites differ from the output sites"):
        jsc.sparse_conv(swapped, jnp.ones((2, 1, 1)), inverse=True, indice_key="down")

    # A union re-sorts the rows: rulebooks on the inputs' sites are dropped, not reused.
    empty = jsc.SparseConvTensor(jnp.zeros((0, 1)), jnp.zeros((0, 2), jnp.int32), (4,), 1)
    union = jsc.functional.sparse_add(x, empty)
    assert "k" not in union.indice_dict and "down" not in union.indice_dict
    y = jsc.sparse_conv(union, shift, subm=True, indice_key="k")
    np.testing.assert_array_equal(np.asarray(union.indices[:, 1]), [0, 1, 2])
    np.testing.assert_array_equal(np.asarray(y.features[:, 0]), np.asarray(union.features[:, 0][jnp.asarray([0, 0, 1])]) * [0, 1, 1])
