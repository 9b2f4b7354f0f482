"""The CUDA handlers: every op with ``backend="ffi"`` against the ``xla`` backend on the same
device and the dense float64 reference, run two ways (the ``cuda`` fixture):

- ``gpu``: ``jax_sparseconv._cuda`` on the first GPU JAX sees; skipped, with the reason, where
  there is none.
- ``emulated``: the same CUDA sources compiled for the host emulator (``_cuda_emulated``,
  ``xla_ffi/include/jsc/cuda_emulation.h``), registered for the CPU under other target names.
  It checks the kernels' logic (indexing, tiles, barriers, wmma use, the rulebook's hash table
  and sorts) on machines without a GPU, not the hardware.
"""

import contextlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv as jsc
from jax_sparseconv import _native
import sparse_testing as T
from jax_sparseconv.backends import ffi, xla
from jax_sparseconv.geometry import REGULAR, SUBM, TRANSPOSED, make_geometry

try:
    from jax_sparseconv import _cuda_emulated
except ImportError:  # built with JSC_CUDA_EMULATION=OFF
    _cuda_emulated = None

EMULATED = "emulated_"  # prefix of the emulated handlers' target names
if _cuda_emulated is not None and _native.cpu is not None:  # None: the running jaxlib refused our build
    _native.register(_cuda_emulated, "cpu", prefix=EMULATED)


def _gpus():
    try:
        return jax.devices("gpu")
    except RuntimeError:  # no GPU backend in this jaxlib, or no device
        return []


CPU = jax.devices("cpu")[0]


def _gpu_skip_reason():
    if not _gpus():
        return "no GPU visible to JAX (jax.devices('gpu') is empty): the CUDA handlers are not run on a GPU"
    if not ffi.cuda_available():
        return ("a GPU is visible but jax_sparseconv._cuda was not built (no CUDA compiler at install "
                "time; see BUILD.md)")
    return None


@pytest.fixture(params=["gpu", "emulated"])
def cuda(request, monkeypatch):
    """The platform the CUDA handlers' results live on ("gpu", or "cpu" for the emulator), with
    ``backend="ffi"`` calling them there."""
    if request.param == "gpu":
        if (reason := _gpu_skip_reason()) is not None:
            pytest.skip(reason)
        with jax.default_device(_gpus()[0]):
            yield "gpu"
        return
    with _emulated_handlers(monkeypatch):
        yield "cpu"


@contextlib.contextmanager
def _emulated_handlers(monkeypatch):
    """``backend="ffi"`` on the CPU calls the emulated CUDA handlers."""
    if _cuda_emulated is None:
        if os.environ.get("CI"):
            pytest.fail("jax_sparseconv._cuda_emulated was not built (JSC_CUDA_EMULATION=OFF?)")
        pytest.skip("jax_sparseconv._cuda_emulated was not built (JSC_CUDA_EMULATION=OFF)")
    call = ffi._call
    monkeypatch.setattr(ffi, "_call", lambda target, *out_types: call(EMULATED + target, *out_types))
    jax.clear_caches()  # no trace made with the CPU handlers may serve this test, nor this one's later tests
    grids = _cuda_emulated.grids_run()
    try:
        with jax.default_device(CPU):
            yield
    finally:
        jax.clear_caches()
    assert _cuda_emulated.grids_run() > grids, "the emulated CUDA handlers never ran"


# (mode, spatial_shape, kernel_size, strides, padding, dilation, (C_in, C_out), batch_size, density):
# every mode and spatial rank, and channel counts that cross the 16 x 64 x 64 tiles.
CASES = [
    (SUBM, (6, 7, 5), (3, 3, 3), 1, 0, 1, (8, 5), 2, 0.3),
    (SUBM, (16, 16, 16), (3, 3, 3), 1, 0, 1, (40, 70), 2, 0.2),
    (SUBM, (13, 11), (5, 3), 1, 0, (2, 1), (3, 4), 3, 0.4),
    (SUBM, (4, 5, 4, 3), (3, 3, 3, 3), 1, 0, 1, (17, 33), 1, 0.4),
    (REGULAR, (24, 24, 24), (3, 3, 3), 2, 1, 1, (32, 64), 2, 0.2),
    (REGULAR, (13,), (4,), 3, 2, 1, (1, 1), 2, 0.5),
    (REGULAR, (7, 9), (2, 3), (1, 2), (0, 1), (2, 1), (16, 65), 2, 0.3),
    (TRANSPOSED, (6, 7, 5), (2, 2, 2), 2, 0, 1, (24, 8), 2, 0.3),
    (TRANSPOSED, (4, 5, 4, 3), (3, 1, 2, 3), (1, 2, 1, 2), (1, 0, 0, 1), 1, (5, 7), 1, 0.4),
]


