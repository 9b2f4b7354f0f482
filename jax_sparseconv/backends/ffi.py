"""XLA FFI backend: C++ handlers from ``xla_ffi/`` (module ``jax_sparseconv._cpu``).

Rulebooks are built with a hash table of 64-bit site keys; the feature kernels
gather along the neighbour maps in row tiles on XLA's CPU thread pool. Every
function matches the signature, dtypes and results of its twin in ``xla.py``.
Features may be float32, float64, bfloat16 or float16 (float32 accumulation for
the half types).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_sparseconv.backends.xla import accumulator
from jax_sparseconv.geometry import MODE_CODES, ConvGeometry

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


def _call(target: str, *out_types: jax.ShapeDtypeStruct):
    # "sequential": vmap runs the handler once per mapped element.
    return jax.ffi.ffi_call(target, out_types, vmap_method="sequential")


def _i64(values) -> np.ndarray:
    return np.asarray(values, np.int64)


def build_rulebook(indices, geometry: ConvGeometry, batch_size: int, out_capacity: int):
    """Returns ``(out_indices, out_nbr, in_nbr, needed)``; see rulebook.py."""
    n, K, cols = indices.shape[0], geometry.kernel_volume, geometry.ndim + 1
    call = _call("jsc_build_rulebook",
                 jax.ShapeDtypeStruct((out_capacity, cols), jnp.int32),
                 jax.ShapeDtypeStruct((out_capacity, K), jnp.int32),
                 jax.ShapeDtypeStruct((n, K), jnp.int32),
                 jax.ShapeDtypeStruct((), jnp.int32))
    return call(indices, mode=np.int64(MODE_CODES[geometry.mode]), batch_size=np.int64(batch_size),
                in_shape=_i64(geometry.in_shape), out_shape=_i64(geometry.out_shape),
                kernel_size=_i64(geometry.kernel_size), strides=_i64(geometry.strides),
                padding=_i64(geometry.padding), dilation=_i64(geometry.dilation))


def gather_matmul(x, w, nbr, precision=None):
    """``out[r] = sum_k x[nbr[r, k]] @ w[k]`` in the accumulation dtype (see xla.py).

    ``precision`` is accepted for the common interface: products are always full float32.
    """
    del precision
    out = jax.ShapeDtypeStruct((nbr.shape[0], w.shape[2]), accumulator(x.dtype))
    return _call("jsc_gather_matmul", out)(x, w.astype(x.dtype), nbr)[0]


def gather_matmul_grad(x, g, nbr, precision=None):
    """``dw[k] = sum_r x[nbr[r, k]]^T @ g[r]``, ``[K, Cin, Cout]`` (see xla.py)."""
    del precision
    out = jax.ShapeDtypeStruct((nbr.shape[1], x.shape[1], g.shape[1]), accumulator(x.dtype))
    return _call("jsc_gather_matmul_grad", out)(x, g.astype(x.dtype), nbr)[0]


def gather_sum(x, nbr):
    """``out[r] = sum_k x[nbr[r, k]]`` in the accumulation dtype."""
    out = jax.ShapeDtypeStruct((nbr.shape[0], x.shape[1]), accumulator(x.dtype))
    return _call("jsc_gather_sum", out)(x, nbr)[0]


def gather_max(x, nbr):
    """``(out, argk)``: max over neighbours and the first offset attaining it."""
    shape = (nbr.shape[0], x.shape[1])
    out, argk = _call("jsc_gather_max", jax.ShapeDtypeStruct(shape, accumulator(x.dtype)),
                      jax.ShapeDtypeStruct(shape, jnp.int32))(x, nbr)
    return out.astype(x.dtype), argk  # exact: the max is one of the inputs


def gather_max_grad(g, argk, in_nbr):
    """Input gradient of ``gather_max``."""
    out = jax.ShapeDtypeStruct((in_nbr.shape[0], g.shape[1]), accumulator(g.dtype))
    return _call("jsc_gather_max_grad", out)(g, argk, in_nbr)[0].astype(g.dtype)
