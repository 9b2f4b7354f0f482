"""Pure-JAX backend: runs on every platform (CPU, GPU, TPU) and is the reference.

Written for accelerators, where sorts are costly to compile and scatters serialize:

- Sites are compared by one int32 key, ``(batch, *coords)`` packed row-major over
  ``(batch_size, *grid)``, whenever that is below int32's largest value (the key of
  invalid sites, which sort last). Larger grids compare the columns as tuples: the same
  order, so the same rulebooks. ``site_keys`` makes either form.
- A rulebook sorts at most twice: the input sites (not at all when they are the sorted
  output sites of an earlier rulebook, ``presorted``) and, for regular and transposed
  convolutions, the sites the inputs reach. Everything else is binary searches, that is
  gathers; no scatter.
- Neighbour maps are offset-leading (``[K, N]``, see rulebook.py): a TPU pads an
  array's minor dimension to 128, which ``[N, K]`` would pay 128 / K times over.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_sparseconv._vma import vary_like
from jax_sparseconv.geometry import SUBM, TRANSPOSED, ConvGeometry

SENTINEL = np.iinfo(np.int32).max  # first key of invalid sites: sorts after every real site


# ---- site keys --------------------------------------------------------------------------

def packs(batch_size: int, shape) -> bool:
    """Whether sites of ``(batch_size, *shape)`` pack into one int32 key below the sentinel."""
    return batch_size * math.prod(shape) < SENTINEL


def site_keys(columns: tuple, valid: jax.Array, batch_size: int, shape) -> tuple[jax.Array, ...]:
    """Sort keys of sites given as columns ``(batch, *coords)`` (int32, any equal shapes).

    One packed key where ``packs``, else the columns with the batch as first key; invalid
    sites get the sentinel as first key. Keys order sites as ``(batch, *coords)`` tuples.
    """
    if packs(batch_size, shape):
        key = columns[0]
        for column, size in zip(columns[1:], shape):
            key = key * size + column
        return (jnp.where(valid, key, SENTINEL),)
    return (jnp.where(valid, columns[0], SENTINEL),) + tuple(columns[1:])


def key_sites(keys: tuple, batch_size: int, shape) -> tuple[jax.Array, ...]:
    """The columns ``(batch, *coords)`` of ``site_keys``' keys; ``-1`` for invalid ones."""
    valid = keys[0] != SENTINEL
    if packs(batch_size, shape):
        key, coords = keys[0], []
        for size in reversed(shape):
            coords.append(lax.rem(key, np.int32(size)))  # keys of valid sites are >= 0
            key = lax.div(key, np.int32(size))
        keys = (key, *reversed(coords))
    return tuple(jnp.where(valid, column, -1) for column in keys)


def in_grid(columns: tuple, batch_size: int, shape) -> jax.Array:
    """Sites inside ``(batch_size, *shape)`` (padding rows have batch ``-1``: outside)."""
    inside = (columns[0] >= 0) & (columns[0] < batch_size)
    for column, size in zip(columns[1:], shape):
        inside = inside & (column >= 0) & (column < size)
    return inside


def take(array: jax.Array, rows: jax.Array) -> jax.Array:
    """``array[rows]`` for rows in range: a bare XLA gather (no wrapping of negative rows),
    which is much cheaper to compile for TPU; XLA clamps a row out of range."""
    return array.at[rows].get(mode="promise_in_bounds")


def _lex_less(a: tuple, b: tuple) -> jax.Array:
    less = jnp.zeros(a[0].shape, bool)
    equal = jnp.ones(a[0].shape, bool)
    for x, y in zip(a, b):
        less = less | (equal & (x < y))
        equal = equal & (x == y)
    return less