def _ids(case):
    return "-".join(str(v).replace(" ", "") for v in case)


def _geometry(case):
    mode, shape, k, s, p, d = case[:6]
    return make_geometry(mode, shape, k, s, p, d)


def _conv(x, kernel, case, backend, **kw):
    mode, _, _, s, p, d = case[:6]
    g = _geometry(case)
    capacity = None if mode == SUBM else min(x.capacity * g.max_outputs_per_input(),
                                             x.batch_size * int(np.prod(g.out_shape))) + 2
    return jsc.sparse_conv(x, kernel, strides=s, padding=p, dilation=d, subm=mode == SUBM,
                           transposed=mode == TRANSPOSED, out_capacity=capacity, backend=backend, **kw)


def _value_and_grads(x, kernel, cotangent, case, backend, precision="highest"):
    def loss(features, kernel):
        y = _conv(x.replace_feature(features), kernel, case, backend, precision=precision)
        return jnp.sum(y.features.astype(jnp.float32) * cotangent), y
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x.features, kernel)
    return y, grads


def _dense(x, kernel, case):
    """The dense float64 result at the output sites, computed on the CPU."""
    with jax.enable_x64(True), jax.default_device(CPU):
        xd = jnp.asarray(np.asarray(x.dense(), np.float64))
        out = np.asarray(T.dense_conv(xd, jnp.asarray(np.asarray(kernel, np.float64)), _geometry(case)))
        sites = np.asarray(T.dense_sites(jnp.asarray(np.asarray(T.active_mask(x))), _geometry(case)))
    return out, sites


def _assert_trees_close(a, b, rtol, atol):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64), rtol=rtol, atol=atol)


def _device_of(a):
    return next(iter(a.devices()))


