"""Sparse convolutions against a dense float64 reference, on both backends."""

import dataclasses
import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_sparseconv as jsc
import sparse_testing as T
from jax_sparseconv.geometry import REGULAR, SUBM, TRANSPOSED, make_geometry

SHAPES = {1: (13,), 2: (7, 9), 3: (6, 7, 5), 4: (4, 5, 4, 3)}


@dataclasses.dataclass(frozen=True)
class Case:
    mode: str
    spatial_shape: tuple
    kernel_size: tuple
    strides: tuple
    padding: tuple
    dilation: tuple
    channels: tuple  # (C_in, C_out)
    batch_size: int

    def geometry(self):
        return make_geometry(self.mode, self.spatial_shape, self.kernel_size, self.strides, self.padding,
                             self.dilation)

    def __str__(self):
        return (f"{self.mode}-{len(self.spatial_shape)}d-k{self.kernel_size}-s{self.strides}-p{self.padding}"
                f"-d{self.dilation}-c{self.channels}-b{self.batch_size}").replace(" ", "")


def _cases(per_mode: int, seed: int) -> list[Case]:
    """Configurations covering ndim 1-4, kernels 1-5, strides 1-3, padding 0-2, dilation 1-2,
    per-dim and scalar arguments; fixed at collection, inputs are fresh each run."""
    r = random.Random(seed)
    cases = []
    for ndim, shape in SHAPES.items():
        for mode in (SUBM, REGULAR, TRANSPOSED):
            while sum(c.mode == mode and len(c.spatial_shape) == ndim for c in cases) < per_mode:
                def pick(choices):
                    if r.random() < 0.5:
                        return (r.choice(choices),) * ndim
                    return tuple(r.choice(choices) for _ in range(ndim))
                kernels = [1, 3, 5] if mode == SUBM else ([1, 2, 3] if ndim == 4 else [1, 2, 3, 4, 5])
                case = Case(mode, shape, pick(kernels), pick([1, 2, 3]), pick([0, 1, 2]), pick([1, 2]),
                            r.choice([(1, 1), (3, 4), (8, 5)]), r.choice([1, 2, 3]))
                try:
                    case.geometry()
                except ValueError:
                    continue
                cases.append(case)
    return cases


CASES = _cases(per_mode=3, seed=2)
GRAD_CASES = _cases(per_mode=1, seed=3)


def _conv_kwargs(case: Case) -> dict:
    return dict(strides=case.strides, padding=case.padding, dilation=case.dilation, subm=case.mode == SUBM,
                transposed=case.mode == TRANSPOSED)


def _out_capacity(x, case):
    """An ample capacity: the geometry's bound on output sites."""
    g = case.geometry()
    return min(x.capacity * g.max_outputs_per_input(), case.batch_size * int(np.prod(g.out_shape))) + 2


def _reference(x, kernel, bias, case):
    """Dense float64 result and output-site mask for ``case``."""
    with jax.enable_x64(True):
        xd = jnp.asarray(np.asarray(x.dense(), np.float64))
        out = T.dense_conv(xd, jnp.asarray(np.asarray(kernel, np.float64)), case.geometry())
        out = out + np.asarray(bias, np.float64)
        sites = T.dense_sites(T.active_mask(x), case.geometry())
        return np.asarray(out), np.asarray(sites)


def _check_against_reference(x, y, kernel, bias, case, rtol, atol):
    ref, sites = _reference(x, kernel, bias, case)
    assert T.site_set(y.indices) == T.dense_site_set(sites), "wrong output sites"
    active = np.asarray(y.active)
    np.testing.assert_allclose(np.asarray(y.features, np.float64)[active], T.at_sites(ref, y.indices),
                               rtol=rtol, atol=atol)
    assert not np.asarray(y.features)[~active].any(), "padding rows must stay zero"
    assert not np.asarray(y.overflow).any()


def _loss_and_grads(x, kernel, bias, cotangent, case, backend):
    def loss(features, kernel, bias):
        y = jsc.sparse_conv(x.replace_feature(features), kernel, bias, out_capacity=_out_capacity(x, case),
                            backend=backend, **_conv_kwargs(case))
        return jnp.sum(y.features * cotangent), y
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x.features, kernel, bias)
    return y, grads


