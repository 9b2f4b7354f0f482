"""One program for every platform, and export: ``backend=None`` decided per lowering platform,
``jsc.export`` / ``jsc.deserialize``, reloads in fresh processes and deviceless TPU compiles.

The TPU cases need libtpu (``pip install "jax[tpu]==<this jax>"``); they skip without it,
and fail under CI, which installs it.
"""

import functools
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv as jsc
from jax_sparseconv import _native, models
import sparse_testing as T

OURS = "jsc_"  # prefix of our custom-call targets
DATA = Path(__file__).resolve().parent / "data"


def assert_bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for u, v in zip(leaves_a, leaves_b):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# ---- per-platform lowering of every op ------------------------------------------------

CONV = {"build_rulebook", "gather_matmul", "gather_matmul_grad"}
OPS = {  # name: (op(x, kernel, backend), the native targets its value and gradient call)
    "subm": (lambda x, k, b: jsc.sparse_conv(x, k, subm=True, backend=b), CONV),
    "regular": (lambda x, k, b: jsc.sparse_conv(x, k, strides=2, padding=1, backend=b), CONV),
    "transposed": (lambda x, k, b: jsc.sparse_conv(x, k, strides=2, transposed=True, out_capacity=200, backend=b),
                   CONV),
    "inverse": (lambda x, k, b: jsc.sparse_conv(jsc.sparse_conv(x, k, strides=2, padding=1, indice_key="d", backend=b),
                                                k, inverse=True, indice_key="d", backend=b), CONV),
    "max_pool": (lambda x, k, b: jsc.sparse_max_pool(x, 3, 2, 1, backend=b),
                 {"build_rulebook", "gather_max", "gather_max_grad"}),
    "avg_pool": (lambda x, k, b: jsc.sparse_avg_pool(x, 3, 2, 1, backend=b), {"build_rulebook", "gather_sum"}),
}


def _value_and_grad(op, backend):
    def loss(features, x, kernel):
        return jnp.sum(op(x.replace_feature(features), kernel, backend).features ** 2)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 2)))


def _short(target: str) -> str:
    """``"jsc_gather_sum_v1"`` -> ``"gather_sum"``."""
    return re.sub(r"_v\d+$", "", target.removeprefix(OURS))


def _targets(text: str) -> set[str]:
    """Our targets that ``text`` (a lowered module) calls, by their short names."""
    return {_short(t) for t in _native.TARGETS if t in text}


def _numbered(arrays, prefix: str) -> list[np.ndarray]:
    """The arrays ``<prefix>0, <prefix>1, ...`` of a loaded .npz file, in order."""
    return [arrays[f"{prefix}{i}"] for i in range(sum(k.startswith(prefix) for k in arrays.files))]


@pytest.mark.parametrize("name", OPS)
def test_default_backend_lowers_per_platform(name, rng):
    """backend=None: a program lowered for cpu (and for cuda where _cuda is built) calls our
    kernels (rulebook, forward, backward), one lowered for tpu or rocm none of them; on CPU the
    results are bitwise those of backend='ffi'."""
    op, expected_targets = OPS[name]
    x = T.random_tensor(rng, 2, (7, 8, 6), 3, density=0.3)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 3, 3)), jnp.float32)
    fn = _value_and_grad(op, None)
    for platform in ("cpu", "cuda", "tpu", "rocm"):
        module = jsc.export(fn, platforms=(platform,))(x.features, x, kernel).mlir_module()
        native = platform in jsc.backends.native_platforms()
        assert _targets(module) == (expected_targets if native else set()), platform
    assert jsc.backends.native_platforms()[0] == "cpu"
    assert_bitwise_equal(fn(x.features, x, kernel), _value_and_grad(op, "ffi")(x.features, x, kernel))


def test_explicit_ffi_refuses_to_lower_for_tpu(rng):
    x = T.random_tensor(rng, 1, (6, 6, 6), 2)
    kernel = jnp.ones((3, 3, 3, 2, 2), jnp.float32)
    fn = _value_and_grad(OPS["subm"][0], "ffi")
    module = jsc.export(fn, platforms=("cpu",))(x.features, x, kernel).mlir_module()
    assert _targets(module) == CONV
    # Today's programs call the newest versions (offset-leading neighbour maps).
    assert {t for t in _native.TARGETS if t in module} == {f"jsc_{name}_v2" for name in CONV}
    for platforms in (("tpu",), ("cpu", "tpu")):
        with pytest.raises(ValueError, match=r"backend='ffi' has native kernels for cpu.* lowered for tpu"):
            jsc.export(fn, platforms=platforms)(x.features, x, kernel)


def test_what_serves_where_is_reported():
    assert jsc.backends.serving(None, "cpu") == "ffi" == jsc.build_info()["default_backend"]
    assert jsc.backends.serving(None, "tpu") == "xla" and jsc.backends.serving("xla", "cpu") == "xla"
    assert jsc.backends.describe(None).startswith("None (ffi on cpu")