def test_build_reports_cuda():
    if (reason := _gpu_skip_reason()) is not None:
        pytest.skip(reason)
    info = jsc.build_info()
    assert info["cuda_ffi"] and info["cuda_archs"]
    assert info["default_backend"] == "ffi", "backend=None should pick the CUDA handlers on a CUDA GPU"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_rulebook_equals_the_cpu_handler(case, cuda, rng):
    """Bitwise the CPU handler's rulebook (which equals the xla backend's, tests/test_ffi.py): same
    output rows in the same sorted order, same maps, same needed count, also when out_capacity is
    too small."""
    x = T.random_tensor(rng, case[7], case[1], 1, density=case[8])
    g = _geometry(case)
    full = x.capacity * g.max_outputs_per_input()
    for capacity in ([x.capacity] if case[0] == SUBM else [full, max(1, full // 8)]):
        build = jax.jit(jsc.rulebook.build_rulebook, static_argnums=(1, 2, 3, 4))
        ours = build(x.indices, g, x.batch_size, capacity, ffi)
        assert _device_of(jax.tree_util.tree_leaves(ours)[0]).platform == cuda
        reference = build(x.indices, g, x.batch_size, capacity, xla)
        for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(reference)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"capacity {capacity}")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_conv_matches_xla_and_dense(case, cuda, rng):
    """Output, feature gradient and kernel gradient in float32: the dense reference and the xla
    backend (precision="highest") on the same device."""
    mode, shape, k, _, _, _, (cin, cout), batch_size, density = case
    x = T.random_tensor(rng, batch_size, shape, cin, density=density)
    kernel = jnp.asarray(rng.normal(size=tuple(np.broadcast_to(k, len(shape))) + (cin, cout)) / np.sqrt(cin),
                         jnp.float32)
    run = jax.jit(_value_and_grads, static_argnums=(3, 4))
    y0 = _conv(x, kernel, case, "xla")
    cotangent = jnp.asarray(rng.normal(size=(y0.capacity, cout)), jnp.float32)
    y, grads = run(x, kernel, cotangent, case, "ffi")
    y_xla, grads_xla = run(x, kernel, cotangent, case, "xla")
    assert _device_of(y.features).platform == cuda
    np.testing.assert_array_equal(y.indices, y_xla.indices)
    _assert_trees_close((y.features, grads), (y_xla.features, grads_xla), rtol=1e-4, atol=1e-4)
    ref, sites = _dense(x, kernel, case)
    assert T.site_set(y.indices) == T.dense_site_set(sites)
    active = np.asarray(y.active)
    np.testing.assert_allclose(np.asarray(y.features, np.float64)[active], T.at_sites(ref, y.indices),
                               rtol=1e-4, atol=1e-4)
    assert not np.asarray(y.features)[~active].any()


@pytest.mark.parametrize("case", [CASES[1], CASES[6]], ids=_ids)
def test_float32_uses_tf32_unless_precision_is_highest(case, cuda, rng):
    """At default precision, float32 products run on TF32 tensor cores (inputs rounded to 10-bit
    mantissas, as XLA's GPU matmuls do): within TF32 error of the full-precision result (which
    test_conv_matches_xla_and_dense checks against the dense reference), and not equal to it;
    output and both gradients."""
    mode, shape, k, _, _, _, (cin, cout), batch_size, density = case
    x = T.random_tensor(rng, batch_size, shape, cin, density=density)
    kernel = jnp.asarray(rng.normal(size=tuple(np.broadcast_to(k, len(shape))) + (cin, cout)) / np.sqrt(cin),
                         jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(_conv(x, kernel, case, "xla").capacity, cout)), jnp.float32)

    def run(precision):
        y, grads = jax.jit(_value_and_grads, static_argnums=(3, 4, 5))(x, kernel, cotangent, case, "ffi", precision)
        return y.features, *grads

    tf32, full = run(None), run("highest")
    with jax.default_matmul_precision("float32"):
        assert not ffi.allows_tf32(None)
        np.testing.assert_array_equal(run(None)[0], full[0])
    for ours, exact in zip(tf32, full):
        scale = float(np.abs(np.asarray(exact)).max())
        np.testing.assert_allclose(ours, exact, rtol=1e-2, atol=2e-3 * scale)
        assert not np.array_equal(np.asarray(ours), np.asarray(exact)), "TF32 was not used"


def _smaller(case):
    """``case`` on a 12^3 grid: the same tiles crossed, an eighth of the sites to emulate."""
    return (case[0], (12, 12, 12), *case[2:8], 0.3)


@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 5e-2), (jnp.float16, 5e-3), (jnp.float64, 1e-10)])
@pytest.mark.parametrize("case", [_smaller(CASES[1]), _smaller(CASES[4]), CASES[7]], ids=_ids)
def test_conv_dtypes(case, dtype, tol, cuda, rng):
    """bfloat16 and float16 (tensor cores, float32 accumulation) and float64, against the dense
    reference of the rounded inputs; gradients against the xla backend."""
    with jax.enable_x64(dtype == jnp.float64):
        mode, shape, k, _, _, _, (cin, cout), batch_size, density = case
        x = T.random_tensor(rng, batch_size, shape, cin, density=density)
        x = x.replace_feature(x.features.astype(dtype))
        kernel = jnp.asarray(rng.normal(size=tuple(np.broadcast_to(k, len(shape))) + (cin, cout)) / np.sqrt(cin),
                             dtype)
        y = jax.jit(_conv, static_argnums=(2, 3))(x, kernel, case, "ffi")
        assert y.features.dtype == dtype
        ref, _ = _dense(x, kernel, case)
        active = np.asarray(y.active)
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(np.asarray(y.features, np.float64)[active], T.at_sites(ref, y.indices),
                                   rtol=tol, atol=tol * scale)
        cotangent = jnp.asarray(rng.normal(size=(y.capacity, cout)), jnp.float32)
        run = jax.jit(_value_and_grads, static_argnums=(3, 4))
        _, grads = run(x, kernel, cotangent, case, "ffi")
        _, grads_xla = run(x, kernel, cotangent, case, "xla")
        for a, b in zip(grads, grads_xla):
            bound = max(1.0, float(np.abs(np.asarray(b, np.float64)).max()))
            np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol,
                                       atol=tol * bound)