def lower_bound(table: tuple, queries: tuple) -> jax.Array:
    """For each query key, the first row of the sorted key ``table`` not below it
    (``n``, the table's length, if none): a binary search of gathers, int32."""
    n = table[0].shape[0]
    # Loop carries vary over the mesh axes of what they search (shard_map).
    lo = vary_like(jnp.zeros(queries[0].shape, jnp.int32), *table, *queries)
    if n == 0:
        return lo
    hi = vary_like(jnp.full(queries[0].shape, n, jnp.int32), *table, *queries)

    # The answer lies in [lo, hi]; each step halves that range (when hi = lo + 1 and the
    # row lo is below the query, it is hi).
    def step(_, bounds):
        lo, hi = bounds
        mid = lax.shift_right_logical(lo + hi, np.int32(1))  # (lo + hi) // 2 without floor's sign fix-ups
        below = _lex_less(tuple(take(column, mid) for column in table), queries)
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    _, hi = lax.fori_loop(0, math.ceil(math.log2(n + 1)), step, (lo, hi))
    return hi


def find(table: tuple, queries: tuple, valid: jax.Array, rows: jax.Array | None = None) -> jax.Array:
    """Row of each valid query key in the sorted ``table`` (``rows[position]`` when given),
    or ``-1`` where it is invalid or absent."""
    n = table[0].shape[0]
    if n == 0:
        return jnp.full(queries[0].shape, -1, jnp.int32)
    at = jnp.minimum(lower_bound(table, queries), n - 1)
    found = valid
    for column, query in zip(table, queries):
        found = found & (take(column, at) == query)
    return jnp.where(found, at if rows is None else take(rows, at), -1)


def sort_keys(keys: tuple, *payloads: jax.Array, stable: bool = False):
    """``(keys, payloads)`` sorted by the keys; invalid sites last."""
    *columns, = lax.sort(keys + payloads, num_keys=len(keys), is_stable=stable)
    return tuple(columns[:len(keys)]), tuple(columns[len(keys):])


def run_starts(keys: tuple) -> jax.Array:
    """Of sorted keys: the first row of each run of equal valid keys (bool)."""
    if keys[0].shape[0] == 0:
        return jnp.zeros((0,), bool)
    differs = functools.reduce(jnp.logical_or, [column[1:] != column[:-1] for column in keys])
    return (keys[0] != SENTINEL) & jnp.concatenate([jnp.ones((1,), bool), differs])


SCAN_BLOCK = 1024


def _blocked_scan(x: jax.Array, scan, combine, fill) -> jax.Array:
    """Inclusive ``scan`` (``jnp.cumsum`` or ``lax.cummax``) of a 1-D ``x``, in rows of
    ``SCAN_BLOCK``, then across rows. The same values as one scan, but a TPU compiles a
    scan along a long axis slowly (a 1M-element cumsum: 21 s; in rows of 1024: 1 s)."""
    n = x.shape[0]
    if n <= SCAN_BLOCK:
        return scan(x, axis=0)
    rows = jnp.pad(x, (0, -n % SCAN_BLOCK), constant_values=fill).reshape(-1, SCAN_BLOCK)
    within = scan(rows, axis=1)
    through = _blocked_scan(within[:, -1], scan, combine, fill)  # inclusive, per row
    before = jnp.pad(through[:-1], (1, 0), constant_values=fill)
    return combine(within, before[:, None]).reshape(-1)[:n]


def cumsum(x: jax.Array) -> jax.Array:
    """Running sum of a 1-D int32 or bool ``x``, int32 (``jnp.cumsum`` that compiles fast for TPU)."""
    return _blocked_scan(x.astype(jnp.int32), jnp.cumsum, jnp.add, 0)


def cummax(x: jax.Array) -> jax.Array:
    """Running max of a 1-D int32 ``x`` (``lax.cummax`` that compiles fast for TPU)."""
    return _blocked_scan(x, lax.cummax, jnp.maximum, np.iinfo(np.int32).min)