@functools.partial(jax.jit, static_argnums=(4,))
def _dense_loss_grads(xd, kernel, bias, dense_cotangent, case, sites):
    def dense_loss(xd, kernel, bias):
        out = T.dense_conv(xd, kernel, case.geometry()) + bias
        return jnp.sum(jnp.where(sites[..., None], out, 0) * dense_cotangent)
    return jax.grad(dense_loss, argnums=(0, 1, 2))(xd, kernel, bias)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv_matches_dense(case, backend, rng):
    """Output sites, values and the gradients for features, kernel and bias equal those of the
    dense conv masked to the output sites (float64, under jit)."""
    with jax.enable_x64(True):
        x = T.random_tensor(rng, case.batch_size, case.spatial_shape, case.channels[0], dtype=np.float64)
        kernel = jnp.asarray(rng.normal(size=case.kernel_size + case.channels))
        bias = jnp.asarray(rng.normal(size=case.channels[1]))
        capacity = x.capacity if case.mode == SUBM else _out_capacity(x, case)
        cotangent = jnp.asarray(rng.normal(size=(capacity, case.channels[1])))
        y, (d_features, d_kernel, d_bias) = jax.jit(_loss_and_grads, static_argnums=(4, 5))(
            x, kernel, bias, cotangent, case, backend)

        _check_against_reference(x, y, kernel, bias, case, rtol=1e-10, atol=1e-10)
        assert y.spatial_shape == case.geometry().out_shape
        if case.mode == SUBM:
            np.testing.assert_array_equal(y.indices, x.indices)  # same rows, same order
        else:
            rows = np.asarray(y.indices)[np.asarray(y.active)]
            assert np.asarray(y.active)[: len(rows)].all(), "active output rows come first"
            assert [tuple(r) for r in rows] == sorted(tuple(r) for r in rows), "output rows are sorted"

        dense_cot = jsc.SparseConvTensor(cotangent, y.indices, y.spatial_shape, y.batch_size, validate=False).dense()
        sites = T.dense_sites(T.active_mask(x), case.geometry())
        rx, rk, rb = _dense_loss_grads(x.dense(), kernel, bias, dense_cot, case, sites)
        active = np.asarray(x.active)
        np.testing.assert_allclose(np.asarray(d_features)[active], T.at_sites(rx, x.indices), rtol=1e-9, atol=1e-9)
        assert not np.asarray(d_features)[~active].any()
        np.testing.assert_allclose(d_kernel, rk, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(d_bias, rb, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_conv_check_grads(case, backend, rng):
    """The hand-written VJP agrees with finite differences (jax.test_util.check_grads)."""
    with jax.enable_x64(True):
        x = T.random_tensor(rng, case.batch_size, case.spatial_shape, case.channels[0], dtype=np.float64)
        kernel = jnp.asarray(rng.normal(size=case.kernel_size + case.channels))
        bias = jnp.asarray(rng.normal(size=case.channels[1]))

        @jax.jit
        def f(features, kernel, bias):
            return jsc.sparse_conv(x.replace_feature(features), kernel, bias, out_capacity=_out_capacity(x, case),
                                   backend=backend, **_conv_kwargs(case)).features

        check_grads(f, (x.features, kernel, bias), order=1, modes=["rev"])


@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 5e-2), (jnp.float16, 5e-3)])
def test_conv_half_precision(dtype, tol, backend, rng):
    case = Case(SUBM, (6, 7, 5), (3, 3, 3), (1, 1, 1), (0, 0, 0), (1, 1, 1), (8, 5), 2)
    x = T.random_tensor(rng, 2, case.spatial_shape, 8)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 8, 5)) / 8, jnp.float32)
    y = jsc.sparse_conv(jsc.SparseConvTensor(x.features.astype(dtype), x.indices, x.spatial_shape, 2),
                        kernel.astype(dtype), subm=True, backend=backend)
    assert y.features.dtype == dtype
    _check_against_reference(x, y, kernel, np.zeros(5), case, rtol=tol, atol=tol)


def _regular_case(rng, ndim):
    """A random regular-conv geometry with a non-empty output."""
    while True:
        ints = [tuple(int(v) for v in rng.integers(low, high, ndim)) for low, high in ((1, 4), (1, 3), (0, 2), (1, 3))]
        case = Case(REGULAR, SHAPES[ndim], *ints, (3, 4), 2)
        try:
            case.geometry()
            return case
        except ValueError:
            continue