def test_inverse_conv(cuda, rng):
    case = CASES[4]
    x = T.random_tensor(rng, 2, case[1], 32, density=0.2)
    w_down = jnp.asarray(rng.normal(size=(3, 3, 3, 32, 64)) / 6, jnp.float32)
    w_up = jnp.asarray(rng.normal(size=(3, 3, 3, 64, 32)) / 8, jnp.float32)

    def chain(features, w_down, w_up, backend):
        d = _conv(x.replace_feature(features), w_down, case, backend, indice_key="down", precision="highest")
        return jsc.sparse_conv(d, w_up, inverse=True, indice_key="down", backend=backend,
                               precision="highest").features

    results = [jax.jit(jax.value_and_grad(lambda *a, b=b: jnp.sum(chain(*a, b) ** 2), argnums=(0, 1, 2)))(
        x.features, w_down, w_up) for b in ("ffi", "xla")]
    for ours, reference in zip(jax.tree_util.tree_leaves(results[0]), jax.tree_util.tree_leaves(results[1])):
        scale = float(np.abs(np.asarray(reference)).max())  # float32 sums of terms up to ~1e3
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pools_match_xla(kind, dtype, cuda, rng):
    pool = {"max": jsc.sparse_max_pool, "avg": jsc.sparse_avg_pool}[kind]
    x = T.random_tensor(rng, 2, (20, 18, 16), 24, density=0.3)
    spread = rng.permutation(x.features.size).reshape(x.features.shape)  # no ties in max pool
    x = x.replace_feature((-0.1 - 1e-3 * jnp.asarray(spread, jnp.float32)).astype(dtype))
    cotangent = jnp.asarray(rng.normal(size=(x.capacity * 8, 24)), jnp.float32)

    def loss(features, backend):
        y = pool(x.replace_feature(features), 3, 2, 1, out_capacity=x.capacity * 8, backend=backend)
        return jnp.sum(y.features.astype(jnp.float32) * cotangent), y

    run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, y), grad = run(x.features, "ffi")
    (_, y_xla), grad_xla = run(x.features, "xla")
    np.testing.assert_array_equal(y.indices, y_xla.indices)
    tol = 1e-6 if dtype == jnp.float32 else 5e-2
    _assert_trees_close((y.features, grad), (y_xla.features, grad_xla), rtol=tol, atol=tol)
    with jax.enable_x64(True), jax.default_device(CPU):
        xd = jnp.asarray(np.asarray(x.dense(), np.float64))
        mask = jnp.asarray(np.asarray(T.active_mask(x)))
        geometry = make_geometry(REGULAR, x.spatial_shape, 3, 2, 1, 1)
        dense = {"max": T.dense_max_pool, "avg": T.dense_avg_pool}[kind](xd, mask, geometry)
    active = np.asarray(y.active)
    np.testing.assert_allclose(np.asarray(y.features, np.float64)[active], T.at_sites(np.asarray(dense), y.indices),
                               rtol=tol, atol=tol)


def test_deterministic(rng):
    """Bitwise equal results on repeated runs: rulebooks, outputs, and both gradients (the kernel
    gradient is reduced over row ranges in a fixed order, without atomics). On a GPU only: the
    emulator runs a block's threads in one fixed order."""
    if (reason := _gpu_skip_reason()) is not None:
        pytest.skip(reason)
    with jax.default_device(_gpus()[0]):
        _check_deterministic(rng)


def _check_deterministic(rng):
    case = (REGULAR, (32, 32, 32), (3, 3, 3), 2, 1, 1, (32, 64), 2, 0.3)
    x = T.random_tensor(rng, 2, case[1], 32, density=0.3)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 32, 64)), jnp.float32)
    y0 = _conv(x, kernel, case, "ffi")
    cotangent = jnp.asarray(rng.normal(size=(y0.capacity, 64)), jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        xs = x.replace_feature(x.features.astype(dtype))
        runs = [jax.jit(_value_and_grads, static_argnums=(3, 4))(xs, kernel.astype(dtype), cotangent, case, "ffi")
                for _ in range(3)]
        for run in runs[1:]:
            for a, b in zip(jax.tree_util.tree_leaves(runs[0]), jax.tree_util.tree_leaves(run)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vmap_folds(cuda, rng):
    case = CASES[0]
    xs = [T.random_tensor(rng, 2, case[1], 8, density=0.3, min_active=20) for _ in range(3)]
    capacity = max(x.capacity for x in xs)
    xs = [jsc.SparseConvTensor(jnp.pad(x.features, ((0, capacity - x.capacity), (0, 0))),
                               jnp.pad(x.indices, ((0, capacity - x.capacity), (0, 0)), constant_values=-1),
                               x.spatial_shape, x.batch_size) for x in xs]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *xs)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 8, 5)), jnp.float32)
    down = (REGULAR,) + case[1:2] + ((3, 3, 3), 2, 1, 1, (8, 5), 2, 0.3)
    for c in (case, down):
        batched = jax.jit(jax.vmap(lambda x, c=c: _conv(x, kernel, c, "ffi", precision="highest").features))(stacked)
        for i, x in enumerate(xs):
            np.testing.assert_allclose(batched[i], _conv(x, kernel, c, "xla", precision="highest").features,
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gather_matmul", "gather_matmul_grad", "gather_sum", "gather_max"])
def test_out_of_range_neighbours_count_as_missing(name, cuda, rng):
    """Where the CPU handlers raise, the CUDA handlers never read out of bounds: entries outside
    [-1, N) act as -1 (documented in BUILD.md)."""
    n, m, k, cin, cout = 50, 70, 5, 20, 30
    nbr = rng.integers(-1, n, size=(m, k)).astype(np.int32)
    hostile = np.where(rng.random((m, k)) < 0.3, rng.choice([-7, n, n + 1000, 2**31 - 1], (m, k)), nbr)
    cleaned = np.where((hostile >= -1) & (hostile < n), hostile, -1).astype(np.int32)
    x = jnp.asarray(rng.normal(size=(n, cin)), jnp.float32)
    other = {"gather_matmul": (jnp.asarray(rng.normal(size=(k, cin, cout)), jnp.float32),),
             "gather_matmul_grad": (jnp.asarray(rng.normal(size=(m, cout)), jnp.float32),)}.get(name, ())
    precision = {"precision": "highest"} if name.startswith("gather_matmul") else {}
    got = jax.block_until_ready(getattr(ffi, name)(x, *other, jnp.asarray(hostile.T, jnp.int32), **precision))
    if name == "gather_matmul_grad":
        want = jnp.asarray(T.gather_matmul_grad_reference(x, *other, cleaned.T), jnp.float32)
    else:
        want = getattr(xla, name)(x, *other, jnp.asarray(cleaned.T), **precision)
    _assert_trees_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel, error", [
    ("count_odd_threads", ""),
    ("divergent_barrier", "32 of the 64 threads of block .* wait at a barrier that the others never reach"),
    ("misaligned_wmma", "load_matrix_sync: pointer not 256-bit aligned"),
    ("oversized_grid", "outside CUDA's limits"),
])
def test_the_emulator_reports_kernel_mistakes(kernel, error):
    """The emulator's barriers count right, and what a GPU would get wrong quietly is an error."""
    if _cuda_emulated is None:
        pytest.skip("jax_sparseconv._cuda_emulated was not built")
    message, counts = _cuda_emulated.self_test(kernel)
    if not error:
        assert message == "" and counts == [32, 32, 32]
    else:
        assert re.search(error, message), message
    assert _cuda_emulated.self_test("count_odd_threads") == ("", [32, 32, 32])  # the error was cleared