def test_tensors_and_rulebooks_cross_the_export_boundary(rng):
    """A function of SparseConvTensors returning one with rulebooks in its indice_dict exports,
    serializes and runs after deserializing (the trees are registered for serialization)."""
    x = T.random_tensor(rng, 2, (6, 7, 5), 2)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 2, 4)), jnp.float32)

    def fn(x, kernel):
        y = jsc.sparse_conv(x, kernel, subm=True, indice_key="subm")
        return jsc.sparse_max_pool(y, 2, indice_key="pool")

    reloaded = jsc.deserialize(jsc.export(jax.jit(fn))(x, kernel).serialize())
    got, expected = reloaded.call(x, kernel), jax.jit(fn)(x, kernel)
    assert isinstance(got, jsc.SparseConvTensor) and set(got.indice_dict) == {"subm", "pool"}
    assert got.indice_dict["pool"].geometry == expected.indice_dict["pool"].geometry
    assert (got.spatial_shape, got.batch_size) == (expected.spatial_shape, expected.batch_size)
    assert_bitwise_equal(got, expected)


# ---- models: export, reload in fresh processes, compile for TPU -------------------------

EXPORTS = {  # name: (model, backend, platforms, vmapped)
    "unet": ("unet", None, ("cpu", "tpu"), False),
    "unet_xla": ("unet", "xla", ("cpu", "tpu"), False),
    "unet_ffi": ("unet", "ffi", ("cpu",), False),
    "backbone": ("backbone", None, ("cpu", "tpu"), False),
    "backbone_xla": ("backbone", "xla", ("cpu", "tpu"), False),
    "backbone_ffi": ("backbone", "ffi", ("cpu",), False),
    "unet_vmap": ("unet", None, ("cpu", "tpu"), True),
}


def _served(model, spatial_shape, vmapped: bool):
    """What a server runs: arrays in (variables, features, indices), arrays out."""
    def infer(variables, features, indices):
        y = model.apply(variables, jsc.SparseConvTensor(features, indices, spatial_shape, 1))
        return y.features, y.indices, y.overflow
    return jax.jit(jax.vmap(infer, in_axes=(None, 0, 0)) if vmapped else infer)


class Export(NamedTuple):
    exported: jax.export.Exported
    args: tuple  # (variables, features, indices)
    outputs: tuple  # of the jitted function, in this process
    fn: Callable  # the jitted function


@pytest.fixture(scope="module")
def exported_models(labeled_scan, tiny_unet):
    """``{name: Export}`` for every entry of EXPORTS, on crops of the labeled scan."""
    crops = [(-5.0, -95.0, -4.0, 5.0, -85.0, 4.0), (-5.0, -85.0, -4.0, 5.0, -75.0, 4.0)]
    scans = [labeled_scan(crop, voxel_size=(0.4, 0.4, 0.2), capacity=2048)[0] for crop in crops]
    x = scans[0]
    make = {"unet": tiny_unet, "backbone": lambda backend: models.VoxelBackBone8x(
        features=(4, 4, 8, 8, 8), out_capacities=(2.0, 1.0, 1.0, 1.0), backend=backend)}
    variables = {name: jax.jit(make_model(None).init)(jax.random.key(0), x) for name, make_model in make.items()}
    results = {}
    for name, (model_name, backend, platforms, vmapped) in EXPORTS.items():
        fn = _served(make[model_name](backend), x.spatial_shape, vmapped)
        stack = (lambda *a: jnp.stack(a)) if vmapped else (lambda a, *_: a)
        args = (variables[model_name], stack(*(s.features for s in scans)), stack(*(s.indices for s in scans)))
        results[name] = Export(jsc.export(fn, platforms=platforms)(*args), args, fn(*args), fn)
    return results


def test_exports_are_for_their_platforms_with_our_targets_where_native(exported_models):
    for name, export in exported_models.items():
        _, backend, platforms, _ = EXPORTS[name]
        assert export.exported.platforms == platforms
        assert (OURS in export.exported.mlir_module()) == (backend != "xla"), name
        overflow = export.outputs[2]
        assert not np.any(np.asarray(overflow)), f"{name}: a capacity of the test model overflowed"
    # One scan through the default, ffi and xla programs: bitwise equal where the kernels are the same.
    for model_name in ("unet", "backbone"):
        default, ffi, portable = (exported_models[model_name + s].outputs for s in ("", "_ffi", "_xla"))
        assert_bitwise_equal(default, ffi)
        np.testing.assert_array_equal(default[1], portable[1])
        np.testing.assert_allclose(default[0], portable[0], rtol=2e-4, atol=2e-5)
    # Each scan of the vmapped batch: bitwise the unbatched function's result on it.
    vmapped, single = exported_models["unet_vmap"], exported_models["unet"]
    variables, features, indices = vmapped.args
    for i in range(features.shape[0]):
        assert_bitwise_equal(jax.tree_util.tree_map(lambda a: a[i], vmapped.outputs),
                             single.fn(variables, features[i], indices[i]))


