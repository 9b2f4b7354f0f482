"""XLA FFI backend: C++ handlers from ``xla_ffi/`` (module ``jax_sparseconv._cpu``).

Rulebooks are built natively (a hash table of 64-bit site keys). The feature kernels
(gather-matmul, pooling) run the XLA backend's code until the native CPU kernels land
(issue 3); the interface is the same, so only this file changes then.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_sparseconv.backends.xla import gather_matmul, gather_matmul_grad, gather_max, gather_max_grad, gather_sum
from jax_sparseconv.geometry import MODE_CODES, ConvGeometry

__all__ = ["available", "build_rulebook", "gather_matmul", "gather_matmul_grad", "gather_sum",
           "gather_max", "gather_max_grad"]

try:
    from jax_sparseconv import _cpu
except ImportError:  # a source checkout without the compiled extension
    _cpu = None

if _cpu is not None:
    for _name, _capsule in _cpu.registrations().items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")


def available() -> bool:
    """True when the CPU extension is compiled and registered."""
    return _cpu is not None


def _i64(values) -> np.ndarray:
    return np.asarray(values, np.int64)


def build_rulebook(indices, geometry: ConvGeometry, batch_size: int, out_capacity: int):
    """Returns ``(out_indices, out_nbr, in_nbr, needed)``; see rulebook.py."""
    n, K, cols = indices.shape[0], geometry.kernel_volume, geometry.ndim + 1
    out_types = (
        jax.ShapeDtypeStruct((out_capacity, cols), jnp.int32),
        jax.ShapeDtypeStruct((out_capacity, K), jnp.int32),
        jax.ShapeDtypeStruct((n, K), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    call = jax.ffi.ffi_call("jsc_build_rulebook", out_types, vmap_method="sequential")
    return call(
        indices,
        mode=np.int64(MODE_CODES[geometry.mode]),
        batch_size=np.int64(batch_size),
        in_shape=_i64(geometry.in_shape),
        out_shape=_i64(geometry.out_shape),
        kernel_size=_i64(geometry.kernel_size),
        strides=_i64(geometry.strides),
        padding=_i64(geometry.padding),
        dilation=_i64(geometry.dilation),
    )
