"""What was compiled into this installation (``jsc.build_info()``)."""

from __future__ import annotations

import jax
import jaxlib


def build_info() -> dict:
    """Which native parts are compiled, and the versions involved.

    Keys: ``version``, ``cpu_ffi`` (bool), ``cuda_ffi`` (bool: ``jax_sparseconv._cuda``
    imports), ``cuda_archs`` (the CUDA architectures compiled in, e.g. ``[80, 90]``),
    ``cuda_version`` (of the toolkit ``_cuda`` was built with, e.g. ``"13.0"``, or None),
    ``ffi_api_version``, ``compiler``, ``jax``, ``jaxlib``, ``default_backend``.
    """
    from jax_sparseconv.backends import ffi, resolve

    import jax_sparseconv

    cpu, cuda = ffi._cpu, ffi._cuda
    return {
        "version": jax_sparseconv.__version__,
        "cpu_ffi": cpu is not None,
        "cuda_ffi": cuda is not None,
        "cuda_archs": [int(a) if a.isdigit() else a for a in cuda.cuda_archs] if cuda else [],
        "cuda_version": f"{cuda.cuda_version // 1000}.{cuda.cuda_version % 1000 // 10}" if cuda else None,
        "ffi_api_version": tuple(cpu.ffi_api_version) if cpu else None,
        "compiler": cpu.compiler if cpu else None,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "default_backend": resolve(None),
    }
