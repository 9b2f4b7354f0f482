"""Pure-JAX backend: runs on every platform (CPU, GPU, TPU) and is the reference.

Rulebooks are built by sorting, not hashing: sites are compared as tuples of int32
columns ``(batch, *coords)``, so no linearised key can overflow whatever the grid size.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_sparseconv._vma import vary_like
from jax_sparseconv.geometry import REGULAR, SUBM, ConvGeometry

_SENTINEL = np.iinfo(np.int32).max  # batch index of invalid sites: sorts after every real site


def output_sites(indices: jax.Array, geometry: ConvGeometry):
    """Sites reached from every input row through every kernel offset.

    Returns ``(sites [N, K, ndim + 1] int32, valid [N, K] bool)``; see geometry.py for the
    mapping. Invalid entries (padding rows, off-grid, between strides) are arbitrary.
    """
    g = geometry
    offsets = jnp.asarray(g.offsets())[None]  # [1, K, ndim]
    coords = indices[:, None, 1:]  # [N, 1, ndim]
    kernel, strides, padding, dilation, out_shape = (
        jnp.asarray(v, jnp.int32) for v in (g.kernel_size, g.strides, g.padding, g.dilation, g.out_shape))
    valid = indices[:, None, :1] >= 0  # [N, 1, 1], broadcast below
    if g.mode == SUBM:
        out = coords - (offsets - kernel // 2) * dilation
    elif g.mode == REGULAR:
        t = coords + padding - offsets * dilation
        valid = valid & (t >= 0) & (t % strides == 0)
        out = t // strides
    else:
        out = coords * strides - padding + offsets * dilation
    valid = jnp.all(valid & (out >= 0) & (out < out_shape), axis=-1)
    batch = jnp.broadcast_to(indices[:, None, :1], out.shape[:2] + (1,))
    return jnp.concatenate([batch, out], axis=-1), valid


def _columns(sites: jax.Array, valid: jax.Array) -> tuple[jax.Array, ...]:
    """Sort-key columns of ``sites [..., ndim + 1]``; invalid sites sort last."""
    batch = jnp.where(valid, sites[..., 0], _SENTINEL)
    return (batch,) + tuple(sites[..., d] for d in range(1, sites.shape[-1]))


def _lex_less(a: tuple, b: tuple) -> jax.Array:
    less = jnp.zeros(a[0].shape, bool)
    equal = jnp.ones(a[0].shape, bool)
    for x, y in zip(a, b):
        less = less | (equal & (x < y))
        equal = equal & (x == y)
    return less


def _lookup(table: tuple, rows: jax.Array, queries: tuple) -> jax.Array:
    """Row of each query site in a sorted table of columns, or -1 (binary search)."""
    n = table[0].shape[0]
    if n == 0:
        return jnp.full(queries[0].shape, -1, jnp.int32)
    # Loop carries vary over the mesh axes of what they search (shard_map).
    lo = vary_like(jnp.zeros(queries[0].shape, jnp.int32), *table, *queries)
    hi = vary_like(jnp.full(queries[0].shape, n, jnp.int32), *table, *queries)

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        go_right = _lex_less(tuple(col[mid] for col in table), queries) & (lo < hi)
        return jnp.where(go_right, mid + 1, lo), jnp.where(go_right | (lo >= hi), hi, mid)

    lo, _ = lax.fori_loop(0, max(1, math.ceil(math.log2(n + 1))) + 1, step, (lo, hi))
    at = jnp.minimum(lo, n - 1)
    found = (lo < n) & jnp.all(jnp.stack([col[at] == q for col, q in zip(table, queries)]), axis=0)
    return jnp.where(found, rows[at], -1)


def sort_site_runs(sites: jax.Array, valid: jax.Array, *payloads: jax.Array, stable: bool = False):
    """Sorts ``sites [n, D]`` (int32) as tuples of columns and groups equal sites into runs.

    Invalid sites sort last and belong to no run. Returns, in sorted order,
    ``(sites, valid, payloads, first, rank)``: ``first`` marks the first row of each run,
    ``rank`` numbers the runs 0, 1, ... (for every row, that of the last run begun). The
    rulebook builder, ``sparse_add``'s union and ``voxelize`` all group sites this way.
    """
    num_keys = sites.shape[1]
    *columns, = lax.sort(_columns(sites, valid) + payloads, num_keys=num_keys, is_stable=stable)
    columns, payloads = columns[:num_keys], tuple(columns[num_keys:])
    valid = columns[0] != _SENTINEL
    differs = jnp.any(jnp.stack([c[1:] != c[:-1] for c in columns]), axis=0)
    first = valid & jnp.concatenate([jnp.ones((min(sites.shape[0], 1),), bool), differs])
    rank = jnp.cumsum(first, dtype=jnp.int32) - 1
    return jnp.stack(columns, axis=1), valid, payloads, first, rank


# Each entry point is jitted so that eager calls (a Flax ``init``, a notebook) run as one
# compiled computation instead of op by op; inside an outer ``jit`` this changes nothing.

@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def build_rulebook(indices, geometry: ConvGeometry, batch_size: int, out_capacity: int):
    """Returns ``(out_indices, out_nbr, in_nbr, needed)``; see rulebook.py."""
    del batch_size  # sites are compared as tuples, so the batch size never matters
    n, K = indices.shape[0], geometry.kernel_volume
    sites, valid = output_sites(indices, geometry)
    if geometry.mode == SUBM:
        *table, rows = lax.sort(_columns(indices, indices[:, 0] >= 0) + (jnp.arange(n, dtype=jnp.int32),),
                                num_keys=geometry.ndim + 1)
        in_nbr = jnp.where(valid, _lookup(tuple(table), rows, _columns(sites, valid)), -1)
        needed = jnp.sum(indices[:, 0] >= 0, dtype=jnp.int32)
        return indices, in_nbr[:, ::-1], in_nbr, needed

    # Sort every (input, offset) pair by the site it reaches; runs of equal sites are
    # one output row each, numbered in sorted order.
    flat_sites, flat_valid = sites.reshape(n * K, geometry.ndim + 1), valid.reshape(n * K)
    sorted_sites, is_valid, (pair,), first, rank = sort_site_runs(flat_sites, flat_valid,
                                                                  jnp.arange(n * K, dtype=jnp.int32))
    needed = jnp.sum(first, dtype=jnp.int32)
    stored = is_valid & (rank < out_capacity)
    drop = jnp.where(stored, rank, out_capacity)  # out of range: dropped by the scatters

    out_indices = jnp.full((out_capacity, geometry.ndim + 1), -1, jnp.int32)
    out_indices = out_indices.at[jnp.where(first, drop, out_capacity)].set(sorted_sites, mode="drop")
    out_nbr = jnp.full((out_capacity, K), -1, jnp.int32).at[drop, pair % K].set(pair // K, mode="drop")
    in_nbr = jnp.full((n * K,), -1, jnp.int32).at[pair].set(jnp.where(stored, rank, -1), unique_indices=True)
    return out_indices, out_nbr, in_nbr.reshape(n, K), needed


# ---- feature kernels ---------------------------------------------------------------

def accumulator(dtype) -> jnp.dtype:
    """float32 accumulation for half types, the input type for float32/float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _gather_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """``x[rows]`` with zeros where ``rows == -1``."""
    if x.shape[0] == 0:  # nothing to gather from (an empty tensor): every entry is -1
        return jnp.zeros(rows.shape + x.shape[1:], x.dtype)
    safe = jnp.where(rows >= 0, rows, 0)
    return jnp.where((rows >= 0)[..., None], x[safe], 0)


