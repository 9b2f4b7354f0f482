"""sparse_add and sparse_cat: shared-indices and union alignment against numpy float64 dense
references, jit, gradients, capacities and overflow, bad input, kept rulebooks, determinism."""

import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv as jsc
import sparse_testing as T
from jax_sparseconv.functional import sparse_add, sparse_cat

SHAPES = {1: (13,), 2: (7, 9), 3: (6, 7, 5), 4: (4, 5, 4, 3)}
OPS = {"add": sparse_add, "cat": sparse_cat}


def _cases(seed):
    """Each (ndim, tensor count) once per op pair, so both ops see every ndim and count."""
    r = random.Random(seed)
    return [(op, ndim, count if op == "add" else 5 - count, r.choice([1, 2, 3]))
            for op in OPS for ndim, count in zip(SHAPES, [2, 3, 2, 3])]


CASES = _cases(seed=11)


def _ids(case):
    op, ndim, count, batch_size = case
    return f"{op}-{ndim}d-{count}tensors-b{batch_size}"


def _np_dense(x) -> np.ndarray:
    """``[B, *spatial, C]`` float64, built in numpy from the active rows only."""
    features, indices = np.asarray(x.features, np.float64), np.asarray(x.indices)
    out = np.zeros((x.batch_size, *x.spatial_shape, features.shape[1]))
    active = indices[:, 0] >= 0
    out[tuple(indices[active].T)] = features[active]
    return out


def _inputs(rng, op, count, batch_size, shape, dtype=np.float64):
    """``count`` tensors on independent random site sets (which overlap at random)."""
    channels = [int(rng.integers(1, 5))] * count if op == "add" else [int(rng.integers(1, 5)) for _ in range(count)]
    return [T.random_tensor(rng, batch_size, shape, c, density=float(rng.uniform(0.1, 0.5)),
                            padding_rows=int(rng.integers(0, 5)), dtype=dtype) for c in channels]


def _reference(op, tensors) -> np.ndarray:
    dense = [_np_dense(t) for t in tensors]
    return functools.reduce(np.add, dense) if op == "add" else np.concatenate(dense, axis=-1)


def _check_union_result(out, tensors, op, capacity):
    """Sites are the union, sorted, padding zero and last; dense values match numpy."""
    assert out.capacity == capacity and out.features.shape == (capacity, out.num_channels)
    assert out.spatial_shape == tensors[0].spatial_shape and out.batch_size == tensors[0].batch_size
    union = set().union(*(T.site_set(t.indices) for t in tensors))
    assert T.site_set(out.indices) == union
    indices, features = np.asarray(out.indices), np.asarray(out.features)
    n = len(union)
    active = indices[:, 0] >= 0
    assert active[:n].all() and not active[n:].any(), "active rows must come first"
    rows = [tuple(int(v) for v in row) for row in indices[:n]]
    assert rows == sorted(rows) and len(set(rows)) == n, "rows must be sorted by (batch, coords)"
    assert (indices[n:] == -1).all() and not features[n:].any()
    np.testing.assert_allclose(_np_dense(out), _reference(op, tensors), rtol=1e-12, atol=0)
    # Row by row too, not only through the dense array.
    np.testing.assert_allclose(features[:n], T.at_sites(_reference(op, tensors), indices), rtol=1e-12, atol=0)


# ---- shared indices ----------------------------------------------------------------------

@pytest.mark.parametrize("op", ["add", "cat"])
@pytest.mark.parametrize("count", [2, 3])
def test_shared_indices_combine_row_by_row(op, count, rng):
    with jax.enable_x64(True):
        a = T.random_tensor(rng, 2, (6, 7, 5), 3, dtype=np.float64)
        widths = [3] * count if op == "add" else [3] + [int(rng.integers(1, 5)) for _ in range(count - 1)]
        others = [a.replace_feature(jnp.asarray(rng.normal(size=(a.capacity, c)))) for c in widths[1:]]
        tensors = [a] + others
        rows = [np.asarray(t.features) for t in tensors]
        expected = functools.reduce(np.add, rows) if op == "add" else np.concatenate(rows, axis=1)

        out = OPS[op](*tensors)
        assert out.indices is a.indices and out.capacity == a.capacity
        np.testing.assert_array_equal(out.features, expected)
        # out_capacity equal to the shared capacity keeps the shared rows too.
        assert OPS[op](*tensors, out_capacity=a.capacity).indices is a.indices

        # Under jit the residual branch is built inside the traced function, as in a model.
        @functools.partial(jax.jit, static_argnums=0)
        def combine(out_capacity, a, *features):
            return OPS[op](a, *[a.replace_feature(f) for f in features], out_capacity=out_capacity)

        jitted = combine(None, a, *[t.features for t in others])
        np.testing.assert_array_equal(jitted.indices, a.indices)
        np.testing.assert_array_equal(jitted.features, expected)

        # A different out_capacity realigns onto the sorted union (here: a's sites).
        wide = combine(a.capacity + 4, a, *[t.features for t in others])
        _check_union_result(wide, tensors, op, a.capacity + 4)


