"""Sparse convolution and pooling ops (``jsc.functional``), each a ``jax.custom_vjp``.

Every op takes a SparseConvTensor and returns one (global pools return ``[B, C]``).
Kernels use Flax's layout ``(*kernel_size, C_in, C_out)``; offsets are enumerated
row-major over the kernel dims. Backward passes are written by hand: they gather
along the transposed rulebook instead of scattering, so results are deterministic.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from jax_sparseconv import backends
from jax_sparseconv._vma import vary_together
from jax_sparseconv.backends import xla
from jax_sparseconv.geometry import REGULAR, SUBM, TRANSPOSED, make_geometry, normalize_tuple
from jax_sparseconv.rulebook import Rulebook, build_rulebook
from jax_sparseconv.tensor import (SparseConvTensor, is_concrete, merge_overflow, overflow_record,
                                   raise_if_overflow)

IntOrSeq = int | Sequence[int]


# ---- rulebooks and outputs -------------------------------------------------------------

def _get_rulebook(x: SparseConvTensor, geometry, indice_key, out_capacity, backend) -> Rulebook:
    """The cached rulebook for ``indice_key`` if it fits ``geometry``, else a new one."""
    cached = x.indice_dict.get(indice_key) if indice_key is not None else None
    if cached is not None:
        if cached.geometry != geometry or cached.in_indices.shape != x.indices.shape:
            raise ValueError(
                f"indice_key {indice_key!r} holds a rulebook for {cached.geometry} on capacity "
                f"{cached.in_indices.shape[0]}, which does not match {geometry} on capacity "
                f"{x.capacity}; layers that share a key need the same geometry and input sites")
        if not _same_sites(cached.in_indices, x.indices):
            raise ValueError(f"indice_key {indice_key!r} holds a rulebook built on other sites than the "
                             "input's; layers that share a key need the same input sites")
        if out_capacity is None or out_capacity == cached.out_capacity:
            return cached
    if out_capacity is None:
        out_capacity = geometry.default_out_capacity(x.capacity, x.batch_size)
    rulebook = build_rulebook(x.indices, geometry, x.batch_size, int(out_capacity), backends.get(backend),
                              presorted=_sorted_sites(x))
    if is_concrete(rulebook.needed):
        raise_if_overflow(overflow_record(rulebook.needed, rulebook.out_capacity),
                          f"{geometry.mode} sparse op (indice_key={indice_key!r})")
    return rulebook


def _sorted_sites(x: SparseConvTensor) -> bool:
    """Whether ``x``'s sites are known to be sorted: they are the output sites (the same
    array) of a regular or transposed rulebook it carries, which come in sorted order."""
    return any(r.out_indices is x.indices and r.geometry.mode != SUBM for r in x.indice_dict.values())


def _same_sites(a: jax.Array, b: jax.Array) -> bool:
    """Whether two index arrays hold the same rows: the same array, or equal values where
    both are concrete. Traced arrays that are not the same array cannot be compared while
    tracing, and count as the same (the caller's promise, as for site values under jit)."""
    if a is b or not is_concrete(a, b):
        return True
    return bool(jnp.array_equal(a, b))


def _inverse_rulebook(x: SparseConvTensor, indice_key, kernel_size) -> Rulebook:
    if indice_key is None:
        raise ValueError("an inverse convolution needs the indice_key of the convolution it inverts")
    if indice_key not in x.indice_dict:
        raise ValueError(f"indice_key {indice_key!r} is not in the tensor's indice_dict "
                         f"(keys: {sorted(x.indice_dict)}); run the matching strided conv first")
    forward = x.indice_dict[indice_key]
    if forward.geometry.mode != REGULAR:
        raise ValueError(f"indice_key {indice_key!r} holds a {forward.geometry.mode} rulebook; an "
                         "inverse convolution inverts a regular (strided) convolution or pooling")
    if forward.geometry.kernel_size != tuple(kernel_size):
        raise ValueError(f"inverse kernel_size {tuple(kernel_size)} differs from the "
                         f"kernel_size {forward.geometry.kernel_size} of indice_key {indice_key!r}")
    if forward.out_indices.shape != x.indices.shape:
        raise ValueError(f"the input has capacity {x.capacity} but indice_key {indice_key!r} "
                         f"produced capacity {forward.out_capacity}")
    if not _same_sites(forward.out_indices, x.indices):
        raise ValueError(f"the input's sites differ from the output sites of indice_key {indice_key!r}; an "
                         "inverse conv must run on the sites that conv produced")
    return forward.inverse()


def _output(x: SparseConvTensor, rulebook: Rulebook, features, indice_key) -> SparseConvTensor:
    indice_dict = dict(x.indice_dict)
    if indice_key is not None and not rulebook.inverted:
        indice_dict[indice_key] = rulebook
    overflow = merge_overflow(x.overflow, overflow_record(rulebook.needed, rulebook.out_capacity))
    return SparseConvTensor(features, rulebook.out_indices, rulebook.out_shape, x.batch_size,
                            indice_dict, overflow, validate=False)


def _check_tensor(x) -> None:
    if not isinstance(x, SparseConvTensor):
        raise TypeError(f"expected a SparseConvTensor, got {type(x).__name__}")


# ---- convolution -----------------------------------------------------------------------
#
# Under shard_map the arguments of each custom_vjp are first made to vary over the same
# mesh axes (vary_together), so that every cotangent has its argument's type; JAX's
# transpose of that cast sums a replicated kernel's gradient over the devices.

@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _conv(features, kernel, bias, out_nbr, in_nbr, out_active, backend, precision):
    return _conv_fwd(features, kernel, bias, out_nbr, in_nbr, out_active, backend, precision)[0]


# Padding rows have no neighbours, so the gathers give them zeros and never read their
# cotangents: only the bias needs the active-row mask.

def _conv_fwd(features, kernel, bias, out_nbr, in_nbr, out_active, backend, precision):
    out = backends.get(backend).gather_matmul(features, kernel, out_nbr, precision)
    if bias is not None:
        out = jnp.where(out_active[:, None], out + bias, 0)
    bias_rows = None if bias is None else out_active  # None (no leaves) tells the backward pass: no bias
    return out.astype(features.dtype), (features, kernel, in_nbr, bias_rows)


def _conv_bwd(backend, precision, residuals, g):
    features, kernel, in_nbr, bias_rows = residuals
    impl = backends.get(backend)
    d_features, d_kernel = impl.conv_backward(features, kernel, g, in_nbr, precision)
    d_features, d_kernel = d_features.astype(features.dtype), d_kernel.astype(kernel.dtype)
    d_bias = None
    if bias_rows is not None:
        d_bias = jnp.sum(jnp.where(bias_rows[:, None], g, 0), axis=0,
                         dtype=jnp.promote_types(g.dtype, jnp.float32)).astype(kernel.dtype)
    return d_features, d_kernel, d_bias, None, None, None


_conv.defvjp(_conv_fwd, _conv_bwd)


def sparse_conv(x: SparseConvTensor, kernel, bias=None, *, strides: IntOrSeq = 1, padding: IntOrSeq = 0,
                dilation: IntOrSeq = 1, subm: bool = False, transposed: bool = False, inverse: bool = False,
                indice_key: str | None = None, out_capacity: int | None = None,
                precision: jax.lax.PrecisionLike = None, backend: str | None = None) -> SparseConvTensor:
    """Sparse convolution (spconv's SubMConv, SparseConv, SparseConvTranspose, SparseInverseConv).

    Args:
      x: input with ``C_in`` channels.
      kernel: ``(*kernel_size, C_in, C_out)``.
      bias: optional ``[C_out]``, added at active output sites.
      strides, padding, dilation: int or one per spatial dim (ignored by ``subm``).
      subm: submanifold conv: output sites are the input rows, unchanged; odd kernels.
      transposed: transposed conv (``o = i * s - p + k * d``); creates sites.
      inverse: back to the input sites of the regular conv (or pool) stored under
        ``indice_key``, through the transpose of its rulebook (same offset numbering).
      indice_key: cache the rulebook in the output's ``indice_dict`` under this key, or
        reuse the one already there (spconv's ``indice_key``).
      out_capacity: static row capacity of a regular/transposed output. Default: the
        input capacity for regular convs, the largest count the geometry allows for
        transposed ones (see ``ConvGeometry.default_out_capacity``). More sites raise
        ``CapacityOverflowError`` eagerly, or set the output's ``overflow`` record under
        ``jit`` (see ``jsc.check_overflow``).
      precision: matmul precision (as in ``jnp.matmul``; it matters on GPU and TPU). The
        ``ffi`` CPU kernels always multiply in full float32; its CUDA kernels use TF32 tensor
        cores for float32 unless precision is ``"highest"`` (as XLA's GPU matmuls do).
      backend: ``"xla"``, ``"ffi"`` or None: per lowering platform, ffi where compiled (CPU;
        CUDA with ``jax_sparseconv._cuda``), xla elsewhere (``backends/dispatch.py``).

    Returns:
      SparseConvTensor with ``C_out`` channels in ``result_type(features, kernel)``.
    """
    _check_tensor(x)
    if sum((subm, transposed, inverse)) > 1:
        raise ValueError("choose at most one of subm, transposed and inverse")
    kernel = jnp.asarray(kernel)
    if kernel.ndim != x.ndim + 2 or kernel.shape[-2] != x.num_channels:
        raise ValueError(f"kernel must be (*kernel_size, C_in={x.num_channels}, C_out) with {x.ndim} "
                         f"spatial dims, got shape {kernel.shape}")
    c_out = kernel.shape[-1]
    dtype = jnp.result_type(x.features, kernel)
    if bias is not None:
        bias = jnp.asarray(bias, dtype)
        if bias.shape != (c_out,):
            raise ValueError(f"bias must have shape ({c_out},), got {bias.shape}")
    backend = backends.resolve(backend)
    kernel_size = kernel.shape[:-2]
    if inverse:
        rulebook = _inverse_rulebook(x, indice_key, kernel_size)
    else:
        mode = SUBM if subm else TRANSPOSED if transposed else REGULAR
        geometry = make_geometry(mode, x.spatial_shape, kernel_size, strides, padding, dilation)
        rulebook = _get_rulebook(x, geometry, indice_key, out_capacity, backend)
    out_active = rulebook.out_indices[:, 0] >= 0
    features = _conv(*vary_together(x.features.astype(dtype), kernel.reshape(-1, x.num_channels, c_out).astype(dtype),
                                     bias, rulebook.out_nbr, rulebook.in_nbr, out_active), backend, precision)
    return _output(x, rulebook, features, indice_key)


# ---- pooling ---------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _max_pool(features, out_nbr, in_nbr, out_active, backend):
    return _max_pool_fwd(features, out_nbr, in_nbr, out_active, backend)[0]


def _max_pool_fwd(features, out_nbr, in_nbr, out_active, backend):
    out, argk = backends.get(backend).gather_max(features, out_nbr)
    return jnp.where(out_active[:, None], out, 0), (argk, in_nbr, out_active)


def _max_pool_bwd(backend, residuals, g):
    argk, in_nbr, out_active = residuals
    g = jnp.where(out_active[:, None], g, 0)
    return backends.get(backend).gather_max_grad(g, argk, in_nbr), None, None, None


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _avg_pool(features, out_nbr, in_nbr, out_active, backend):
    return _avg_pool_fwd(features, out_nbr, in_nbr, out_active, backend)[0]


def _avg_pool_fwd(features, out_nbr, in_nbr, out_active, backend):
    count = jnp.sum(out_nbr >= 0, axis=0)[:, None]
    scale = jnp.where(out_active[:, None], 1.0 / jnp.maximum(count, 1), 0.0)
    out = backends.get(backend).gather_sum(features, out_nbr) * scale
    return out.astype(features.dtype), (in_nbr, scale)


def _avg_pool_bwd(backend, residuals, g):
    in_nbr, scale = residuals
    d_features = backends.get(backend).gather_sum((g * scale).astype(g.dtype), in_nbr)
    return d_features.astype(g.dtype), None, None, None


_avg_pool.defvjp(_avg_pool_fwd, _avg_pool_bwd)


def _pool(pool_fn, x, kernel_size, strides, padding, dilation, indice_key, out_capacity, backend):
    _check_tensor(x)
    kernel_size = normalize_tuple(kernel_size, x.ndim, "kernel_size")
    strides = kernel_size if strides is None else strides
    backend = backends.resolve(backend)
    geometry = make_geometry(REGULAR, x.spatial_shape, kernel_size, strides, padding, dilation)
    rulebook = _get_rulebook(x, geometry, indice_key, out_capacity, backend)
    out_active = rulebook.out_indices[:, 0] >= 0
    features = pool_fn(*vary_together(x.features, rulebook.out_nbr, rulebook.in_nbr, out_active), backend)
    return _output(x, rulebook, features, indice_key)


def sparse_max_pool(x: SparseConvTensor, kernel_size: IntOrSeq, strides: IntOrSeq | None = None,
                    padding: IntOrSeq = 0, dilation: IntOrSeq = 1, *, indice_key: str | None = None,
                    out_capacity: int | None = None, backend: str | None = None) -> SparseConvTensor:
    """Max over the active inputs of each window (spconv's SparseMaxPool).

    Same site geometry as a regular conv; ``strides=None`` means ``kernel_size``. Only
    active inputs take part, so an all-negative window gives its true maximum. The
    gradient goes to the first input (in kernel offset order) attaining the max.
    """
    return _pool(_max_pool, x, kernel_size, strides, padding, dilation, indice_key, out_capacity, backend)


def sparse_avg_pool(x: SparseConvTensor, kernel_size: IntOrSeq, strides: IntOrSeq | None = None,
                    padding: IntOrSeq = 0, dilation: IntOrSeq = 1, *, indice_key: str | None = None,
                    out_capacity: int | None = None, backend: str | None = None) -> SparseConvTensor:
    """Mean over the active inputs of each window (spconv's SparseAvgPool).

    Same geometry and arguments as ``sparse_max_pool``; the divisor is the number of
    active inputs in the window, not the window volume.
    """
    return _pool(_avg_pool, x, kernel_size, strides, padding, dilation, indice_key, out_capacity, backend)


# ---- global pooling --------------------------------------------------------------------

def _segments(x: SparseConvTensor) -> jax.Array:
    """Batch index of each row; padding rows get ``batch_size`` (dropped by segment ops)."""
    return jnp.where(x.active, x.indices[:, 0], x.batch_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _global_max(features, segments, batch_size):
    return _global_max_fwd(features, segments, batch_size)[0]


def _global_max_fwd(features, segments, batch_size):
    best = jax.ops.segment_max(features, segments, num_segments=batch_size)
    rows = jnp.arange(features.shape[0], dtype=jnp.int32)[:, None]
    at_max = features == best[jnp.minimum(segments, batch_size - 1)]
    winner = jax.ops.segment_min(jnp.where(at_max, rows, features.shape[0]), segments, num_segments=batch_size)
    empty = winner >= features.shape[0]
    return jnp.where(empty, 0, best).astype(features.dtype), (segments, winner)


def _global_max_bwd(batch_size, residuals, g):
    segments, winner = residuals
    seg = jnp.minimum(segments, batch_size - 1)
    rows = jnp.arange(segments.shape[0], dtype=jnp.int32)[:, None]
    won = (rows == winner[seg]) & (segments < batch_size)[:, None]
    return jnp.where(won, g[seg], 0).astype(g.dtype), None


_global_max.defvjp(_global_max_fwd, _global_max_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _global_avg(features, segments, batch_size):
    return _global_avg_fwd(features, segments, batch_size)[0]


def _global_avg_fwd(features, segments, batch_size):
    acc = jnp.promote_types(features.dtype, jnp.float32)
    total = jax.ops.segment_sum(features.astype(acc), segments, num_segments=batch_size)
    count = jax.ops.segment_sum(jnp.ones_like(segments, acc), segments, num_segments=batch_size)
    scale = 1.0 / jnp.maximum(count, 1)
    return (total * scale[:, None]).astype(features.dtype), (segments, scale)


def _global_avg_bwd(batch_size, residuals, g):
    segments, scale = residuals
    seg = jnp.minimum(segments, batch_size - 1)
    d_features = jnp.where((segments < batch_size)[:, None], g[seg] * scale[seg, None], 0)
    return d_features.astype(g.dtype), None


_global_avg.defvjp(_global_avg_fwd, _global_avg_bwd)


def global_max_pool(x: SparseConvTensor) -> jax.Array:
    """``[B, C]`` max over each batch item's active rows (0 for an item with none)."""
    _check_tensor(x)
    return _global_max(*vary_together(x.features, _segments(x)), x.batch_size)


def global_avg_pool(x: SparseConvTensor) -> jax.Array:
    """``[B, C]`` mean over each batch item's active rows (0 for an item with none)."""
    _check_tensor(x)
    return _global_avg(*vary_together(x.features, _segments(x)), x.batch_size)


# ---- combining tensors -----------------------------------------------------------------

def _check_compatible(tensors) -> None:
    if not tensors:
        raise ValueError("expected at least one SparseConvTensor")
    for t in tensors:
        _check_tensor(t)
    first = tensors[0]
    for t in tensors[1:]:
        if (t.spatial_shape, t.batch_size) != (first.spatial_shape, first.batch_size):
            raise ValueError(f"tensors live on different grids: spatial_shape {first.spatial_shape} "
                             f"batch_size {first.batch_size} vs {t.spatial_shape} {t.batch_size}")


def _union_rows(tensors, out_capacity: int):
    """Sites of the union of ``tensors``, sorted, and where each tensor holds them.

    Returns ``(out_indices [out_capacity, ndim + 1], rows [T, out_capacity], needed)``:
    ``rows[t, o]`` is the row of tensor ``t`` at output site ``o``, or -1.
    """
    batch_size, shape = tensors[0].batch_size, tensors[0].spatial_shape
    indices = jnp.concatenate([t.indices for t in tensors])
    owner = jnp.concatenate([jnp.full((t.capacity,), i, jnp.int32) for i, t in enumerate(tensors)])
    row = jnp.concatenate([jnp.arange(t.capacity, dtype=jnp.int32) for t in tensors])
    columns = xla.site_columns(indices)
    keys = xla.site_keys(columns, xla.in_grid(columns, batch_size, shape), batch_size, shape)
    keys, (owner, row) = xla.sort_keys(keys, owner, row)
    first = xla.run_starts(keys)
    start, stored = xla.nth_starts(first, out_capacity)
    out_keys = xla.gather_keys(keys, start, stored)
    out_indices = jnp.stack(xla.key_sites(out_keys, batch_size, shape), axis=1)
    # A site's run of sorted entries holds one entry per tensor that has it (sites are unique
    # within a tensor): read each output's run with gathers (a TPU serializes scatters).
    n = keys[0].shape[0]
    rows = [jnp.full((out_capacity,), -1, jnp.int32) for _ in tensors]
    for j in range(len(tensors) if n else 0):
        at = jnp.minimum(start + j, n - 1)
        same = functools.reduce(jnp.logical_and, [xla.take(k, at) == o for k, o in zip(keys, out_keys)],
                                stored & (start + j < n))
        at_owner, at_row = xla.take(owner, at), xla.take(row, at)
        rows = [jnp.where(same & (at_owner == t), at_row, r) for t, r in enumerate(rows)]
    return out_indices, jnp.stack(rows), jnp.sum(first, dtype=jnp.int32)


def _combined(tensors, out_capacity: int | None, what: str, combine) -> SparseConvTensor:
    """``combine`` (a list of ``[rows, C_t]`` feature arrays -> ``[rows, C]``) of the tensors'
    features, aligned on one set of rows.

    Tensors that share their ``indices`` array (a residual branch, the output of an
    inverse conv and its skip connection) are aligned as they are. Otherwise the rows
    are the sorted union of the sites, with zeros where a tensor has no site; each block
    of rows is gathered and combined in turn (``xla.in_row_blocks``: a TPU would pad
    every gathered ``[rows, C_t]`` array to 128 lanes).
    """
    _check_compatible(tensors)
    first = tensors[0]
    indice_dict = {k: v for t in reversed(tensors) for k, v in t.indice_dict.items()}
    overflow = functools.reduce(merge_overflow, [t.overflow for t in tensors])
    if all(t.indices is first.indices for t in tensors) and out_capacity in (None, first.capacity):
        features, indices = combine([t.features for t in tensors]), first.indices
    else:
        # Rulebooks that start or end on an input's sites no longer fit the new rows.
        inputs = [t.indices for t in tensors]
        indice_dict = {k: r for k, r in indice_dict.items()
                       if not any(r.in_indices is i or r.out_indices is i for i in inputs)}
        out_capacity = sum(t.capacity for t in tensors) if out_capacity is None else int(out_capacity)
        indices, rows, needed = _union_rows(tensors, out_capacity)
        union_overflow = overflow_record(needed, out_capacity)
        if is_concrete(union_overflow):
            raise_if_overflow(union_overflow, what)
        overflow = merge_overflow(overflow, union_overflow)
        tables = [t.features for t in tensors]
        features = xla.in_row_blocks(
            lambda rows: combine([xla.gather_rows(table, r) for table, r in zip(tables, rows)]), rows, *tables)
    frame = SparseConvTensor(jnp.zeros((indices.shape[0], 0), features.dtype), indices, first.spatial_shape,
                             first.batch_size, indice_dict, overflow, validate=False)
    return frame.replace_feature(features)


def sparse_add(*tensors: SparseConvTensor, out_capacity: int | None = None) -> SparseConvTensor:
    """Sum of tensors with the same channels (spconv's ``Fsp.sparse_add``).

    Tensors sharing one ``indices`` array (the usual residual connection) add row by
    row and keep those rows. Otherwise the result lives on the union of the sites, in
    sorted ``(batch, coords)`` order, with capacity ``out_capacity`` (default: the sum of
    the input capacities, which cannot overflow); a site missing from a tensor counts
    as zero there. ``indice_dict`` entries of all inputs are kept (the first wins), except,
    on the union path, rulebooks that start or end on an input's sites.

    "Sharing" means the very same array: inside one traced function a residual branch
    shares its input's ``indices``, but two tensors passed to ``jit`` as separate
    arguments do not, and take the union path (same sites, sorted rows, larger capacity).
    """
    def add(features):
        if len({f.shape[1] for f in features}) > 1:
            raise ValueError(f"sparse_add needs equal channel counts, got {[f.shape[1] for f in features]}")
        return functools.reduce(jnp.add, features)
    return _combined(tensors, out_capacity, "sparse_add", add)


def sparse_cat(*tensors: SparseConvTensor, out_capacity: int | None = None) -> SparseConvTensor:
    """Channel concatenation (``[.., C1 + C2 + ...]``), aligned as in ``sparse_add``.

    The usual use is a U-Net skip connection: ``sparse_cat(inverse_conv_output, skip)``.
    """
    def concatenate(features):
        dtype = jnp.result_type(*features)
        return jnp.concatenate([f.astype(dtype) for f in features], axis=1)
    return _combined(tensors, out_capacity, "sparse_cat", concatenate)
