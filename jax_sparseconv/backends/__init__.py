"""Backends behind one interface: ``xla`` (pure JAX, everywhere) and ``ffi`` (native).

A backend is a module with these functions (shapes in the docstrings of ``xla.py``):

- ``build_rulebook(indices, geometry, batch_size, out_capacity)``
- ``gather_matmul(x, w, nbr, precision)`` and ``gather_matmul_grad(x, g, nbr, precision)``: convolution
- ``gather_sum(x, nbr)``, ``gather_max(x, nbr)``, ``gather_max_grad(g, argk, in_nbr)``: pooling
"""

from __future__ import annotations

import types

from jax_sparseconv import _native
from jax_sparseconv.backends import ffi, xla

BACKENDS = {"xla": xla, "ffi": ffi}


def resolve(backend: str | None) -> str:
    """The backend name to use: ``None`` means ``ffi`` where it is compiled for the
    default platform (CPU; a CUDA GPU with ``jax_sparseconv._cuda``) and ``xla``
    elsewhere (TPU, ROCm)."""
    if backend is None:
        return "ffi" if ffi.serves_default_platform() else "xla"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)} or None")
    if backend == "ffi" and not ffi.available():
        if _native.disabled_reason is not None:
            raise RuntimeError(f"backend='ffi' is unavailable: {_native.disabled_reason}")
        raise RuntimeError("backend='ffi' needs the compiled extension jax_sparseconv._cpu, which is "
                           "missing: reinstall with `pip install .` (see BUILD.md and jsc.build_info())")
    return backend


def get(name: str) -> types.ModuleType:
    """The backend module ``"xla"`` or ``"ffi"`` (``jax_sparseconv.backends.xla`` / ``.ffi``)."""
    return BACKENDS[name]
