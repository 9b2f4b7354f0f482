"""Shared fixtures: fresh random seeds (printed on failure), the two backends, and a
labeled real scan with a small U-Net for the model and training tests."""

import importlib.util
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Set before anything starts JAX's backends. Two CPU devices for the shard_map tests. The tests
# compile far more than they run, so LLVM optimizes XLA's CPU code less. Measured on 2 cores,
# jax 0.10.2, `pytest tests/test_training.py` against the same with
# XLA_FLAGS=--xla_backend_optimization_level=2: 102 s vs 148 s; the cost is in tests that run
# large dense float64 references (tests/test_kitti.py 35 s vs 7 s); whole suite 14:51 vs 17:29.
# An XLA_FLAGS that sets the level itself wins.
jax.config.update("jax_num_cpu_devices", 2)
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
# Where libtpu is installed (for deviceless TPU compiles): no TPU hosts to look for, and
# several test processes (pytest-xdist workers, subprocesses) may load it at once.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax_sparseconv as jsc  # noqa: E402
from jax_sparseconv import models, utils  # noqa: E402

BACKENDS = ["xla", "ffi"]


def pytest_report_header(config):
    return f"jax_sparseconv build: {jsc.build_info()}"


@pytest.fixture
def rng(request):
    """A numpy Generator with a fresh seed each run; set JSC_TEST_SEED to replay one."""
    seed = int(os.environ.get("JSC_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    request.node.jsc_seed = seed
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "jsc_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"replay with JSC_TEST_SEED={seed}"))


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NUM_CLASSES = 20  # SemanticKITTI learning ids, 0 = unlabeled (ignored by the losses)


@pytest.fixture(scope="session")
def shared_data():
    """``path(relative)``: a file of ``../shared/data``; the test skips where it is missing,
    and fails under CI (``CI`` set), whose checkout has the data beside it."""
    def path(relative: str) -> Path:
        file = SHARED_DATA / relative
        if not file.exists():
            if os.environ.get("CI"):
                pytest.fail(f"{file} is missing: CI needs ../shared/data beside the repository")
            pytest.skip(f"{file} not found (../shared/data sits beside the repository)")
        return file
    return path


@pytest.fixture(scope="session")
def labeled_scan(shared_data):
    """``load(crop, voxel_size, capacity) -> (x, labels)``: a voxelized crop of the labeled
    SemanticKITTI scan, features ``utils.position_features`` around the crop centre, and the
    majority label of each voxel (``-1`` on padding rows)."""
    points_file = shared_data("semantickitti/o3dml_000700_points.npy")
    labels_file = shared_data("semantickitti/o3dml_000700_labels.npy")
    points, point_labels = np.load(points_file), np.load(labels_file)

    def load(crop=(-20.0, -110.0, -4.0, 20.0, -70.0, 4.0), voxel_size=0.4, capacity=None):
        coords, features, labels, shape = utils.voxelize_labels(points, point_labels, NUM_CLASSES, voxel_size, crop)
        inputs = utils.position_features(features, (np.asarray(crop[:3]) + np.asarray(crop[3:])) / 2)
        indices = np.concatenate([np.zeros((len(coords), 1), np.int32), coords], axis=1)
        x = jsc.from_numpy(inputs, indices, shape, 1, capacity)
        voxel_labels = np.full(x.capacity, -1, np.int32)
        voxel_labels[:len(coords)] = labels
        return x, jnp.asarray(voxel_labels)

    return load


@pytest.fixture(scope="session")
def tiny_unet():
    """``make(backend=None, **overrides)``: a MinkUNet small enough to train in a test."""
    def make(backend=None, **overrides):
        sizes = dict(stem_features=8, encoder_features=(8, 16, 16), decoder_features=(16, 16, 8),
                     blocks_per_stage=1, out_capacities=(1.0, 1.0, 1.0))
        return models.MinkUNet(NUM_CLASSES, backend=backend, **{**sizes, **overrides})
    return make


@pytest.fixture(scope="session")
def tpu_compile():
    """``compile(function, *args)``: ``jax.jit(function)`` compiled for a device of a TPU v5e
    topology without a TPU (libtpu); the executable cannot run, its text and
    ``memory_analysis()`` are real (``lower_only=True``: the lowered program, not compiled;
    ``options``: ``jax.jit``'s ``compiler_options``).
    ``args``: pytrees of arrays or ShapeDtypeStructs. Skips where libtpu is missing, with the
    reason; fails under CI, which installs it."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("libtpu is missing: CI compiles for TPU without one (pip install \"jax[tpu]==<jax version>\")")
        pytest.skip("libtpu is not installed (pip install \"jax[tpu]==<jax version>\"): no deviceless TPU compile")
    from jax.experimental import topologies
    device = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[0]
    # A one-device mesh (jax.sharding.SingleDeviceSharding is deprecated from jax 0.12.1).
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh([device], ("x",)), jax.sharding.PartitionSpec())

    def compile(function, *args, lower_only=False, options=None):
        specs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
        lowered = jax.jit(function, compiler_options=options).lower(*specs)
        return lowered if lower_only else lowered.compile()
    return compile


@pytest.fixture
def small_row_blocks(monkeypatch):
    """The xla backend's row-blocked kernels (pools, the union of ``sparse_add``/``sparse_cat``)
    in blocks of 7 rows instead of ``xla.ROW_BLOCK``'s 16384, so that small tests cross block
    edges (and a last block overlaps the one before)."""
    from jax_sparseconv.backends import xla
    monkeypatch.setattr(xla, "ROW_BLOCK", 7)
    jax.clear_caches()  # traces read ROW_BLOCK
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def load_example():
    """``load(name)``: the module ``examples/<name>.py``, imported (its ``main`` not run)."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
        return module
    return load