RELOAD = """
import sys
from pathlib import Path
from typing import Callable, NamedTuple
import jax
import numpy as np
{imports}
folder = Path(sys.argv[1])
for blob in sorted(folder.glob("*.jax")):
    exported = {deserialize}(blob.read_bytes())
    arrays = np.load(blob.with_suffix(".args.npz"))
    args, kwargs = jax.tree_util.tree_unflatten(exported.in_tree, [arrays[f"a{{i}}"] for i in range(len(arrays.files))])
    try:
        outputs = exported.call(*args, **kwargs)
    except Exception as error:
        print(blob.stem, type(error).__name__, str(error).splitlines()[0])
        continue
    np.savez(blob.with_suffix(".out.npz"), *jax.tree_util.tree_leaves(outputs))
    print(blob.stem, "ran")
"""


def _reload(folder, with_jax_sparseconv: bool) -> dict[str, str]:
    """Runs every artifact in ``folder`` in a fresh Python: ``{name: "ran" or the error}``."""
    script = RELOAD.format(imports="import jax_sparseconv as jsc" if with_jax_sparseconv else "",
                           deserialize="jsc.deserialize" if with_jax_sparseconv else "jax.export.deserialize")
    result = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True,
                            cwd=folder, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(line.split(" ", 1) for line in result.stdout.splitlines())


def _save(folder, name, exported, args):
    (folder / f"{name}.jax").write_bytes(exported.serialize())
    np.savez(folder / f"{name}.args.npz", **{f"a{i}": a for i, a in enumerate(jax.tree_util.tree_leaves(args))})


def test_exports_reload_in_a_fresh_process(exported_models, tmp_path):
    """Serialized, deserialized in a process that only imported jax_sparseconv, run: bitwise
    the outputs of the jitted function in this process."""
    for name, export in exported_models.items():
        _save(tmp_path, name, export.exported, export.args)
    assert _reload(tmp_path, with_jax_sparseconv=True) == dict.fromkeys(exported_models, "ran")
    for name, export in exported_models.items():
        assert_bitwise_equal(_numbered(np.load(tmp_path / f"{name}.out.npz"), "arr_"), export.outputs)


def test_a_process_without_jax_sparseconv_runs_xla_exports_only(exported_models, tmp_path):
    """JAX alone runs a backend='xla' export; our kernels' targets are not found without the
    import that registers them (the message the README quotes)."""
    for name in ("unet", "unet_xla"):
        _save(tmp_path, name, exported_models[name].exported, exported_models[name].args)
    ran = _reload(tmp_path, with_jax_sparseconv=False)
    assert ran["unet_xla"] == "ran"
    assert ran["unet"].startswith("JaxRuntimeError NOT_FOUND: No FFI handler registered for jsc_"), ran["unet"]
    assert_bitwise_equal(_numbered(np.load(tmp_path / "unet_xla.out.npz"), "arr_"), exported_models["unet_xla"].outputs)


@pytest.mark.parametrize("name", ["unet", "backbone"])
def test_the_tpu_part_compiles_without_our_kernels(name, exported_models, tpu_compile):
    exported = exported_models[name].exported
    args, kwargs = jax.tree_util.tree_unflatten(exported.in_tree, exported.in_avals)
    compiled = tpu_compile(lambda *args: exported.call(*args, **kwargs), *args)
    assert OURS not in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes > 0


# ---- the contract with saved models -------------------------------------------------------

def test_targets_are_the_ones_every_compiled_module_registers():
    for module in (_native.cpu, _native.cuda):
        if module is not None:
            assert sorted(module.registrations()) == sorted(_native.TARGETS)
    assert all(re.fullmatch(OURS + r"[a-z_]+_v\d+", t) for t in _native.TARGETS)


def _artifact_maker():
    spec = importlib.util.spec_from_file_location("make_ops", DATA / "make_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAVED_VERSIONS = (1, 2)  # one saved model per version of the targets


def test_every_target_version_has_its_saved_model():
    assert sorted(DATA.glob("ops_v*.jax")) == [DATA / f"ops_v{v}.jax" for v in SAVED_VERSIONS]
    assert SAVED_VERSIONS[-1] == _artifact_maker().newest_version()


@pytest.mark.parametrize("version", SAVED_VERSIONS)
def test_a_model_saved_with_older_targets_still_gives_its_recorded_outputs(version):
    """tests/data/ops_v<N>.jax was exported once (tests/data/make_ops.py, jax 0.10.2) with the
    targets of version N; every later version must run it bitwise as recorded. The recorded
    outputs are also what the xla backend computes today from the same inputs."""
    exported = jsc.deserialize((DATA / f"ops_v{version}.jax").read_bytes())
    assert exported.platforms == ("cpu", "tpu")
    assert {t for t in _native.TARGETS if t in exported.mlir_module()} == {t for t in _native.TARGETS
                                                                           if t.endswith(f"_v{version}")}
    recorded = np.load(DATA / f"ops_v{version}.npz")
    args, expected = _numbered(recorded, "in_"), _numbered(recorded, "out_")
    assert_bitwise_equal(jax.tree_util.tree_leaves(exported.call(*args)), expected)
    network = jax.jit(functools.partial(_artifact_maker().network, backend="xla"))
    for today, saved in zip(jax.tree_util.tree_leaves(network(*args)), expected, strict=True):
        np.testing.assert_allclose(np.asarray(today), saved, rtol=1e-5, atol=1e-5)  # values up to ~10
