"""The native extension: it is really built, and its handlers survive hostile input."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax_sparseconv as jsc
import sparse_testing as T
from jax_sparseconv.backends import ffi, xla
from jax_sparseconv.geometry import MODE_CODES, make_geometry


def test_build_info_reports_the_native_extension():
    info = jsc.build_info()
    for key in ("version", "cpu_ffi", "cuda_ffi", "cuda_archs", "jax", "jaxlib", "ffi_api_version"):
        assert key in info
    if os.environ.get("JSC_ALLOW_NO_FFI") != "1":
        assert info["cpu_ffi"], "the CPU extension was not built; see BUILD.md (JSC_ALLOW_NO_FFI=1 to skip)"
        assert info["default_backend"] == "ffi"
        assert info["ffi_api_version"][0] == 0


def _raw_call(indices, out_capacity, kernel_volume, rows, version=2, **attrs):
    """The rulebook handler called directly, bypassing every Python-side check; ``version``
    1 gives neighbour maps ``[rows, K]``, 2 ``[K, rows]``."""
    cols = indices.shape[1]
    maps = [(out_capacity, kernel_volume), (rows, kernel_volume)]
    out_types = (jax.ShapeDtypeStruct((out_capacity, cols), jnp.int32),
                 *(jax.ShapeDtypeStruct(shape[::-1] if version == 2 else shape, jnp.int32) for shape in maps),
                 jax.ShapeDtypeStruct((), jnp.int32))
    call = jax.ffi.ffi_call(f"jsc_build_rulebook_v{version}", out_types, vmap_method="sequential")
    return jax.block_until_ready(call(indices, **{k: (np.int64(v) if np.isscalar(v) else np.asarray(v, np.int64))
                                                  for k, v in attrs.items()}))


@st.composite
def _rulebook_inputs(draw):
    ndim = draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["subm", "regular", "transposed"]))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(ndim))
    kernel = tuple(draw(st.sampled_from([1, 3] if mode == "subm" else [1, 2, 3])) for _ in range(ndim))
    strides = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    batch_size = draw(st.integers(1, 3))
    rows = draw(st.integers(0, 12))
    indices = np.asarray(draw(st.lists(st.lists(st.integers(-2, 7), min_size=ndim + 1, max_size=ndim + 1),
                                       min_size=rows, max_size=rows)), np.int32).reshape(rows, ndim + 1)
    out_capacity = draw(st.integers(1, 40))
    return mode, shape, kernel, strides, padding, dilation, batch_size, indices, out_capacity


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_rulebook_inputs())
def test_rulebook_handler_on_random_sites(inputs):
    """Random (often invalid) sites: a clear error for bad ones, the XLA backend's exact answer otherwise."""
    mode, shape, kernel, strides, padding, dilation, batch_size, indices, out_capacity = inputs
    try:
        geometry = make_geometry(mode, shape, kernel, strides, padding, dilation)
    except ValueError:
        return
    if mode == "subm":
        out_capacity = len(indices)
    active = indices[indices[:, 0] >= 0]
    in_range = (active[:, 0] < batch_size).all() and ((active[:, 1:] >= 0) & (active[:, 1:] < shape)).all()
    unique = len(np.unique(active, axis=0)) == len(active)
    args = (jnp.asarray(indices), geometry, batch_size, out_capacity)
    if not in_range:
        with pytest.raises(Exception, match="lies outside batch_size x spatial_shape"):
            jax.block_until_ready(ffi.build_rulebook(*args))
    elif not unique:
        with pytest.raises(Exception, match="duplicate site"):
            jax.block_until_ready(ffi.build_rulebook(*args))
    else:
        for a, b in zip(ffi.build_rulebook(*args), xla.build_rulebook(*args)):
            np.testing.assert_array_equal(a, b)


@settings(max_examples=100, deadline=None)
@given(ndim=st.integers(0, 6), rows=st.integers(0, 5), cols=st.integers(0, 6), out_capacity=st.integers(0, 5),
       kernel_volume=st.integers(0, 10), in_nbr_rows=st.integers(0, 6), mode=st.integers(-1, 3),
       batch_size=st.integers(-1, 3), attr_len=st.integers(0, 6), value=st.integers(-3, 4),
       version=st.sampled_from([1, 2]))