@functools.partial(jax.jit, static_argnums=3)
def gather_matmul(x: jax.Array, w: jax.Array, nbr: jax.Array, precision=None) -> jax.Array:
    """``out[r] = sum_k x[nbr[r, k]] @ w[k]``: ``x [N, Cin]``, ``w [K, Cin, Cout]``, ``nbr [M, K]``.

    Conv forward (with out_nbr) and its input gradient (with in_nbr and w transposed).
    Returns ``[M, Cout]`` in the accumulation dtype; ``precision`` as in ``jnp.matmul``.
    """
    acc = accumulator(x.dtype)

    def step(k, out):
        rows = lax.dynamic_index_in_dim(nbr, k, axis=1, keepdims=False)
        return out + jnp.matmul(_gather_rows(x, rows), w[k], precision=precision, preferred_element_type=acc)

    return lax.fori_loop(0, w.shape[0], step, vary_like(jnp.zeros((nbr.shape[0], w.shape[2]), acc), x, w, nbr))


@functools.partial(jax.jit, static_argnums=3)
def gather_matmul_grad(x: jax.Array, g: jax.Array, nbr: jax.Array, precision=None) -> jax.Array:
    """``dw[k] = sum_r x[nbr[r, k]]^T @ g[r]``: the kernel gradient, ``[K, Cin, Cout]``."""
    acc = accumulator(x.dtype)

    def one_offset(rows):
        return jnp.matmul(_gather_rows(x, rows).T, g, precision=precision, preferred_element_type=acc)

    return lax.map(one_offset, nbr.T)


@jax.jit
def gather_sum(x: jax.Array, nbr: jax.Array) -> jax.Array:
    """``out[r] = sum_k x[nbr[r, k]]``, ``[M, C]`` in the accumulation dtype."""
    acc = accumulator(x.dtype)

    def step(k, out):
        return out + _gather_rows(x, lax.dynamic_index_in_dim(nbr, k, axis=1, keepdims=False)).astype(acc)

    return lax.fori_loop(0, nbr.shape[1], step, vary_like(jnp.zeros((nbr.shape[0], x.shape[1]), acc), x, nbr))


@jax.jit
def gather_max(x: jax.Array, nbr: jax.Array):
    """Max over neighbours: ``(out [M, C], argk [M, C] int32)``.

    ``argk`` is the first offset attaining the max (``-1`` and ``out = 0`` with no neighbour).
    """
    def step(k, carry):
        best, argk = carry
        rows = lax.dynamic_index_in_dim(nbr, k, axis=1, keepdims=False)
        value = _gather_rows(x, rows)
        better = (rows >= 0)[:, None] & ((argk < 0) | (value > best))
        return jnp.where(better, value, best), jnp.where(better, k, argk)

    init = (jnp.zeros((nbr.shape[0], x.shape[1]), x.dtype), jnp.full((nbr.shape[0], x.shape[1]), -1, jnp.int32))
    return lax.fori_loop(0, nbr.shape[1], step, tuple(vary_like(v, x, nbr) for v in init))


@jax.jit
def gather_max_grad(g: jax.Array, argk: jax.Array, in_nbr: jax.Array) -> jax.Array:
    """Input gradient of ``gather_max``: ``dx[i] = sum_k g[o] where argk[o] == k, o = in_nbr[i, k]``."""
    def step(k, dx):
        rows = lax.dynamic_index_in_dim(in_nbr, k, axis=1, keepdims=False)
        won = _gather_rows(argk, rows) == k
        return dx + jnp.where(won & (rows >= 0)[:, None], _gather_rows(g, rows), 0)

    init = vary_like(jnp.zeros((in_nbr.shape[0], g.shape[1]), g.dtype), g, argk, in_nbr)
    return lax.fori_loop(0, in_nbr.shape[1], step, init)
