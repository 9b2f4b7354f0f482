"""Every public op, layer and model compiles for TPU, without a TPU (libtpu, deviceless).

Each case compiles one program holding the computation twice, with ``backend=None``
(which picks the xla backend when lowered for TPU) and with ``backend='xla'``: one
compile proves both (XLA merges the two copies when they agree). Ops and layers compile
their forward and backward passes (``value_and_grad``), models their eval forward and a
training step. No compiled TPU program may call a kernel of ours. Small capacities keep
the compiles short; ``benchmarks/tpu_compile.py`` measures real ones.

These cases need libtpu (``pip install "jax[tpu]==<this jax>"``): they skip without it,
and fail under CI, which installs it.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_sparseconv as jsc
import jax_sparseconv.linen as spnn
import jax_sparseconv.nnx as spnnx
from jax_sparseconv import backends, models
import sparse_testing as T
from jax_sparseconv.backends import xla
from jax_sparseconv.functional import sparse_add, sparse_cat
from jax_sparseconv.geometry import make_geometry
from jax_sparseconv.rulebook import build_rulebook

OURS = "jsc_"  # prefix of our custom-call targets
BACKENDS = (None, "xla")


def assert_compiles_for_tpu(tpu_compile, make, *args):
    """``make(backend)`` -> a function of ``args``: compiled for TPU with both backends."""
    compiled = tpu_compile(lambda *a: tuple(make(backend)(*a) for backend in BACKENDS), *args)
    assert OURS not in compiled.as_text()
    assert compiled.memory_analysis().argument_size_in_bytes > 0


def loss_and_grads(op):
    """``(features, kernel, x) -> (loss, grads)`` of a sum of squares of ``op(x, kernel)``."""
    def loss(features, kernel, x):
        return jnp.sum(op(x.replace_feature(features), kernel).features ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1))


CONVS = {  # mode: (kernel size, op(x, kernel, backend))
    "subm": (3, lambda x, k, b: jsc.sparse_conv(x, k, subm=True, backend=b)),
    "regular": (3, lambda x, k, b: jsc.sparse_conv(x, k, strides=2, padding=1, backend=b)),
    "transposed": (2, lambda x, k, b: jsc.sparse_conv(x, k, strides=2, transposed=True,
                                                      out_capacity=2 * x.capacity, backend=b)),
    "inverse": (2, lambda x, k, b: jsc.sparse_conv(
        jsc.sparse_conv(x, k, strides=2, indice_key="down", backend=b), k, inverse=True, indice_key="down",
        backend=b)),
}


def small_tensor(rng, ndim, channels=3, batch_size=2):
    return T.random_tensor(rng, batch_size, (6,) * ndim, channels, density=0.2)


@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", list(CONVS))
def test_conv_compiles_for_tpu(mode, ndim, rng, tpu_compile):
    size, op = CONVS[mode]
    x = small_tensor(rng, ndim)
    kernel = jnp.zeros((size,) * ndim + (3, 3))
    assert_compiles_for_tpu(tpu_compile, lambda b: loss_and_grads(lambda x, k: op(x, k, b)), x.features, kernel, x)


POOLS = {
    "max_pool": lambda x, b: jsc.sparse_max_pool(x, 2, backend=b).features,
    "avg_pool": lambda x, b: jsc.sparse_avg_pool(x, 3, strides=2, padding=1, backend=b).features,
    "global_max_pool": lambda x, b: jsc.global_max_pool(x),
    "global_avg_pool": lambda x, b: jsc.global_avg_pool(x),
    "to_dense": lambda x, b: x.dense(),
}


@pytest.mark.parametrize("name", list(POOLS))
def test_pool_compiles_for_tpu(name, rng, tpu_compile):
    x = small_tensor(rng, 3)

    def make(backend):
        loss = lambda f: jnp.sum(POOLS[name](x.replace_feature(f), backend) ** 2)  # noqa: E731
        return jax.value_and_grad(loss)
    assert_compiles_for_tpu(tpu_compile, make, x.features)


HUGE = (1 << 11, 1 << 11, 1 << 10)  # 2^32 sites: keys do not pack into int32, columns are compared


@pytest.mark.parametrize("grid", ["packed", "columns"])
@pytest.mark.parametrize("mode", ["subm", "regular", "transposed"])
def test_rulebook_construction_compiles_for_tpu(mode, grid, tpu_compile):
    shape = (40, 30, 20) if grid == "packed" else HUGE
    assert xla.packs(2, shape) == (grid == "packed")
    geometry = make_geometry(mode, shape, 3, strides=1 if mode == "subm" else 2, padding=1)
    indices = jax.ShapeDtypeStruct((64, 4), jnp.int32)

    def make(backend):
        def build(indices):
            book = build_rulebook(indices, geometry, 2, 96, backends.get(backends.resolve(backend)))
            return book.out_indices, book.out_nbr, book.in_nbr, book.needed
        return build
    assert_compiles_for_tpu(tpu_compile, make, indices)


def test_long_scans_run_in_rows(tpu_compile):
    """Running sums and maxima over long arrays (a strided rulebook's reached sites, a
    voxelizer's points, a union's sites) scan rows of ``xla.SCAN_BLOCK``: a TPU compiles one
    long scan for tens of seconds (a 1M-element cumsum: 21 s, in rows of 1024: 1 s)."""
    n, shape = 4096, (40, 30, 20)
    geometry = make_geometry("regular", shape, 3, strides=2, padding=1)

    def program(indices, points, features):
        book = build_rulebook(indices, geometry, 2, n, xla)
        voxels = jsc.voxelize(points, 0.1, (0, 0, 0, 4, 4, 2), n, max_points_per_voxel=5)
        a = jsc.SparseConvTensor(features, indices, shape, 2, validate=False)
        union = sparse_add(a, jsc.SparseConvTensor(features, indices[::-1], shape, 2, validate=False),
                           out_capacity=2 * n)
        return book.out_nbr, voxels.features, union.features

    args = (jax.ShapeDtypeStruct((n, 4), jnp.int32), jax.ShapeDtypeStruct((4 * n, 4), jnp.float32),
            jax.ShapeDtypeStruct((n, 3), jnp.float32))
    text = tpu_compile(program, *args, lower_only=True).as_text()
    windows = [max(map(int, dims.split(",")))
               for dims in re.findall(r"window_dimensions = array<i64: ([\d, ]+)>", text)]
    assert len(windows) >= 4 and max(windows) <= xla.SCAN_BLOCK, windows


@pytest.mark.parametrize("n", [0, 1, 1024, 1025, 5000, 1024 * 1024 + 7])
def test_blocked_scans_match_numpy(n, rng):
    flags = rng.random(n) < 0.3
    values = rng.integers(-1000, 1000, n).astype(np.int32)
    np.testing.assert_array_equal(xla.cumsum(jnp.asarray(flags)), np.cumsum(flags))
    np.testing.assert_array_equal(xla.cummax(jnp.asarray(values)), np.maximum.accumulate(values))


def test_voxelize_compiles_for_tpu(tpu_compile):
    points = jax.ShapeDtypeStruct((500, 4), jnp.float32)
    make = lambda backend: lambda p: jsc.voxelize(p, 0.1, (0, 0, 0, 4, 4, 2), 128, max_points_per_voxel=5)  # noqa: E731
    assert_compiles_for_tpu(tpu_compile, make, points)


@pytest.mark.parametrize("combine", [sparse_add, sparse_cat])
def test_combining_tensors_compiles_for_tpu(combine, rng, tpu_compile):
    a, b = small_tensor(rng, 3), small_tensor(rng, 3)  # different sites: the union path

    def make(backend):
        return jax.value_and_grad(lambda fa, fb: jnp.sum(combine(a.replace_feature(fa),
                                                                 b.replace_feature(fb)).features ** 2), (0, 1))
    assert_compiles_for_tpu(tpu_compile, make, a.features, b.features)


NORMS = {
    "batch_norm": lambda: spnn.SparseBatchNorm(use_running_average=False),
    "layer_norm": lambda: spnn.SparseLayerNorm(),
    "group_norm": lambda: spnn.SparseGroupNorm(num_groups=2),
}


def _linen_loss(layer, x, mutable=False):
    variables = layer.init(jax.random.key(0), x)

    def loss(params, features):
        out = layer.apply({**variables, "params": params}, x.replace_feature(features),
                          mutable=["batch_stats"] if mutable else False)
        out = out[0] if mutable else out
        return jnp.sum(out.features ** 2)
    return jax.value_and_grad(loss, (0, 1)), variables["params"]


@pytest.mark.parametrize("name", list(NORMS))
def test_norm_compiles_for_tpu(name, rng, tpu_compile):
    x = small_tensor(rng, 3, channels=4)
    step, params = _linen_loss(NORMS[name](), x, mutable=name == "batch_norm")
    assert_compiles_for_tpu(tpu_compile, lambda backend: step, params, x.features)


def test_linen_layer_compiles_for_tpu(rng, tpu_compile):
    x = small_tensor(rng, 3)

    def layer(backend):
        return spnn.SparseSequential([spnn.SubMConv3d(4, 3, indice_key="s", backend=backend),
                                      spnn.SparseConv3d(5, 3, strides=2, padding=1, backend=backend)])
    params = _linen_loss(layer(None), x)[1]
    assert_compiles_for_tpu(tpu_compile, lambda backend: _linen_loss(layer(backend), x)[0], params, x.features)


def test_nnx_layer_compiles_for_tpu(rng, tpu_compile):
    x = small_tensor(rng, 3)

    def make(backend):
        layer = spnnx.SubMConv3d(3, 4, 3, backend=backend, rngs=nnx.Rngs(0))
        graph, params = nnx.split(layer, nnx.Param)

        def loss(params, features):
            return jnp.sum(nnx.merge(graph, params)(x.replace_feature(features)).features ** 2)
        return lambda features: jax.value_and_grad(loss, (0, 1))(params, features)
    assert_compiles_for_tpu(tpu_compile, make, x.features)


def _model_step(model, x):
    """``(variables, features) -> (eval features, (loss, grads))`` of a sum of squares."""
    def step(variables, features):
        y = x.replace_feature(features)

        def loss(params):
            out, updates = model.apply({**variables, "params": params}, y, train=True, mutable=["batch_stats"])
            return jnp.sum(out.features ** 2), updates
        return model.apply(variables, y).features, jax.value_and_grad(loss, has_aux=True)(variables["params"])
    return step


@pytest.mark.parametrize("name", ["minkunet", "backbone"])
def test_models_compile_for_tpu(name, labeled_scan, tiny_unet, tpu_compile):
    x, _ = labeled_scan(crop=(-20.0, -110.0, -4.0, 0.0, -90.0, 4.0), voxel_size=0.8)
    if name == "minkunet":
        make_model = tiny_unet
    else:  # the backbone's strides take KITTI's 41 z-cells
        x = jsc.SparseConvTensor(x.features, x.indices, (41, *x.spatial_shape[1:]), x.batch_size)
        make_model = lambda backend: models.VoxelBackBone8x(features=(4, 4, 8, 8, 8), backend=backend)  # noqa: E731
    variables = make_model(None).init(jax.random.key(0), x)
    assert_compiles_for_tpu(tpu_compile, lambda backend: _model_step(make_model(backend), x),
                            variables, x.features)


# README ("TPUs"): these TPU compiler options shorten a training step's TPU compile; the
# running sums' reduce-windows abort libtpu below 8 MiB of scoped VMEM (libtpu 0.0.42).
FASTER_TPU_COMPILE = {"xla_tpu_scoped_vmem_limit_kib": "8192", "xla_msa_enable": "false"}
IN_VMEM = "S(1)"  # the memory space of arrays kept in VMEM, in a compiled TPU program's layouts


def test_model_compiles_with_the_faster_tpu_compile_options(labeled_scan, tiny_unet, tpu_compile):
    """Each CI libtpu accepts the options (an unknown name is an error), compiles a training
    step with them without aborting, and keeps no array in VMEM, as it does by default."""
    x, _ = labeled_scan(crop=(-20.0, -110.0, -4.0, 0.0, -90.0, 4.0), voxel_size=0.8)
    model = tiny_unet()
    args = (_model_step(model, x), model.init(jax.random.key(0), x), x.features)
    faster = tpu_compile(*args, options=FASTER_TPU_COMPILE).as_text()
    assert OURS not in faster and IN_VMEM not in faster
    assert IN_VMEM in tpu_compile(*args).as_text()


def test_xla_backend_compiled_for_tpu_has_no_scatter_in_rulebooks(rng, tpu_compile):
    """The rulebook builders and the conv's forward and backward passes gather only: TPU
    scatters serialize."""
    x = small_tensor(rng, 3)
    for mode in ("subm", "regular", "transposed"):
        size, op = CONVS[mode]
        kernel = jnp.zeros((size,) * 3 + (3, 3))
        compiled = tpu_compile(loss_and_grads(lambda x, k: op(x, k, "xla")), x.features, kernel, x)
        assert not re.search(r"\sscatter\(", compiled.as_text()), mode


def test_each_level_of_sites_is_sorted_once(rng):
    """A U-Net level's sites are sorted once: the rulebooks of a subm conv, the strided conv
    that leaves the level (XLA merges its identical sort of the same sites), the subm conv on
    the strided conv's sorted output sites (no sort) and the inverse conv (none) make 2 sorts
    in the compiled program (every sort costs seconds of TPU compile)."""
    x = small_tensor(rng, 3)
    kernel = jnp.zeros((3, 3, 3, 3, 3))

    def unet_level(features, x):
        y = jsc.sparse_conv(x.replace_feature(features), kernel, subm=True, indice_key="subm0", backend="xla")
        down = jsc.sparse_conv(y, kernel, strides=2, padding=1, indice_key="down1", backend="xla")
        down = jsc.sparse_conv(down, kernel, subm=True, indice_key="subm1", backend="xla")
        return jsc.sparse_conv(down, kernel, inverse=True, indice_key="down1", backend="xla").features

    compiled = jax.jit(unet_level).lower(x.features, x).compile().as_text()
    assert len(re.findall(r"\ssort\(", compiled)) == 2