def test_rulebook_handler_rejects_inconsistent_shapes(ndim, rows, cols, out_capacity, kernel_volume, in_nbr_rows,
                                                       mode, batch_size, attr_len, value, version):
    """Mismatched buffer shapes and nonsense attributes give an error, never a crash."""
    indices = jnp.zeros((rows, cols), jnp.int32)
    attrs = dict(mode=mode, batch_size=batch_size, in_shape=[4] * ndim, out_shape=[4] * attr_len,
                 kernel_size=[value] * ndim, strides=[1] * ndim, padding=[0] * ndim, dilation=[1] * ndim)
    try:
        _raw_call(indices, out_capacity, kernel_volume, in_nbr_rows, version, **attrs)
    except Exception as err:  # noqa: BLE001 - any Python error is fine; a crash is not
        assert "jax_sparseconv" in str(err) or "Wrong" in str(err) or "attribute" in str(err)


@pytest.mark.parametrize("mode", sorted(MODE_CODES))
@pytest.mark.parametrize("backend", ["xla", "ffi"])
@pytest.mark.parametrize("rows", [0, 1, "padding"])
def test_degenerate_tensors(mode, backend, rows):
    """Empty tensors, all-padding tensors and a single active site."""
    indices = {0: np.zeros((0, 4), np.int32), 1: np.array([[0, 2, 3, 1]], np.int32),
               "padding": np.full((4, 4), -1, np.int32)}[rows]
    x = jsc.SparseConvTensor(jnp.ones((len(indices), 2)), jnp.asarray(indices), (5, 6, 4), 1)
    kernel = jnp.full((3, 3, 3, 2, 3), 0.5)
    y = jsc.sparse_conv(x, kernel, subm=mode == "subm", transposed=mode == "transposed", padding=1,
                        out_capacity=None if mode == "subm" else 40, backend=backend)
    expected = {0: 0, "padding": 0, 1: 1 if mode == "subm" else 27}[rows]
    assert int(y.num_active) == expected
    # A lone site is the only neighbour of each output: 2 channels x 0.5.
    np.testing.assert_array_equal(np.asarray(y.features)[np.asarray(y.active)], 1.0)
    assert not np.asarray(y.features)[~np.asarray(y.active)].any()
    grad = jax.grad(lambda f: jsc.sparse_conv(x.replace_feature(f), kernel, subm=mode == "subm",
                                              transposed=mode == "transposed", padding=1,
                                              out_capacity=None if mode == "subm" else 40,
                                              backend=backend).features.sum())(x.features)
    assert grad.shape == x.features.shape


FEATURE_KERNELS = ["gather_matmul", "gather_matmul_grad", "gather_sum", "gather_max", "gather_max_grad"]


def _feature_args(name, rng, n, m, k, cin, cout, dtype, nbr):
    """Arguments of ffi's ``name`` with the map ``nbr [k, m]`` into a table of ``n`` rows."""
    x = jnp.asarray(rng.normal(size=(n, cin)), dtype)
    if name == "gather_matmul":
        return x, jnp.asarray(rng.normal(size=(k, cin, cout)), dtype), nbr
    if name == "gather_matmul_grad":
        return x, jnp.asarray(rng.normal(size=(m, cout)), dtype), nbr
    if name == "conv_backward":  # x [m, cin] of the inputs, g [n, cout] read through in_nbr
        return (jnp.asarray(rng.normal(size=(m, cin)), dtype), jnp.asarray(rng.normal(size=(k, cin, cout)), dtype),
                jnp.asarray(rng.normal(size=(n, cout)), dtype), nbr)
    if name == "gather_max_grad":  # g [n, C] of pool outputs, argk, in_nbr [K, m] into them
        return x, jnp.asarray(rng.integers(-1, k, size=(n, cin)), jnp.int32), nbr
    return x, nbr


@pytest.mark.parametrize("name", ["conv_backward"] + FEATURE_KERNELS)
@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 9), m=st.integers(0, 9), k=st.integers(1, 4), cin=st.integers(1, 40),
       cout=st.integers(1, 40), low=st.integers(-4, -1), high_extra=st.integers(0, 3),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]), seed=st.integers(0, 2**31))
def test_feature_handlers_on_hostile_neighbour_maps(name, n, m, k, cin, cout, low, high_extra, dtype, seed):
    """Entries outside [-1, N) give an error naming the map; valid maps give the XLA backend's result."""
    rng = np.random.default_rng(seed)
    nbr = jnp.asarray(rng.integers(low, n + high_extra, size=(m, k)), jnp.int32)
    args = _feature_args(name, rng, n, m, k, cin, cout, dtype, nbr.T)  # the maps are offset-leading
    bad = bool(((np.asarray(nbr) < -1) | (np.asarray(nbr) >= n)).any())
    if bad:
        with pytest.raises(Exception, match="nbr entry"):
            jax.block_until_ready(getattr(ffi, name)(*args))
        return
    native = getattr(ffi, name)(*args)
    if name == "gather_matmul_grad":
        reference = jnp.asarray(T.gather_matmul_grad_reference(*args), xla.accumulator(dtype))
    else:
        reference = getattr(xla, name)(*args)
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    for a, b in zip(jax.tree_util.tree_leaves(native), jax.tree_util.tree_leaves(reference)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol * cin)


