"""What was compiled into this installation (``jsc.build_info()``)."""

from __future__ import annotations

import jax
import jaxlib


def build_info() -> dict:
    """Which native parts are compiled, and the versions involved.

    Keys: ``version``, ``cpu_ffi`` (bool), ``cuda_ffi`` (bool), ``cuda_archs`` (list of
    ints), ``ffi_api_version``, ``compiler``, ``jax``, ``jaxlib``, ``default_backend``.
    """
    from jax_sparseconv.backends import ffi, resolve

    import jax_sparseconv

    cpu = ffi._cpu
    return {
        "version": jax_sparseconv.__version__,
        "cpu_ffi": cpu is not None,
        "cuda_ffi": False,
        "cuda_archs": [],
        "ffi_api_version": tuple(cpu.ffi_api_version) if cpu else None,
        "compiler": cpu.compiler if cpu else None,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "default_backend": resolve(None),
    }
