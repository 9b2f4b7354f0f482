"""XLA FFI backend: C++ handlers from ``xla_ffi/`` (modules ``jax_sparseconv._cpu`` and,
where it was built, ``jax_sparseconv._cuda``, registered under the same target names for
the platforms "cpu" and "CUDA", so one ``ffi_call`` serves both).

Rulebooks are built from 64-bit site keys (sorted on the CPU, a hash table on the
GPU); the feature kernels gather along the neighbour maps in row tiles on XLA's CPU
thread pool. The handlers (``_v2`` targets) give and take the rulebook's offset-leading
neighbour maps ``[K, M]`` as they are (the ``_v1`` targets, kept for exported programs,
take them ``[M, K]``). Every function matches the signature, dtypes and results of its twin in ``xla.py``.
Features may be float32, float64, bfloat16 or float16 (float32 accumulation for
the half types).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_sparseconv import _native
from jax_sparseconv._vma import vary_like
from jax_sparseconv.backends.xla import accumulator, offset_index_dtype
from jax_sparseconv.geometry import MODE_CODES, SUBM, ConvGeometry


def available() -> bool:
    """True when the CPU extension is compiled and registered (see ``_native``)."""
    return _native.cpu is not None


def cuda_available() -> bool:
    """True when the CUDA extension is compiled and registered."""
    return _native.cuda is not None


def _call(target: str, *out_types: jax.ShapeDtypeStruct):
    # "sequential" is the fallback of vmap where the rules below cannot fold: XLA then
    # runs the handler once per mapped element.
    call = jax.ffi.ffi_call(target, out_types, vmap_method="sequential")

    def run(*operands, **attributes):
        # Under shard_map, a result varies over the mesh axes its operands vary over.
        return tuple(vary_like(out, *operands) for out in call(*operands, **attributes))

    return run


def _i64(values) -> np.ndarray:
    return np.asarray(values, np.int64)


# ---- vmap: fold the mapped axis into the rows -------------------------------------------------
#
# Under jax.vmap, a stack of V tensors becomes one call on V times the rows: the
# neighbour maps of item v are shifted by v * rows, and the rulebook builder sees item v's
# batch b as batch v * batch_size + b. Only per-item weights (an ensemble) and the
# kernel gradient, whose sum must stay per item, fall back to one call per item.

def _shift(nbr: jax.Array, rows: int) -> jax.Array:
    """``nbr [V, ...]`` with item v's entries moved to rows ``v * rows ...`` (-1 stays)."""
    shift = (jnp.arange(nbr.shape[0], dtype=jnp.int32) * rows)[:, None, None]
    return jnp.where(nbr >= 0, nbr + shift, -1)


def _row_kernel(fn, num_gathered: int):
    """``fn(*gathered, *shared, nbr)``, whose outputs have one row per ``nbr`` row (``nbr``
    ``[K, M]``) and read the ``gathered`` arrays at the rows ``nbr`` names, with a vmap
    rule that folds."""
    kernel = jax.custom_batching.custom_vmap(fn)

    @kernel.def_vmap
    def rule(axis_size, in_batched, *args):
        gathered, shared, nbr = args[:num_gathered], args[num_gathered:-1], args[-1]
        if any(in_batched[num_gathered:-1]):  # per-item weights: the handler runs once per item
            out = jax.vmap(fn, in_axes=[0 if b else None for b in in_batched])(*args)
            return out, jax.tree_util.tree_map(lambda _: True, out)
        if not in_batched[-1]:
            nbr = jnp.broadcast_to(nbr, (axis_size, *nbr.shape))
        if any(in_batched[:num_gathered]):
            rows = gathered[0].shape[1] if in_batched[0] else gathered[0].shape[0]
            gathered = [a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
                        for a, b in zip(gathered, in_batched)]
            gathered = [a.reshape(axis_size * rows, *a.shape[2:]) for a in gathered]
            nbr = _shift(nbr, rows)
        nbr = jnp.moveaxis(nbr, 0, 1).reshape(nbr.shape[1], -1)  # [V, K, M] -> [K, V * M]
        out = kernel(*gathered, *shared, nbr)
        out = jax.tree_util.tree_map(lambda o: o.reshape(axis_size, -1, *o.shape[1:]), out)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return kernel


def build_rulebook(indices, geometry: ConvGeometry, batch_size: int, out_capacity: int, presorted: bool = False):
    """Returns ``(out_indices, out_nbr, in_nbr, needed)``; see rulebook.py. ``presorted`` is
    not needed: the native builders hash the sites."""
    del presorted
    return _build(indices, geometry, batch_size, out_capacity)


