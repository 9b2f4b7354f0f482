"""Sparse and global pooling against dense float64 references, on both backends."""

import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_sparseconv as jsc
import sparse_testing as T
from jax_sparseconv.geometry import REGULAR, make_geometry

SHAPES = {1: (13,), 2: (7, 9), 3: (6, 7, 5), 4: (4, 5, 4, 3)}


def _cases(per_ndim, seed):
    r = random.Random(seed)
    cases = []
    for ndim, shape in SHAPES.items():
        while sum(len(c[0]) == ndim for c in cases) < per_ndim:
            k = tuple(r.choice([1, 2, 3]) for _ in range(ndim))
            s = tuple(r.choice([1, 2, 3]) for _ in range(ndim)) if r.random() < 0.7 else None
            p = tuple(r.choice([0, 1]) for _ in range(ndim))
            d = tuple(r.choice([1, 2]) for _ in range(ndim))
            try:
                make_geometry(REGULAR, shape, k, k if s is None else s, p, d)
            except ValueError:
                continue
            cases.append((shape, k, s, p, d, r.choice([1, 2, 3])))
    return cases


CASES = _cases(per_ndim=2, seed=5)
POOLS = {"max": (jsc.sparse_max_pool, T.dense_max_pool), "avg": (jsc.sparse_avg_pool, T.dense_avg_pool)}


def _ids(case):
    return "-".join(str(v).replace(" ", "") for v in case)


def _distinct_negative_features(x, rng):
    """``x`` with distinct negative float64 features 0.01 apart: a max over active inputs must
    not return 0, and finite differences in check_grads never cross a tie."""
    spread = rng.permutation(x.features.size).reshape(x.features.shape)
    return x.replace_feature(-0.1 - 0.01 * jnp.asarray(spread, jnp.float64))


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_pool_matches_dense(case, kind, backend, rng):
    shape, k, s, p, d, batch_size = case
    sparse_pool, dense_pool = POOLS[kind]
    with jax.enable_x64(True):
        x = T.random_tensor(rng, batch_size, shape, 3, dtype=np.float64)
        if kind == "max":
            x = _distinct_negative_features(x, rng)
        geometry = make_geometry(REGULAR, shape, k, k if s is None else s, p, d)
        capacity = x.capacity * geometry.max_outputs_per_input()
        pool = jax.jit(functools.partial(sparse_pool, kernel_size=k, strides=s, padding=p, dilation=d,
                                         out_capacity=capacity, backend=backend))
        y = pool(x)
        mask = T.active_mask(x)
        sites = T.dense_sites(mask, geometry)
        assert T.site_set(y.indices) == T.dense_site_set(sites)
        dense_pool = jax.jit(dense_pool, static_argnums=2)
        ref = dense_pool(x.dense(), mask, geometry)
        active = np.asarray(y.active)
        np.testing.assert_allclose(np.asarray(y.features)[active], T.at_sites(ref, y.indices), rtol=1e-12)
        assert not np.asarray(y.features)[~active].any()
        if kind == "max":
            assert (np.asarray(y.features)[active] < 0).all()

        cot = jnp.asarray(rng.normal(size=y.features.shape))
        grad = jax.jit(jax.grad(lambda f: jnp.sum(pool(x.replace_feature(f)).features * cot)))(x.features)
        dense_cot = jsc.SparseConvTensor(cot, y.indices, y.spatial_shape, y.batch_size, validate=False).dense()

        def dense_loss(xd):
            out = dense_pool(xd, mask, geometry)
            return jnp.sum(jnp.where(sites[..., None], out, 0) * dense_cot)

        ref_grad = jax.jit(jax.grad(dense_loss))(x.dense())
        np.testing.assert_allclose(np.asarray(grad)[np.asarray(x.active)], T.at_sites(ref_grad, x.indices),
                                   rtol=1e-12, atol=1e-12)
        assert not np.asarray(grad)[~np.asarray(x.active)].any()
        check_grads(jax.jit(lambda f: pool(x.replace_feature(f)).features), (x.features,), order=1, modes=["rev"])


def test_max_pool_gradient_goes_to_first_maximum(backend):
    """Ties: the whole gradient goes to the first offset attaining the max (deterministic)."""
    x = jsc.SparseConvTensor(jnp.ones((3, 1)), jnp.asarray([[0, 0], [0, 1], [0, 3]], jnp.int32), (4,), 1)
    grad = jax.grad(lambda f: jsc.sparse_max_pool(x.replace_feature(f), 2, backend=backend).features.sum())(
        x.features)
    np.testing.assert_array_equal(grad[:, 0], [1.0, 0.0, 1.0])


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_global_pool_matches_numpy(kind, rng):
    with jax.enable_x64(True):
        x = T.random_tensor(rng, 3, (5, 6, 4), 4, density=0.2, dtype=np.float64)
        # Batch item 1 is left empty: its result is 0 and it gets no gradient.
        keep = np.asarray(x.indices[:, 0]) != 1
        x = jsc.SparseConvTensor(jnp.where(keep[:, None], x.features, 0),
                                 jnp.where(keep[:, None], x.indices, -1), x.spatial_shape, 3)
        if kind == "max":
            x = _distinct_negative_features(x, rng)
        pool = jsc.global_max_pool if kind == "max" else jsc.global_avg_pool
        out = jax.jit(pool)(x)
        features, batch = np.asarray(x.features), np.asarray(x.indices[:, 0])
        for b in range(3):
            rows = features[batch == b]
            expected = 0 if len(rows) == 0 else (rows.max(0) if kind == "max" else rows.mean(0))
            np.testing.assert_allclose(out[b], expected, rtol=1e-12)
        check_grads(jax.jit(lambda f: pool(x.replace_feature(f))), (x.features,), order=1, modes=["rev"])
        grad = jax.grad(lambda f: pool(x.replace_feature(f)).sum())(x.features)
        assert not np.asarray(grad)[batch != 0][batch[batch != 0] < 0].any()  # padding rows
        if kind == "avg":
            for b in (0, 2):
                np.testing.assert_allclose(np.asarray(grad)[batch == b], 1.0 / (batch == b).sum())


def test_xla_pools_in_row_blocks_are_bitwise_the_same(request, rng):
    """Rows of the xla backend's pool kernels computed in blocks (``xla.ROW_BLOCK``, with a
    last block that overlaps the one before): bitwise the results of one pass."""
    from jax_sparseconv.backends import xla
    n, m, k, c = 40, 50, 8, 3
    x = jnp.asarray(rng.normal(size=(n, c)), jnp.float32)
    x = x.at[::2].set(x[1::2])  # ties: argk must pick the first offset either way
    nbr = jnp.asarray(np.where(rng.random((k, m)) < 0.7, rng.integers(0, n, (k, m)), -1), jnp.int32)
    g = jnp.asarray(rng.normal(size=(m, c)), jnp.float32)
    in_nbr = jnp.asarray(np.where(rng.random((k, n)) < 0.7, rng.integers(0, m, (k, n)), -1), jnp.int32)

    def run():
        out, argk = xla.gather_max(x, nbr)
        return xla.gather_sum(x, nbr), out, argk, xla.gather_max_grad(g, argk[:m], in_nbr)

    whole = run()
    request.getfixturevalue("small_row_blocks")  # 50 rows: blocks at 0, 7, ..., 42, 43
    for a, b in zip(whole, run()):
        np.testing.assert_array_equal(a, b)