@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
def test_inverse_conv_returns_to_input_sites(ndim, backend, rng):
    """SparseInverseConv: exactly the strided conv's input rows, values of the masked dense transpose."""
    case = _regular_case(rng, ndim)
    x = T.random_tensor(rng, 2, case.spatial_shape, 3)
    down = jsc.sparse_conv(x, jnp.asarray(rng.normal(size=case.kernel_size + (3, 4)), jnp.float32),
                           indice_key="down", out_capacity=_out_capacity(x, case), backend=backend,
                           **_conv_kwargs(case))
    kernel = jnp.asarray(rng.normal(size=case.kernel_size + (4, 6)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=6), jnp.float32)
    up = jax.jit(functools.partial(jsc.sparse_conv, inverse=True, indice_key="down", backend=backend))(
        down, kernel, bias)
    np.testing.assert_array_equal(up.indices, x.indices)
    assert up.spatial_shape == x.spatial_shape

    with jax.enable_x64(True):
        full = np.asarray(T.dense_inverse_conv(jnp.asarray(np.asarray(down.dense(), np.float64)),
                                               jnp.asarray(np.asarray(kernel, np.float64)), case.geometry()))
    active = np.asarray(up.active)
    np.testing.assert_allclose(np.asarray(up.features)[active], T.at_sites(full, x.indices) + np.asarray(bias),
                               rtol=1e-5, atol=1e-5)
    assert not np.asarray(up.features)[~active].any()

    # Its gradients are the transpose's too: check_grads through the whole down-up chain.
    with jax.enable_x64(True):
        x64 = x.replace_feature(x.features.astype(jnp.float64))
        w_down = jnp.asarray(rng.normal(size=case.kernel_size + (3, 4)))

        def chain(features, w_down, w_up):
            d = jsc.sparse_conv(x64.replace_feature(features), w_down, indice_key="down",
                                out_capacity=_out_capacity(x, case), backend=backend, **_conv_kwargs(case))
            return jsc.sparse_conv(d, w_up, inverse=True, indice_key="down", backend=backend).features

        check_grads(jax.jit(chain), (x64.features, w_down, kernel.astype(jnp.float64)), order=1, modes=["rev"])


def test_backends_build_identical_rulebooks(rng):
    """ffi (64-bit keys), xla with packed int32 keys, xla comparing key columns (as for grids
    too large to pack: here forced by a batch size that does not pack) and xla told that
    sorted sites are sorted (``presorted``, the output sites of a regular conv): one rulebook."""
    build = jax.jit(jsc.rulebook.build_rulebook, static_argnums=(1, 2, 3, 4, 5))
    for case in CASES[1::4]:  # every mode and rank, 9 cases
        x = T.random_tensor(rng, case.batch_size, case.spatial_shape, 1)
        g = case.geometry()
        capacity = _out_capacity(x, case)
        unpackable = 2**31 // int(np.prod(case.spatial_shape)) + 1
        assert jsc.backends.xla.packs(x.batch_size, g.in_shape) and not jsc.backends.xla.packs(unpackable, g.in_shape)
        reference = build(x.indices, g, x.batch_size, capacity, jsc.backends.get("ffi"), False)
        books = [build(x.indices, g, x.batch_size, capacity, jsc.backends.get("xla"), False),
                 build(x.indices, g, unpackable, capacity, jsc.backends.get("xla"), False)]
        sites = np.asarray(x.indices)
        order = np.lexsort(sites.T[::-1])  # rows sorted as tuples; padding (batch -1) first
        ordered = jnp.asarray(np.roll(sites[order], -int(np.sum(sites[:, 0] < 0)), axis=0))  # padding last
        books.append(build(ordered, g, x.batch_size, capacity, jsc.backends.get("xla"), True))
        references = [reference, reference, build(ordered, g, x.batch_size, capacity, jsc.backends.get("ffi"), False)]
        for expected, book in zip(references, books):
            for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(book)):
                np.testing.assert_array_equal(a, b, err_msg=str(case))


def test_max_outputs_per_input_bounds_what_an_input_reaches():
    """The bound (which sizes the sort of a strided conv's reached sites) is reached exactly,
    dilation and strides with common factors included."""
    for kernel, stride, dilation in [(3, 2, 1), (4, 2, 2), (5, 2, 2), (5, 3, 1), (4, 4, 2), (6, 4, 2), (3, 1, 2)]:
        g = make_geometry(REGULAR, (40,), kernel, stride, 2, dilation)
        reached = [sum((c + 2 - k * dilation) % stride == 0 for k in range(kernel)) for c in range(40)]
        assert g.max_outputs_per_input() == max(reached), (kernel, stride, dilation)