def _build(indices, geometry: ConvGeometry, batch_size: int, out_capacity: int):
    """The handler's rulebook; under vmap one call on all items."""
    build = jax.custom_batching.custom_vmap(
        lambda indices: _build_rulebook(indices, geometry, batch_size, out_capacity))

    @build.def_vmap
    def rule(axis_size, in_batched, indices):
        del in_batched  # only indices is an argument, so it is the batched one
        out = _fold_build(indices, geometry, batch_size, out_capacity)
        return out, (True,) * 4

    return build(indices)


def _build_rulebook(indices, geometry: ConvGeometry, batch_size: int, out_capacity: int):
    n, K, cols = indices.shape[0], geometry.kernel_volume, geometry.ndim + 1
    call = _call("jsc_build_rulebook_v2",
                 jax.ShapeDtypeStruct((out_capacity, cols), jnp.int32),
                 jax.ShapeDtypeStruct((K, out_capacity), jnp.int32),
                 jax.ShapeDtypeStruct((K, n), jnp.int32),
                 jax.ShapeDtypeStruct((), jnp.int32))
    return call(indices, mode=np.int64(MODE_CODES[geometry.mode]), batch_size=np.int64(batch_size),
                in_shape=_i64(geometry.in_shape), out_shape=_i64(geometry.out_shape),
                kernel_size=_i64(geometry.kernel_size), strides=_i64(geometry.strides),
                padding=_i64(geometry.padding), dilation=_i64(geometry.dilation))