def _versioned_call(name, version, args):
    """Target ``jsc_<name>_v<version>`` on ``args`` (neighbour map last, ``[K, M]``; version 1
    gets it ``[M, K]``)."""
    x, *operands, nbr = args
    m, acc = nbr.shape[1], ffi.accumulator(x.dtype)
    shapes = [((m, x.shape[1]), acc)]  # pools
    if name == "gather_matmul":
        shapes = [((m, operands[0].shape[2]), acc)]
    elif name == "gather_matmul_grad":
        shapes = [((nbr.shape[0], x.shape[1], operands[0].shape[1]), acc)]
    elif name == "gather_max":
        shapes.append(((m, x.shape[1]), jnp.int32))
    attrs = {"allow_tf32": np.int64(0)} if name.startswith("gather_matmul") else {}
    call = jax.ffi.ffi_call(f"jsc_{name}_v{version}", [jax.ShapeDtypeStruct(*shape) for shape in shapes])
    return jax.block_until_ready(call(x, *operands, nbr.T if version == 1 else nbr, **attrs))


@pytest.mark.parametrize("name", FEATURE_KERNELS)
@settings(max_examples=15, deadline=None)
@given(n=st.integers(0, 9), m=st.integers(0, 40), k=st.integers(1, 30), cin=st.integers(1, 20),
       bad=st.booleans(), seed=st.integers(0, 2**31))
def test_v1_feature_handlers_take_row_major_maps_and_agree_with_v2(name, n, m, k, cin, bad, seed):
    """The _v1 targets (programs exported before the _v2 ones) on ``[M, K]`` maps: bitwise the
    results of _v2 on the same maps ``[K, M]``, and the same error for a bad entry."""
    rng = np.random.default_rng(seed)
    nbr = jnp.asarray(rng.integers(-1, n + int(bad), size=(k, m)), jnp.int32)
    args = _feature_args(name, rng, n, m, k, cin, cin + 3, jnp.float32, nbr)
    if bool((np.asarray(nbr) >= n).any()):
        for version in (1, 2):
            with pytest.raises(Exception, match="nbr entry"):
                _versioned_call(name, version, args)
        return
    for a, b in zip(_versioned_call(name, 1, args), _versioned_call(name, 2, args)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["gather_matmul", "gather_matmul_grad"])
@pytest.mark.parametrize("bad_value", [-2, 300, 2**31 - 1])
def test_conv_handlers_name_a_bad_entry_in_a_late_tile(name, bad_value, rng):
    """The conv handlers check entries while collecting each tile's pairs: one bad entry
    among 27 x 5000 (the fourth of five row tiles) is reported by its place in the map."""
    n, m, k = 300, 5000, 27
    nbr = np.where(rng.random((k, m)) < 0.3, rng.integers(0, n, size=(k, m)), -1).astype(np.int32)
    nbr[20, 4500] = bad_value
    args = _feature_args(name, rng, n, m, k, 8, 8, jnp.float32, jnp.asarray(nbr))
    with pytest.raises(Exception, match=f"nbr entry {20 * m + 4500} is {bad_value}, outside \\[-1, {n}\\)"):
        jax.block_until_ready(getattr(ffi, name)(*args))


_THREADS_SCRIPT = """
import sys, numpy as np, jax, jax.numpy as jnp
import jax_sparseconv as jsc
import sparse_testing as T
rng = np.random.default_rng(int(sys.argv[2]))
x = T.random_tensor(rng, 2, (24, 24, 24), 32, density=0.2)
w_sub = jnp.asarray(rng.normal(size=(3, 3, 3, 32, 32)), jnp.float32)
w_down = jnp.asarray(rng.normal(size=(3, 3, 3, 32, 16)), jnp.float32)
def loss(f, w_sub, w_down):
    t = jsc.sparse_conv(x.replace_feature(f), w_sub, subm=True, backend="ffi")
    t = jsc.sparse_conv(t, w_down, strides=2, padding=1, indice_key="d", out_capacity=8000, backend="ffi")
    t = jsc.sparse_max_pool(t, 2, backend="ffi")
    return jnp.sum(t.features ** 2), t
(value, t), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x.features, w_sub, w_down)
np.savez(sys.argv[1], value=value, out=t.features, indices=t.indices, *grads)
"""