@pytest.mark.parametrize("case", [c for c in GRAD_CASES if len(c.spatial_shape) == 3], ids=str)
def test_padding_rows_reach_no_result(case, backend, rng):
    """NaN features in the padding rows (no site) reach no output and no gradient: the
    backward pass contracts every input row for the kernel gradient on the xla backend."""
    x = T.random_tensor(rng, case.batch_size, case.spatial_shape, case.channels[0], padding_rows=5)
    features = jnp.where(x.active[:, None], x.features, jnp.nan)
    kernel = jnp.asarray(rng.normal(size=case.kernel_size + case.channels), jnp.float32)
    bias = jnp.asarray(rng.normal(size=case.channels[1]), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(_out_capacity(x, case), case.channels[1])), jnp.float32)

    @jax.jit
    def loss(features, kernel, bias):
        y = jsc.sparse_conv(T.with_raw_features(x, features), kernel, bias, out_capacity=_out_capacity(x, case),
                            backend=backend, **_conv_kwargs(case))
        return jnp.sum(y.features * cotangent[:y.capacity]), y.features

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(features, kernel, bias)
    assert np.isfinite(out).all()
    d_features, d_kernel, d_bias = grads
    assert np.isfinite(np.asarray(d_features)[np.asarray(x.active)]).all()
    assert np.isfinite(d_kernel).all() and np.isfinite(d_bias).all()


def test_deterministic(backend, rng):
    """Same inputs: bitwise the same outputs and gradients."""
    case = Case(REGULAR, (6, 7, 5), (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), (8, 16), 2)
    x = T.random_tensor(rng, 2, case.spatial_shape, 8, density=0.6)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 8, 16)), jnp.float32)
    bias = jnp.zeros(16, jnp.float32)
    cot = jnp.asarray(rng.normal(size=(_out_capacity(x, case), 16)), jnp.float32)
    runs = [jax.jit(_loss_and_grads, static_argnums=(4, 5))(x, kernel, bias, cot, case, backend) for _ in range(2)]
    runs.append(_loss_and_grads(x, kernel, bias, cot, case, backend))
    for run in runs[1:]:
        for a, b in zip(jax.tree_util.tree_leaves(runs[0]), jax.tree_util.tree_leaves(run)):
            np.testing.assert_array_equal(a, b)


def test_large_grids_do_not_overflow_keys(backend, rng):
    """Grids far beyond 2^31 sites (2^20 per dim; a 0.05 m grid of 150 x 150 x 8 m, batch 16) give the
    same result as the same cluster of sites translated into a small grid."""
    small_shape, offset = (12, 12, 12), np.array([4, 4, 4])  # even: same stride parity as the far corners
    x = T.random_tensor(rng, 1, (6, 6, 6), 3, density=0.5, padding_rows=0)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 3, 4)), jnp.float32)
    local = np.asarray(x.indices)
    for shape, batch_size, corner in [((160, 3000, 3000), 16, (150, 2990, 2990)),
                                      ((2**20,) * 3, 2, (2**20 - 10,) * 3)]:
        far = local.copy()
        far[:, 0] = batch_size - 1
        far[:, 1:] += np.asarray(corner)
        near = local.copy()
        near[:, 1:] += offset
        results = []
        for indices, grid, b in [(far, shape, batch_size), (near, small_shape, 1)]:
            t = jsc.SparseConvTensor(x.features, jnp.asarray(indices), grid, b)
            sub = jsc.sparse_conv(t, kernel, subm=True, backend=backend)
            down = jsc.sparse_conv(t, kernel, strides=2, padding=1, out_capacity=x.capacity * 8, backend=backend)
            rows = np.asarray(down.indices)[np.asarray(down.active)]
            results.append((np.asarray(sub.features), np.asarray(down.features)[np.asarray(down.active)],
                            rows[:, 1:] - rows[:1, 1:]))
        for a, b in zip(*results):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_ffi_rejects_key_space_beyond_int64_and_xla_handles_it(rng):
    shape = (2**20,) * 4
    indices = jnp.asarray([[0, 1, 2, 3, 4], [1, 2**20 - 1, 2**20 - 1, 2**20 - 1, 2**20 - 2]], jnp.int32)
    x = jsc.SparseConvTensor(jnp.ones((2, 1), jnp.float32), indices, shape, 4)
    kernel = jnp.ones((3, 3, 3, 3, 1, 1), jnp.float32)
    y = jsc.sparse_conv(x, kernel, subm=True, backend="xla")
    np.testing.assert_array_equal(y.features, np.ones((2, 1)))
    with pytest.raises(Exception, match="exceeds 2\\^62"):
        jsc.sparse_conv(x, kernel, subm=True, backend="ffi")