def _fold_build(indices, geometry: ConvGeometry, batch_size: int, out_capacity: int):
    """The rulebooks of ``indices [V, N, ndim + 1]``, built by one call on all items. The
    folded maps are cut apart row-major (``[rows, K]``), then laid out ``[V, K, rows]``."""
    V, n = indices.shape[:2]
    item = jnp.arange(V, dtype=jnp.int32)[:, None]
    batch = jnp.where(indices[..., 0] >= 0, indices[..., 0] + item * batch_size, -1)
    folded = jnp.concatenate([batch[..., None], indices[..., 1:]], axis=-1).reshape(V * n, -1)
    out_indices, out_nbr, in_nbr, needed = _build(folded, geometry, V * batch_size, V * out_capacity)
    out_nbr, in_nbr = out_nbr.T, in_nbr.T
    offsets_leading = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    if geometry.mode == SUBM:
        unshift = lambda m: _shift(m.reshape(V, n, -1), -n)  # noqa: E731  (rows of item v start at v * n)
        return (indices, offsets_leading(unshift(out_nbr)), offsets_leading(unshift(in_nbr)),
                jnp.sum(indices[..., 0] >= 0, axis=1, dtype=jnp.int32))
    # Output rows come sorted by folded batch, so item v's rows are one run: cut the runs
    # apart, each into its own capacity.
    stored = out_indices[:, 0] >= 0
    owner = jnp.where(stored, out_indices[:, 0] // batch_size, V)  # V: padding
    counts = jnp.zeros((V + 1,), jnp.int32).at[owner].add(1)[:V]
    start = jnp.cumsum(counts) - counts
    local = jnp.arange(V * out_capacity, dtype=jnp.int32) - start[jnp.minimum(owner, V - 1)]
    keep = stored & (local < out_capacity)
    slot = (jnp.where(keep, owner, V), jnp.where(keep, local, 0))  # item V is out of range: dropped
    sites = jnp.concatenate([(out_indices[:, :1] - owner[:, None] * batch_size), out_indices[:, 1:]], axis=1)
    item_indices = jnp.full((V, out_capacity, indices.shape[-1]), -1, jnp.int32).at[slot].set(sites, mode="drop")
    item_out_nbr = jnp.full((V, out_capacity, out_nbr.shape[-1]), -1, jnp.int32).at[slot].set(
        jnp.where(out_nbr >= 0, out_nbr - jnp.minimum(owner, V - 1)[:, None] * n, -1), mode="drop")
    row_in_item = jnp.where(keep, local, -1)
    item_in_nbr = jnp.where(in_nbr >= 0, row_in_item[jnp.maximum(in_nbr, 0)], -1).reshape(V, n, -1)
    # Sites beyond the folded capacity belong to the items from the last stored one on
    # (rows are sorted by item): count them there, so that no item's loss goes unreported.
    missing = needed - jnp.sum(stored, dtype=jnp.int32)
    last = jnp.max(jnp.where(stored, owner, 0))
    item_needed = counts + jnp.where((missing > 0) & (jnp.arange(V) >= last), missing, 0)
    return item_indices, offsets_leading(item_out_nbr), offsets_leading(item_in_nbr), item_needed


def allows_tf32(precision) -> bool:
    """Whether float32 products may round their inputs to TF32 (the CUDA handlers then use
    tensor cores, as XLA's own GPU matmuls do): unless ``precision`` (or, where it is None,
    ``jax_default_matmul_precision``) is ``"highest"`` / ``"float32"`` / ``Precision.HIGHEST``."""
    if precision is None:
        precision = jax.config.jax_default_matmul_precision
    values = precision if isinstance(precision, (tuple, list)) else (precision,)
    return not any(str(getattr(v, "name", v)).lower() in ("highest", "float32", "f32_f32_f32") for v in values)


def _gather_matmul(x, w, nbr, allow_tf32):
    out = jax.ShapeDtypeStruct((nbr.shape[1], w.shape[2]), accumulator(x.dtype))
    return _call("jsc_gather_matmul_v2", out)(x, w.astype(x.dtype), nbr, allow_tf32=np.int64(allow_tf32))[0]


def _gather_matmul_grad(x, g, nbr, allow_tf32):
    out = jax.ShapeDtypeStruct((nbr.shape[0], x.shape[1], g.shape[1]), accumulator(x.dtype))
    return _call("jsc_gather_matmul_grad_v2", out)(x, g.astype(x.dtype), nbr, allow_tf32=np.int64(allow_tf32))[0]


def _gather_sum(x, nbr):
    out = jax.ShapeDtypeStruct((nbr.shape[1], x.shape[1]), accumulator(x.dtype))
    return _call("jsc_gather_sum_v2", out)(x, nbr)[0]


def _gather_max(x, nbr):
    shape = (nbr.shape[1], x.shape[1])
    out, argk = _call("jsc_gather_max_v2", jax.ShapeDtypeStruct(shape, accumulator(x.dtype)),
                      jax.ShapeDtypeStruct(shape, jnp.int32))(x, nbr)
    # exact: the max is one of the inputs
    return out.astype(x.dtype), argk.astype(offset_index_dtype(nbr.shape[0]))


def _gather_max_grad(g, argk, in_nbr):
    out = jax.ShapeDtypeStruct((in_nbr.shape[1], g.shape[1]), accumulator(g.dtype))
    return _call("jsc_gather_max_grad_v2", out)(g, argk.astype(jnp.int32), in_nbr)[0].astype(g.dtype)


_gather_matmul_folding = {tf32: _row_kernel(functools.partial(_gather_matmul, allow_tf32=tf32), num_gathered=1)
                          for tf32 in (False, True)}
_gather_sum_folding = _row_kernel(_gather_sum, num_gathered=1)
_gather_max_folding = _row_kernel(_gather_max, num_gathered=1)
_gather_max_grad_folding = _row_kernel(_gather_max_grad, num_gathered=2)


def gather_matmul(x, w, nbr, precision=None):
    """``out[r] = sum_k x[nbr[k, r]] @ w[k]`` in the accumulation dtype (see xla.py).

    ``precision``: on a CUDA GPU, float32 products use TF32 tensor cores where
    ``allows_tf32(precision)``; on the CPU they are always full float32.
    """
    return _gather_matmul_folding[allows_tf32(precision)](x, w, nbr)


def gather_matmul_grad(x, g, nbr, precision=None):
    """``dw[k] = sum_r x[nbr[k, r]]^T @ g[r]``, ``[K, Cin, Cout]`` in the accumulation dtype.

    Under vmap it runs once per item (the sums must stay per item): the handler's own
    "sequential" batching. ``precision`` as in ``gather_matmul``.
    """
    return _gather_matmul_grad(x, g, nbr, allows_tf32(precision))


def conv_backward(x, w, g, in_nbr, precision=None):
    """``(dx, dw)``: a conv's gradients read through ``in_nbr`` (see xla.py), from the input
    gradient's gather-matmul and the kernel gradient's handler on the transposed map
    (``dw[k]^T = sum_i g[in_nbr[k, i]]^T x[i]``)."""
    dx = gather_matmul(g, jnp.swapaxes(w, 1, 2), in_nbr, precision)
    dw = jnp.swapaxes(gather_matmul_grad(g, x, in_nbr, precision), 1, 2)
    return dx, dw


def gather_sum(x, nbr):
    """``out[r] = sum_k x[nbr[k, r]]`` in the accumulation dtype."""
    return _gather_sum_folding(x, nbr)


def gather_max(x, nbr):
    """``(out, argk)``: max over neighbours and the first offset attaining it."""
    return _gather_max_folding(x, nbr)


def gather_max_grad(g, argk, in_nbr):
    """Input gradient of ``gather_max``."""
    return _gather_max_grad_folding(g, argk, in_nbr)
