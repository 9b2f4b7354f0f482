"""Backends behind one interface: ``xla`` (pure JAX, everywhere) and ``ffi`` (native).

A backend is a module with these functions (shapes in the docstrings of ``xla.py``):

- ``build_rulebook(indices, geometry, batch_size, out_capacity)``
- ``gather_matmul(x, w, nbr, precision)`` and ``conv_backward(x, w, g, in_nbr, precision)``: convolution
- ``gather_sum(x, nbr)``, ``gather_max(x, nbr)``, ``gather_max_grad(g, argk, in_nbr)``: pooling

Ops name a backend with a string, resolved here: ``"xla"``, ``"ffi"`` (the native kernels,
which refuse to lower for other platforms) or ``"per_platform"`` (what ``backend=None``
means: ffi where it serves, xla elsewhere, decided when the program is lowered, for each
platform it is lowered for; see ``dispatch.py``).
"""

from __future__ import annotations

import jax

from jax_sparseconv import _native
from jax_sparseconv.backends import dispatch, ffi, xla
from jax_sparseconv.backends.dispatch import native_platforms

BACKENDS = {"xla": xla, "ffi": dispatch.native_only, "per_platform": dispatch.per_platform}


def resolve(backend: str | None) -> str:
    """The backend name ops pass on: ``None`` means ``"per_platform"``; ``"ffi"`` is checked
    to be compiled and registered."""
    if backend is None:
        return "per_platform"
    if backend not in ("xla", "ffi"):
        raise ValueError(f"unknown backend {backend!r}; choose one of ['ffi', 'xla'] or None")
    if backend == "ffi" and not ffi.available():
        if _native.disabled_reason is not None:
            raise RuntimeError(f"backend='ffi' is unavailable: {_native.disabled_reason}")
        raise RuntimeError("backend='ffi' needs the compiled extension jax_sparseconv._cpu, which is "
                           "missing: reinstall with `pip install .` (see BUILD.md and jsc.build_info())")
    return backend


def get(name: str):
    """The backend ``name`` (as ``resolve`` returns it): a module or namespace with the
    functions listed above."""
    return BACKENDS[name]


def serving(backend: str | None = None, platform: str | None = None) -> str:
    """``"ffi"`` or ``"xla"``: what runs ``backend``'s ops on ``platform`` (JAX's names: "cpu",
    "cuda", "rocm", "tpu"; default: that of JAX's default device)."""
    if backend is not None:
        return resolve(backend)
    if platform is None:
        device = jax.devices()[0]
        platform = device.platform
        if platform == "gpu":
            platform = "cuda" if "cuda" in device.client.platform_version.lower() else "rocm"
    return "ffi" if platform in native_platforms() else "xla"


def describe(backend: str | None) -> str:
    """A line for logs: the backend and, for None, what serves where."""
    if backend is not None:
        return resolve(backend)
    native = ", ".join(native_platforms())
    return f"None (ffi on {native}, xla elsewhere)" if native else "None (xla: no native kernels in use)"