# ---- different site sets ------------------------------------------------------------------

@pytest.fixture(params=["whole", "row-blocks"])
def row_block(request):
    """Union rows gathered at once, or in blocks of a few rows (``small_row_blocks``)."""
    if request.param == "row-blocks":
        request.getfixturevalue("small_row_blocks")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_union_matches_numpy(case, rng, row_block):
    op, ndim, count, batch_size = case
    with jax.enable_x64(True):
        tensors = _inputs(rng, op, count, batch_size, SHAPES[ndim])
        out = jax.jit(OPS[op])(*tensors)
        _check_union_result(out, tensors, op, sum(t.capacity for t in tensors))
        assert not np.asarray(out.overflow).any()


@pytest.mark.parametrize("op", ["add", "cat"])
def test_union_with_out_capacity(op, rng):
    with jax.enable_x64(True):
        tensors = _inputs(rng, op, 2, 2, (6, 7))
        needed = len(set().union(*(T.site_set(t.indices) for t in tensors)))
        for capacity in (needed, needed + 3):
            out = jax.jit(functools.partial(OPS[op], out_capacity=capacity))(*tensors)
            _check_union_result(out, tensors, op, capacity)
            np.testing.assert_array_equal(out.overflow, [0, 0])


@pytest.mark.parametrize("op", ["add", "cat"])
def test_empty_and_zero_capacity_inputs(op, rng):
    with jax.enable_x64(True):
        a = T.random_tensor(rng, 2, (5, 6), 2, dtype=np.float64)
        empty = T.random_tensor(rng, 2, (5, 6), 2, density=0.0, min_active=0, padding_rows=4, dtype=np.float64)
        none = T.random_tensor(rng, 2, (5, 6), 2, density=0.0, min_active=0, padding_rows=0, dtype=np.float64)
        assert int(empty.num_active) == 0 and none.capacity == 0
        tensors = [none, a, empty]
        _check_union_result(jax.jit(OPS[op])(*tensors), tensors, op, a.capacity + 4)
        only_padding = jax.jit(OPS[op])(empty, none)
        assert only_padding.capacity == 4 and int(only_padding.num_active) == 0
        assert not np.asarray(only_padding.features).any()
        nothing = jax.jit(functools.partial(OPS[op], out_capacity=3))(none, none)
        assert nothing.capacity == 3 and int(nothing.num_active) == 0 and not np.asarray(nothing.features).any()


# ---- gradients ------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["add", "cat"])
@pytest.mark.parametrize("shared", [False, True], ids=["union", "shared"])
def test_gradients_match_dense_reference(op, shared, rng, row_block):
    count = 3
    with jax.enable_x64(True):
        if shared:
            a = T.random_tensor(rng, 2, (6, 7), 2, dtype=np.float64)
            widths = [2] * (count - 1) if op == "add" else [int(rng.integers(1, 4)) for _ in range(count - 1)]
            tensors = [a] + [a.replace_feature(jnp.asarray(rng.normal(size=(a.capacity, c)))) for c in widths]
        else:
            tensors = _inputs(rng, op, count, 2, (6, 7))
        channels = [t.num_channels for t in tensors]
        out_channels = channels[0] if op == "add" else sum(channels)
        w = rng.normal(size=(2, 6, 7, out_channels))

        def loss(*features):
            if shared:  # one indices object, so the shared-rows path is taken
                combined = OPS[op](*[T.with_raw_features(tensors[0], f) for f in features])
            else:
                combined = OPS[op](*[T.with_raw_features(t, f) for t, f in zip(tensors, features)])
            return jnp.sum(jnp.asarray(w) * combined.dense())

        grads = jax.jit(jax.grad(loss, argnums=tuple(range(count))))(*[t.features for t in tensors])
        start = 0
        for t, c, grad in zip(tensors, channels, grads):
            indices, active = np.asarray(t.indices), np.asarray(t.active)
            # d/df sum(w * dense) at an active row is w at its site (its channel block for cat).
            block = w if op == "add" else w[..., start:start + c]
            start += 0 if op == "add" else c
            np.testing.assert_allclose(np.asarray(grad)[active], block[tuple(indices[active].T)], rtol=1e-12)
            assert not np.asarray(grad)[~active].any(), "padding rows must get zero gradient"


# ---- capacity and overflow ------------------------------------------------------------------

