"""The CUDA module is built where a CUDA compiler exists, and imports without a GPU."""

import os
import shutil
import subprocess
import sys

import pytest

import jax_sparseconv as jsc


@pytest.mark.skipif(not (shutil.which("nvcc") and os.environ.get("CI")),
                    reason="checked under CI (CI set) on machines with nvcc on PATH")
def test_cuda_module_is_built_where_nvcc_exists():
    info = jsc.build_info()
    assert info["cuda_ffi"], "nvcc is on PATH but jax_sparseconv._cuda was not built (see BUILD.md)"
    assert info["cuda_archs"] and all(isinstance(a, int) for a in info["cuda_archs"])


@pytest.mark.skipif(not jsc.build_info()["cuda_ffi"], reason="jax_sparseconv._cuda is not built")
def test_cuda_module_imports_and_matches_the_cpu_targets():
    """A fresh interpreter imports _cuda (static CUDA runtime: no driver needed to import) and
    registers the same targets as _cpu for the platform "CUDA", next to the CPU ones."""
    script = ("import jax_sparseconv, jax; from jax_sparseconv import _cpu, _cuda; "
              "from jax_sparseconv.backends import ffi; "
              "assert sorted(_cuda.registrations()) == sorted(_cpu.registrations()); "
              "assert ffi.cuda_available(); "
              "assert _cuda.ffi_api_version == _cpu.ffi_api_version; print('ok')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=os.path.dirname(__file__))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_cuda_emulation_module_serves_the_cpu_targets():
    """_cuda_emulated (built by default; JSC_CUDA_EMULATION=OFF skips it) holds the CUDA
    handlers for every target of _cpu."""
    try:
        from jax_sparseconv import _cpu, _cuda_emulated
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("jax_sparseconv._cuda_emulated is not built")
    assert sorted(_cuda_emulated.registrations()) == sorted(_cpu.registrations())
    assert _cuda_emulated.ffi_api_version == _cpu.ffi_api_version


def test_build_info_shows_the_header_and_runtime_ffi_versions():
    from jax_sparseconv import _cpu

    info = jsc.build_info()
    assert info["ffi_api_version"] == tuple(_cpu.ffi_api_version)
    assert info["ffi_headers_jaxlib"] == _cpu.jaxlib_version
    running = info["jaxlib_ffi_api_version"]
    assert running is not None and running[0] == info["ffi_api_version"][0]
    assert running[1] >= info["ffi_api_version"][1] and info["ffi_disabled"] is None


@pytest.mark.parametrize("built, built_jaxlib, running, running_jaxlib, accepted", [
    ((0, 3), "0.10.2", (0, 3), "0.10.2", True),
    ((0, 3), "0.10.2", (0, 5), "0.12.0.1", True),   # a newer jaxlib takes older handlers
    ((0, 5), "0.12.0.1", (0, 4), "0.11.2", False),  # an older one refuses newer handlers
    ((1, 0), "2.0", (0, 9), "1.5", False),          # another major version
    ((0, 3), "0.10.2", None, "0.12.0.1", True),     # no headers to read: jaxlib versions decide
    ((0, 4), "0.11.2", None, "0.10.2", False),
    ((0, 3), "0.10.2", None, "0.10.2.dev20260101+cuda", True),
])
def test_ffi_version_decision(built, built_jaxlib, running, running_jaxlib, accepted):
    from jax_sparseconv import _native

    reason = _native.incompatibility(built, built_jaxlib, running, running_jaxlib)
    assert (reason is None) == accepted
    if not accepted:
        assert built_jaxlib in reason and running_jaxlib in reason and "xla backend" in reason
        assert f"{built[0]}.{built[1]}" in reason and "--no-build-isolation" in reason


def test_a_refused_build_falls_back_to_xla_and_jax_keeps_working(tmp_path):
    """The running jaxlib's headers made to say FFI API 0.2, older than the build's: importing
    jax_sparseconv warns once, registers nothing, serves everything from the xla backend,
    and backend='ffi' says why; JAX itself keeps working."""
    header = tmp_path / "xla" / "ffi" / "api" / "c_api.h"
    header.parent.mkdir(parents=True)
    header.write_text("#define XLA_FFI_API_MAJOR 0\n#define XLA_FFI_API_MINOR 2\n")
    script = f"""
import warnings
import jax, jax.numpy as jnp, numpy as np
jax.ffi.include_dir = lambda: {str(tmp_path)!r}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import jax_sparseconv as jsc
    from jax_sparseconv import functional as F
refusals = [w for w in caught if "cannot load" in str(w.message)]
assert len(refusals) == 1 and refusals[0].category is RuntimeWarning, [str(w.message) for w in caught]
info = jsc.build_info()
assert not info["cpu_ffi"] and info["jaxlib_ffi_api_version"] == (0, 2), info
assert "API 0.2" in info["ffi_disabled"] and info["default_backend"] == "xla", info
x = jsc.SparseConvTensor.from_dense(jnp.zeros((1, 4, 4, 4, 2)).at[0, 1, 2, 3].set(1.0))
y = jax.jit(lambda x, k: F.sparse_conv(x, k, subm=True).features)(x, jnp.ones((3, 3, 3, 2, 3)))
assert float(y.sum()) == 6.0  # one site, 2 input channels of 1, 3 outputs
try:
    F.sparse_conv(x, jnp.ones((3, 3, 3, 2, 3)), subm=True, backend="ffi")
except RuntimeError as error:
    assert "backend='ffi' is unavailable" in str(error) and "API 0.2" in str(error), error
else:
    raise AssertionError("backend='ffi' ran with refused handlers")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=os.path.dirname(__file__), timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
