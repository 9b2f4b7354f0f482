"""What was compiled into this installation (``jsc.build_info()``)."""

from __future__ import annotations

import jax
import jaxlib


def build_info() -> dict:
    """Which native parts are compiled and in use, and the versions involved.

    Keys: ``version``; ``cpu_ffi``, ``cuda_ffi`` (bool: the CPU / CUDA module is compiled and
    its handlers registered); ``ffi_disabled`` (None, or why compiled modules are not used:
    the running jaxlib cannot load their FFI version); ``cuda_archs`` (the CUDA architectures
    compiled in, e.g. ``[80, 90]``); ``cuda_version`` (of the toolkit ``_cuda`` was built
    with, e.g. ``"13.0"``, or None); ``ffi_api_version`` and ``ffi_headers_jaxlib`` (the XLA
    FFI API of the headers the modules were compiled against, and the jaxlib they came
    from); ``jaxlib_ffi_api_version`` (that of the running jaxlib); ``compiler``, ``jax``,
    ``jaxlib``; ``native_platforms`` (where ``backend=None`` runs the native kernels, e.g.
    ``("cpu",)``) and ``default_backend`` (what ``backend=None`` runs on JAX's default device).
    """
    from jax_sparseconv import _native
    from jax_sparseconv.backends import native_platforms, serving

    import jax_sparseconv

    built = _native.compiled_cpu or _native.compiled_cuda
    cuda = _native.compiled_cuda
    return {
        "version": jax_sparseconv.__version__,
        "cpu_ffi": _native.cpu is not None,
        "cuda_ffi": _native.cuda is not None,
        "ffi_disabled": _native.disabled_reason,
        "cuda_archs": [int(a) if a.isdigit() else a for a in cuda.cuda_archs] if cuda else [],
        "cuda_version": f"{cuda.cuda_version // 1000}.{cuda.cuda_version % 1000 // 10}" if cuda else None,
        "ffi_api_version": tuple(built.ffi_api_version) if built else None,
        "ffi_headers_jaxlib": built.jaxlib_version if built else None,
        "jaxlib_ffi_api_version": _native.running_ffi_api_version(),
        "compiler": built.compiler if built else None,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "native_platforms": native_platforms(),
        "default_backend": serving(None),
    }