def _in_both_thread_orders(fn):
    """``{False: fn(), True: fn()}``: fn run with each emulated block's threads from the first to
    the last, then from the last to the first."""
    results = {}
    try:
        for reverse in (False, True):
            _cuda_emulated.set_reverse_order(reverse)
            results[reverse] = fn()
    finally:
        _cuda_emulated.set_reverse_order(False)
    return results


def test_the_emulator_exposes_races_by_thread_order():
    """A kernel that reads shared memory another thread writes, with no barrier between, gives
    other results when the block's threads run in the reverse order; a correct one does not."""
    if _cuda_emulated is None:
        pytest.skip("jax_sparseconv._cuda_emulated was not built")
    results = _in_both_thread_orders(
        lambda: [_cuda_emulated.self_test(k) for k in ("missing_barrier", "count_odd_threads")])
    assert results[True][0] == ("", [1, 2, 3]) and results[False][0] != results[True][0]
    assert results[False][1] == results[True][1] == ("", [32, 32, 32])


@pytest.mark.parametrize("dtype, precision", [(jnp.float32, "highest"), (jnp.float32, None), (jnp.bfloat16, None),
                                              (jnp.float64, None)])
def test_the_cuda_kernels_do_not_race(dtype, precision, monkeypatch, rng):
    """Every CUDA kernel (rulebooks, both convolution engines with their tiles and mask order, row
    splits of the kernel gradient, max pooling) on the emulator: bitwise the same rulebook, outputs and gradients when
    each block's threads run from the last to the first, so no thread reads what another writes
    between barriers."""
    case = CASES[4]  # strided: generative rulebook; 5000+ rows: several row splits in the kernel gradient
    with jax.enable_x64(dtype == jnp.float64), _emulated_handlers(monkeypatch):
        x = T.random_tensor(rng, 2, case[1], 32, density=0.2)
        x = x.replace_feature(x.features.astype(dtype))
        kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 32, 64)) / 6, dtype)

        def loss(features, kernel):
            y = _conv(x.replace_feature(features), kernel, case, "ffi", precision=precision)
            y = jsc.sparse_conv(y, jnp.swapaxes(kernel, -1, -2), subm=True, backend="ffi", precision=precision)
            pooled = jsc.sparse_max_pool(y, 2, backend="ffi")
            return jnp.sum(pooled.features.astype(jnp.float32) ** 2), (y.indices, y.features)

        run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        results = _in_both_thread_orders(lambda: jax.block_until_ready(run(x.features, kernel)))
    for a, b in zip(jax.tree_util.tree_leaves(results[False]), jax.tree_util.tree_leaves(results[True])):
        np.testing.assert_array_equal(a, b)