def nth_starts(first: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Rows of the first ``capacity`` runs: ``(row [capacity] int32, stored [capacity] bool)``;
    rows past the last run are 0 and not stored. A search of the running count: a gather."""
    count = cumsum(first)
    wanted = jnp.arange(1, capacity + 1, dtype=jnp.int32)
    row = lower_bound((count,), (vary_like(wanted, count),))
    stored = row < first.shape[0]
    return jnp.where(stored, row, 0), stored


def gather_keys(keys: tuple, rows: jax.Array, stored: jax.Array) -> tuple[jax.Array, ...]:
    """``keys`` at ``rows``, invalid where not ``stored`` (``nth_starts``' results)."""
    if keys[0].shape[0] == 0:
        return (jnp.full(rows.shape, SENTINEL, jnp.int32),) + tuple(jnp.zeros(rows.shape, jnp.int32) for _ in keys[1:])
    return (jnp.where(stored, take(keys[0], rows), SENTINEL),) + tuple(take(column, rows) for column in keys[1:])


# ---- rulebooks ----------------------------------------------------------------------------

def divide_exactly(t: jax.Array, divisor: int) -> tuple[jax.Array, jax.Array]:
    """``(t % divisor == 0, t // divisor)`` of int32 ``t``, by truncating division: the same
    quotient wherever the division is exact (the only entries the rulebooks keep), without
    the sign fix-ups of floor division (about ten ops each)."""
    divisor = np.int32(divisor)
    return lax.rem(t, divisor) == 0, lax.div(t, divisor)


def reached_sites(columns: tuple, valid: jax.Array, geometry: ConvGeometry, forward: bool = True):
    """Sites reached through every kernel offset from sites ``columns`` (``(batch, *coords)``,
    each ``[N]`` int32): output sites of input sites (``forward``), or the input sites that
    reach output sites. Returns ``(columns, each [K, N] int32; valid [K, N] bool)``; invalid
    entries (padding, off the grid, between strides) hold arbitrary sites.
    """
    g = geometry
    if g.mode == SUBM:  # o = i - (k - kernel // 2) * dilation: a stride-1 regular conv
        strides, padding = (1,) * g.ndim, tuple(k // 2 * d for k, d in zip(g.kernel_size, g.dilation))
    else:
        strides, padding = g.strides, g.padding
    # Regular (and subm): o * s = i + p - k * d; transposed: o = i * s - p + k * d.
    divide = (g.mode != TRANSPOSED) == forward
    target = g.out_shape if forward else g.in_shape
    shifts = g.offsets() * np.asarray(g.dilation, np.int32)  # [K, ndim]
    ok = valid[None]
    out = []
    for d in range(g.ndim):
        c, shift = columns[d + 1][None], jnp.asarray(shifts[:, d, None])
        if divide:
            t = c + padding[d] - shift
            if strides[d] > 1:
                exact, t = divide_exactly(t, strides[d])
                ok = ok & exact
        else:
            t = c * strides[d] - padding[d] + shift
        ok = ok & (t >= 0) & (t < target[d])
        out.append(t)
    batch = jnp.broadcast_to(columns[0][None], ok.shape)
    return (batch, *out), ok


def strided_reached_keys(columns: tuple, valid: jax.Array, geometry: ConvGeometry, batch_size: int):
    """Keys of the output sites that a regular conv's input sites reach, ``[slots, N]``
    (``slots = max_outputs_per_input()``, the rest invalid), where ``reached_sites`` gives
    ``[K, N]``: along each dim only every ``stride / gcd(stride, dilation)``-th offset
    reaches a site, so the sort of the reached sites sorts ``slots * N`` keys, not ``K * N``
    (8 of 27 for a 3^3 kernel of stride 2, 1 of 8 for 2^3). Selects only, no scatter."""
    g = geometry
    per_dim = []  # per dim, per slot: (output coordinate, reached) of the slot-th offset that reaches one
    for d, slots in enumerate(g.reaching_offsets()):
        stride, size, dilation = g.strides[d], g.kernel_size[d], g.dilation[d]
        found = [(jnp.zeros_like(columns[d + 1]), jnp.zeros(valid.shape, bool)) for _ in range(slots)]
        count = jnp.zeros(valid.shape, jnp.int32)
        for offset in range(size):
            t = columns[d + 1] + g.padding[d] - offset * dilation
            exact, reached = divide_exactly(t, stride)
            reaches = exact & (t >= 0) & (reached < g.out_shape[d])
            for slot in range(slots):
                take = reaches & (count == slot)
                found[slot] = (jnp.where(take, reached, found[slot][0]), found[slot][1] | take)
            count = count + reaches
        per_dim.append(found)
    keys = []
    for combination in itertools.product(*per_dim):
        reached = functools.reduce(jnp.logical_and, [ok for _, ok in combination], valid)
        keys.append(site_keys((columns[0], *[t for t, _ in combination]), reached, batch_size, g.out_shape))
    return tuple(jnp.stack(column) for column in zip(*keys))


def site_columns(indices: jax.Array) -> tuple[jax.Array, ...]:
    """The columns ``(batch, *coords)`` of ``indices [N, ndim + 1]``."""
    return tuple(indices[:, d] for d in range(indices.shape[1]))


def _site_table(indices, batch_size: int, shape, presorted: bool):
    """The sites of ``indices`` as sorted keys, and the row each key came from (None: the
    rows are in order already, ``presorted``)."""
    columns = site_columns(indices)
    keys = site_keys(columns, in_grid(columns, batch_size, shape), batch_size, shape)
    if presorted:
        return keys, None
    keys, (rows,) = sort_keys(keys, jnp.arange(indices.shape[0], dtype=jnp.int32))
    return keys, rows


# Each entry point is jitted so that eager calls (a Flax ``init``, a notebook) run as one
# compiled computation instead of op by op; inside an outer ``jit`` this changes nothing.

@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def build_rulebook(indices, geometry: ConvGeometry, batch_size: int, out_capacity: int, presorted: bool = False):
    """Returns ``(out_indices, out_nbr, in_nbr, needed)``; see rulebook.py. ``presorted``:
    the active rows of ``indices`` are in sorted ``(batch, coords)`` order, padding last
    (the output sites of a regular or transposed rulebook), so they need no sort."""
    g = geometry
    table, rows = _site_table(indices, batch_size, g.in_shape, presorted)
    columns = site_columns(indices)
    reached, reached_ok = reached_sites(columns, in_grid(columns, batch_size, g.in_shape), g)  # [K, n]
    if g.mode == SUBM:
        in_nbr = find(table, site_keys(reached, reached_ok, batch_size, g.out_shape), reached_ok, rows)
        return indices, in_nbr[::-1], in_nbr, jnp.sum(indices[:, 0] >= 0, dtype=jnp.int32)

    # Output rows: the distinct reached sites in sorted order, the first out_capacity stored.
    reached_keys = site_keys(reached, reached_ok, batch_size, g.out_shape)
    if g.mode == TRANSPOSED:
        to_sort = reached_keys
    else:
        to_sort = strided_reached_keys(columns, in_grid(columns, batch_size, g.in_shape), g, batch_size)
    candidates, () = sort_keys(tuple(key.reshape(-1) for key in to_sort))
    first = run_starts(candidates)
    out_keys = gather_keys(candidates, *nth_starts(first, out_capacity))
    out_columns = key_sites(out_keys, batch_size, g.out_shape)

    in_nbr = find(out_keys, reached_keys, reached_ok)
    sources, sources_ok = reached_sites(out_columns, out_columns[0] >= 0, g, forward=False)  # [K, out_capacity]
    out_nbr = find(table, site_keys(sources, sources_ok, batch_size, g.in_shape), sources_ok, rows)
    return jnp.stack(out_columns, axis=1), out_nbr, in_nbr, jnp.sum(first, dtype=jnp.int32)


# ---- feature kernels ---------------------------------------------------------------

def accumulator(dtype) -> jnp.dtype:
    """float32 accumulation for half types, the input type for float32/float64."""
    return jnp.promote_types(dtype, jnp.float32)


def gather_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """``x[rows]`` with zeros where ``rows == -1``."""
    if x.shape[0] == 0:  # nothing to gather from (an empty tensor): every entry is -1
        return jnp.zeros(rows.shape + x.shape[1:], x.dtype)
    safe = jnp.where(rows >= 0, rows, 0)
    return jnp.where((rows >= 0)[..., None], take(x, safe), 0)


# The loops over kernel offsets read one row of the offset-leading neighbour map per step.

def _offset_rows(nbr: jax.Array, k) -> jax.Array:
    return lax.dynamic_index_in_dim(nbr, k, axis=0, keepdims=False)


@functools.partial(jax.jit, static_argnums=3)
def gather_matmul(x: jax.Array, w: jax.Array, nbr: jax.Array, precision=None) -> jax.Array:
    """``out[r] = sum_k x[nbr[k, r]] @ w[k]``: ``x [N, Cin]``, ``w [K, Cin, Cout]``, ``nbr [K, M]``.

    The conv forward (with out_nbr).
    Returns ``[M, Cout]`` in the accumulation dtype; ``precision`` as in ``jnp.matmul``.
    """
    acc = accumulator(x.dtype)

    def step(k, out):
        return out + jnp.matmul(gather_rows(x, _offset_rows(nbr, k)), w[k], precision=precision,
                                preferred_element_type=acc)

    return lax.fori_loop(0, w.shape[0], step, vary_like(jnp.zeros((nbr.shape[1], w.shape[2]), acc), x, w, nbr))


@functools.partial(jax.jit, static_argnums=4)
def conv_backward(x: jax.Array, w: jax.Array, g: jax.Array, in_nbr: jax.Array, precision=None):
    """Gradients of ``out[r] = sum_k x[out_nbr[k, r]] @ w[k]`` from its cotangent ``g [M, Cout]``,
    read through the transposed map ``in_nbr [K, N]`` (see rulebook.py):
    ``dx[i] = sum_k g[in_nbr[k, i]] @ w[k]^T`` and ``dw[k] = x^T @ g[in_nbr[k]]``, so one gather
    of ``g`` per offset serves both. Returns ``(dx [N, Cin], dw [K, Cin, Cout])`` in the
    accumulation dtype; ``precision`` as in ``jnp.matmul``.
    """
    acc = accumulator(x.dtype)
    # dw contracts every row of x: rows that feed no output (padding) must not bring NaNs.
    x = jnp.where(jnp.any(in_nbr >= 0, axis=0)[:, None], x, 0)

    def step(dx, offset):
        rows, w_k = offset
        gathered = gather_rows(g, rows)
        dx = dx + jnp.matmul(gathered, w_k.T, precision=precision, preferred_element_type=acc)
        dw_k = lax.dot_general(x, gathered, (((0,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=acc)
        return dx, dw_k

    dx = vary_like(jnp.zeros((in_nbr.shape[1], w.shape[1]), acc), x, w, g, in_nbr)
    return lax.scan(step, dx, (in_nbr, w))


ROW_BLOCK = 16384


def in_row_blocks(compute, nbr: jax.Array, *operands: jax.Array):
    """``compute(nbr)`` (arrays of ``[M, ...]``, one row per column of ``nbr [K, M]``), run
    on blocks of ``ROW_BLOCK`` columns and written into its results block by block. The
    same values, but a TPU, which pads ``[M, C]`` arrays to 128 lanes, keeps the gathered
    rows and loop carries of one block at a time (pools and the union of ``sparse_add``
    at 131k rows and 32 channels: 190-390 MiB of temp memory -> 7-10 MiB).
    ``operands``: the arrays ``compute`` reads (their mesh axes, under ``shard_map``). The
    last block starts at ``M - ROW_BLOCK`` (recomputing rows of the one before: the same
    values)."""
    m = nbr.shape[1]
    if m <= ROW_BLOCK:
        return compute(nbr)

    def block(b, results):
        start = jnp.minimum(b * ROW_BLOCK, m - ROW_BLOCK)
        parts = compute(lax.dynamic_slice_in_dim(nbr, start, ROW_BLOCK, axis=1))
        return jax.tree.map(lambda result, part: lax.dynamic_update_slice_in_dim(result, part, start, axis=0),
                            results, parts)

    shapes = jax.eval_shape(compute, jax.ShapeDtypeStruct((nbr.shape[0], ROW_BLOCK), nbr.dtype))
    init = jax.tree.map(lambda s: vary_like(jnp.zeros((m,) + s.shape[1:], s.dtype), nbr, *operands), shapes)
    return lax.fori_loop(0, -(-m // ROW_BLOCK), block, init)


@jax.jit
def gather_sum(x: jax.Array, nbr: jax.Array) -> jax.Array:
    """``out[r] = sum_k x[nbr[k, r]]``, ``[M, C]`` in the accumulation dtype."""
    acc = accumulator(x.dtype)

    def rows_of(nbr):
        def step(k, out):
            return out + gather_rows(x, _offset_rows(nbr, k)).astype(acc)

        return lax.fori_loop(0, nbr.shape[0], step, vary_like(jnp.zeros((nbr.shape[1], x.shape[1]), acc), x, nbr))

    return in_row_blocks(rows_of, nbr, x)


def offset_index_dtype(num_offsets: int):
    """dtype of per-entry kernel offsets (a max pool's ``argk``): int8 where the kernel
    volume fits, else int32. Pools keep ``argk [M, C]`` for their backward pass, which a
    TPU pads to 128 lanes like any ``[M, C]`` array: int32 would take 4x the memory."""
    return jnp.int8 if num_offsets <= np.iinfo(np.int8).max else jnp.int32


@jax.jit
def gather_max(x: jax.Array, nbr: jax.Array):
    """Max over neighbours: ``(out [M, C], argk [M, C] offset_index_dtype(K))``.

    ``argk`` is the first offset attaining the max (``-1`` and ``out = 0`` with no neighbour).
    """
    index_dtype = offset_index_dtype(nbr.shape[0])

    def rows_of(nbr):
        def step(k, carry):
            best, argk = carry
            rows = _offset_rows(nbr, k)
            value = gather_rows(x, rows)
            better = (rows >= 0)[:, None] & ((argk < 0) | (value > best))
            return jnp.where(better, value, best), jnp.where(better, k.astype(index_dtype), argk)

        init = (jnp.zeros((nbr.shape[1], x.shape[1]), x.dtype), jnp.full((nbr.shape[1], x.shape[1]), -1, index_dtype))
        return lax.fori_loop(0, nbr.shape[0], step, tuple(vary_like(v, x, nbr) for v in init))

    return in_row_blocks(rows_of, nbr, x)


@jax.jit
def gather_max_grad(g: jax.Array, argk: jax.Array, in_nbr: jax.Array) -> jax.Array:
    """Input gradient of ``gather_max``: ``dx[i] = sum_k g[o] where argk[o] == k, o = in_nbr[k, i]``."""
    def rows_of(in_nbr):
        def step(k, dx):
            rows = _offset_rows(in_nbr, k)
            won = gather_rows(argk, rows) == k
            return dx + jnp.where(won & (rows >= 0)[:, None], gather_rows(g, rows), 0)

        init = vary_like(jnp.zeros((in_nbr.shape[1], g.shape[1]), g.dtype), g, argk, in_nbr)
        return lax.fori_loop(0, in_nbr.shape[0], step, init)

    return in_row_blocks(rows_of, in_nbr, g, argk)