def test_out_capacity_too_small_overflows(rng):
    tensors = _inputs(rng, "add", 2, 2, (6, 7, 5), dtype=np.float32)  # equal channels: valid for both ops
    needed = len(set().union(*(T.site_set(t.indices) for t in tensors)))
    first = tensors[0]
    flagged = jsc.SparseConvTensor(first.features, first.indices, first.spatial_shape, first.batch_size,
                                   overflow=jnp.asarray([77, 5], jnp.int32))
    for op in OPS.values():
        with pytest.raises(jsc.CapacityOverflowError,
                           match=f"needed {needed} active rows but its capacity is {needed - 1}"):
            op(*tensors, out_capacity=needed - 1)
        small = jax.jit(functools.partial(op, out_capacity=needed - 1))
        out = small(*tensors)
        assert out.capacity == needed - 1
        np.testing.assert_array_equal(out.overflow, [needed, needed - 1])
        with pytest.raises(jsc.CapacityOverflowError, match=f"needed {needed} active rows"):
            jsc.check_overflow(out)
        with pytest.raises(jsc.CapacityOverflowError):
            jsc.check_overflow({"out": [out]})

        # An input's earlier overflow record is kept and wins over the new one.
        np.testing.assert_array_equal(small(flagged, *tensors[1:]).overflow, [77, 5])
        np.testing.assert_array_equal(op(flagged, flagged.replace_feature(first.features)).overflow, [77, 5])


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["add", "cat"])
def test_mismatched_grids_raise(op, rng):
    a = T.random_tensor(rng, 2, (5, 6), 2)
    with pytest.raises(ValueError, match="different grids"):
        OPS[op](a, T.random_tensor(rng, 2, (5, 7), 2))
    with pytest.raises(ValueError, match="different grids"):
        OPS[op](a, T.random_tensor(rng, 3, (5, 6), 2))
    with pytest.raises(ValueError, match="different grids"):
        OPS[op](a, a.replace_feature(a.features), T.random_tensor(rng, 1, (5, 6), 2))
    with pytest.raises(ValueError, match="different grids"):
        jax.jit(OPS[op])(a, T.random_tensor(rng, 2, (5, 6, 1), 2))
    with pytest.raises(ValueError, match="at least one"):
        OPS[op]()
    with pytest.raises(TypeError, match="SparseConvTensor"):
        OPS[op](a, a.features)


def test_sparse_add_mismatched_channels_raise(rng):
    a = T.random_tensor(rng, 2, (5, 6), 2)
    with pytest.raises(ValueError, match="equal channel counts"):
        sparse_add(a, a.replace_feature(jnp.ones((a.capacity, 3))))  # shared indices
    with pytest.raises(ValueError, match="equal channel counts"):
        jax.jit(sparse_add)(a, T.random_tensor(rng, 2, (5, 6), 3))  # union


def test_sparse_cat_promotes_dtypes(rng):
    a = T.random_tensor(rng, 2, (5, 6), 2, dtype=np.float32)
    b = T.random_tensor(rng, 2, (5, 6), 3)
    b = b.replace_feature(b.features.astype(jnp.bfloat16))
    out = jax.jit(sparse_cat)(b, a)
    assert out.features.dtype == jnp.float32 and out.num_channels == 5
    np.testing.assert_array_equal(_np_dense(out), np.concatenate([_np_dense(b), _np_dense(a)], axis=-1))


# ---- rulebooks and determinism ----------------------------------------------------------------

def test_indice_dict_entries_are_kept(backend, rng):
    a = T.random_tensor(rng, 2, (6, 7, 5), 3)
    b = T.random_tensor(rng, 2, (6, 7, 5), 3)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 3, 3)), jnp.float32)

    @jax.jit
    def convs(a, b):
        conv = functools.partial(jsc.sparse_conv, kernel=kernel, subm=True, backend=backend)
        a1 = conv(conv(a, indice_key="k1"), indice_key="both")
        b1 = conv(conv(b, indice_key="k2"), indice_key="both")
        return a1, b1

    a1, b1 = convs(a, b)
    a2 = a1.replace_feature(-a1.features)
    for op in OPS.values():
        # Different sites (union rows), under jit: the arrays of every entry come through.
        out = jax.jit(op)(a1, b1)
        assert sorted(out.indice_dict) == ["both", "k1", "k2"]
        for key, owner in (("both", a1), ("k1", a1), ("k2", b1)):  # the first tensor wins for "both"
            for field in ("in_indices", "out_indices", "out_nbr", "in_nbr"):
                np.testing.assert_array_equal(getattr(out.indice_dict[key], field),
                                              getattr(owner.indice_dict[key], field))
        # Shared rows, eagerly: the very same rulebook objects.
        assert op(a1, a2).indice_dict["both"] is a1.indice_dict["both"]


def test_deterministic(rng):
    with jax.enable_x64(True):
        tensors = _inputs(rng, "add", 3, 2, (6, 7, 5))  # equal channels: valid for both ops
        for name, op in OPS.items():
            runs = [op(*tensors) for _ in range(2)] + [jax.jit(op)(*tensors) for _ in range(2)]
            _check_union_result(runs[0], tensors, name, sum(t.capacity for t in tensors))  # the eager path
            for run in runs[1:]:
                np.testing.assert_array_equal(run.indices, runs[0].indices)
                np.testing.assert_array_equal(run.features, runs[0].features)

            def loss(features):
                return jnp.sum(jnp.sin(op(*[T.with_raw_features(t, f) for t, f in zip(tensors, features)]).features))

            grad_fn = jax.jit(jax.grad(loss))
            grads = [grad_fn([t.features for t in tensors]) for _ in range(2)]
            for g0, g1 in zip(*grads):
                np.testing.assert_array_equal(g0, g1)
