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