def test_results_do_not_depend_on_thread_count(tmp_path):
    """One CPU or all of them: bitwise the same outputs and gradients (XLA sizes its pool by affinity)."""
    import shutil
    import subprocess
    import sys
    if len(os.sched_getaffinity(0)) < 2 or shutil.which("taskset") is None:
        pytest.skip("needs two CPUs and taskset to compare thread counts")
    script = tmp_path / "run.py"
    script.write_text(_THREADS_SCRIPT)
    seed = str(np.random.SeedSequence().entropy % 2**31)
    # tests/ for the helpers; no empty entry (that would put the source tree's package, which
    # lacks the compiled extension, before the installed one).
    paths = [os.path.dirname(__file__), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    results = []
    for name, prefix in (("one", ["taskset", "-c", str(min(os.sched_getaffinity(0)))]), ("all", [])):
        out = tmp_path / f"{name}.npz"
        subprocess.run(prefix + [sys.executable, str(script), str(out), seed], check=True, env=env)
        results.append(np.load(out))
    for key in results[0].files:
        np.testing.assert_array_equal(results[0][key], results[1][key], err_msg=f"{key} (seed {seed})")


@pytest.mark.parametrize("mode, kernel, strides, padding", [("subm", 3, 1, 0), ("regular", 3, 2, 1),
                                                            ("transposed", 2, 2, 0)])
def test_clustered_sites_give_the_sort_based_rulebook(mode, kernel, strides, padding, rng):
    """Dense blocks and long runs along x (runs of neighbouring keys, many sites per kernel
    line) in a large grid: the native builder gives exactly the xla backend's rulebook."""
    shape, sites = (64, 2048, 2048), set()
    for batch in range(2):
        for _ in range(6):  # fully occupied 7 x 7 x 7 blocks
            corner = rng.integers(0, np.asarray(shape) - 7)
            sites.update((batch, *(corner + np.asarray(offset))) for offset in np.ndindex(7, 7, 7))
        for _ in range(8):  # 300-voxel runs along the fastest axis
            z, y, x0 = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(0, shape[2] - 300)
            sites.update((batch, z, y, x) for x in range(x0, x0 + 300))
    indices = np.asarray(sorted(sites), np.int32)[rng.permutation(len(sites))]
    indices = np.concatenate([indices, np.full((50, 4), -1, np.int32)])
    geometry = make_geometry(mode, shape, kernel, strides, padding, 1)
    capacity = len(indices) * (8 if mode == "transposed" else 1)
    build = jax.jit(jsc.rulebook.build_rulebook, static_argnums=(1, 2, 3, 4))
    ours = build(jnp.asarray(indices), geometry, 2, capacity, ffi)
    reference = build(jnp.asarray(indices), geometry, 2, capacity, xla)
    assert int(ours.needed) <= capacity
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(reference)):
        np.testing.assert_array_equal(a, b)


def test_cuda_hash_table_logic_on_the_host(rng):
    """The CUDA rulebook's hash table (host-device code in hash_table.h), run on the host with
    two threads inserting at once: each key is found with its first index, absent keys are not."""
    from jax_sparseconv import _cpu
    runs = [np.arange(start, start + rng.integers(1, 40)) for start in rng.integers(0, 2**62, 50)]
    keys = np.concatenate(runs + [rng.integers(0, 1000, 500)])  # runs along x; small keys, duplicated
    keys = keys[rng.permutation(len(keys))].tolist()
    queries = keys + rng.integers(0, 2**62, 200).tolist() + list(range(1200))
    first = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    assert _cpu.hash_table_lookup(keys, queries) == [first.get(q, -1) for q in queries]
    with pytest.raises(ValueError, match="keys must be >= 0"):
        _cpu.hash_table_lookup([3, -1], [3])


@pytest.mark.parametrize("precision, tf32", [
    (None, True), ("default", True), ("high", True), ("bfloat16", True), ("tensorfloat32", True),
    ("highest", False), ("float32", False), (jax.lax.Precision.HIGHEST, False), (jax.lax.Precision.DEFAULT, True),
    (("highest", "highest"), False), ((jax.lax.Precision.DEFAULT, jax.lax.Precision.HIGHEST), False),
])
def test_which_precisions_allow_tf32(precision, tf32):
    """Float32 products may use TF32 (on CUDA) unless the precision, or the config default when
    it is None, asks for full float32; the CPU handlers are exact either way."""
    assert ffi.allows_tf32(precision) == tf32
    with jax.default_matmul_precision("highest"):
        assert ffi.allows_tf32(precision) == (tf32 and precision is not None)
