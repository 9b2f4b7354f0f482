"""SparseConvTensor: active sites of a batched voxel grid, padded to a capacity."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_sparseconv.geometry import MAX_NDIM


class CapacityOverflowError(ValueError):
    """An op produced more active rows than its static capacity holds."""


def is_concrete(*arrays) -> bool:
    """True when no array is a tracer, so values can be read on the host."""
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def no_overflow() -> jax.Array:
    """The overflow record of a tensor that lost nothing: ``[needed, capacity] = [0, 0]``."""
    return jnp.zeros((2,), jnp.int32)


def merge_overflow(first: jax.Array, second: jax.Array) -> jax.Array:
    """Keeps the earliest overflow record of two (a record is ``[needed, capacity]``)."""
    return jnp.where(first[..., :1] > 0, first, second)


def overflow_record(needed, capacity: int) -> jax.Array:
    """``[needed, capacity]`` if ``needed > capacity``, else zeros."""
    needed = jnp.asarray(needed, jnp.int32)
    record = jnp.stack([needed, jnp.full_like(needed, capacity)], axis=-1)
    return jnp.where((needed > capacity)[..., None], record, 0)


def _set_records(record) -> np.ndarray:
    """The set rows ``[needed, capacity]`` of concrete overflow record(s)."""
    record = np.asarray(record).reshape(-1, 2)
    return record[record[:, 0] > 0]


def overflowed(record) -> bool:
    """True if a concrete overflow record (or any of a stack of them) is set."""
    return len(_set_records(record)) > 0


def raise_if_overflow(record, what: str = "an op") -> None:
    """Raises CapacityOverflowError if a concrete overflow record is set."""
    bad = _set_records(record)
    if len(bad):
        needed, capacity = int(bad[:, 0].max()), int(bad[0, 1])
        raise CapacityOverflowError(
            f"{what} needed {needed} active rows but its capacity is {capacity}; "
            f"pass out_capacity >= {needed} (or a larger capacity bucket)")


def check_overflow(tree: Any) -> None:
    """Raises CapacityOverflowError if any SparseConvTensor in ``tree`` overflowed.

    Call it on the host after a jitted step that returns SparseConvTensors (anywhere in
    a pytree; other leaves are ignored): under ``jit`` an overflow cannot raise inside
    the computation, so it travels as data (``tensor.overflow``) until this check.
    """
    for leaf in _sparse_tensors(tree):
        raise_if_overflow(jax.device_get(leaf.overflow), "a sparse op")


def checkify_overflow(tree: Any) -> None:
    """``jax.experimental.checkify`` checks that no SparseConvTensor in ``tree`` overflowed.

    Under ``checkify.checkify`` (a jitted training step, say), ``err.throw()`` after the
    step raises with the capacity and the number of rows needed, instead of letting
    training go on with truncated data. Without ``checkify`` it does nothing (a
    ``debug_check``), so a step can call it unconditionally.
    """
    from jax.experimental import checkify

    for leaf in _sparse_tensors(tree):
        needed, capacity = leaf.overflow[..., 0], leaf.overflow[..., 1]
        checkify.debug_check(jnp.all(needed == 0), "a sparse op needed {needed} active rows but its capacity is "
                             "{capacity}; pass a larger out_capacity", needed=jnp.max(needed), capacity=jnp.max(capacity))


def _sparse_tensors(tree: Any) -> list:
    """The SparseConvTensors in a pytree (other leaves are skipped)."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, SparseConvTensor))
    return [leaf for leaf in leaves if isinstance(leaf, SparseConvTensor)]


@jax.tree_util.register_pytree_node_class
class SparseConvTensor:
    """Sparse features on a batch of voxel grids (spconv's ``SparseConvTensor``).

    Args:
      features: ``[capacity, C]`` float array, one row per site.
      indices: ``[capacity, ndim + 1]`` int32: batch index, then the coordinates in the
        order of ``spatial_shape``. Rows with batch index ``-1`` (any negative value)
        are padding: they contribute nothing and every op leaves their features zero.
      spatial_shape: static grid shape, ``ndim`` ints (1 to 4 dims).
      batch_size: static number of grids in the batch.
      indice_dict: rulebooks cached by ``indice_key`` (filled by the ops).
      overflow: int32 ``[2]`` record ``[needed, capacity]`` of the first op whose
        output did not fit (zeros if none); see ``check_overflow``.
      validate: check the inputs (shapes and dtypes always; values too when they are
        concrete, that is outside ``jit``). Under ``jit`` valid sites are the caller's
        promise; the ``ffi`` backend still rejects out-of-range and duplicate sites
        with an error when it builds a rulebook.
    """

    def __init__(self, features, indices, spatial_shape: Sequence[int], batch_size: int,
                 indice_dict: dict | None = None, overflow=None, *, validate: bool = True):
        self.features = features
        self.indices = indices
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        self.batch_size = int(batch_size)
        self.indice_dict = dict(indice_dict or {})
        self.overflow = no_overflow() if overflow is None else overflow
        if validate:
            self._validate()
            self.features, self.indices = jnp.asarray(features), jnp.asarray(indices)

    # ---- pytree -----------------------------------------------------------------
    def tree_flatten(self):
        children = (self.features, self.indices, self.indice_dict, self.overflow)
        return children, (self.spatial_shape, self.batch_size)

    @classmethod
    def tree_unflatten(cls, aux, children):
        features, indices, indice_dict, overflow = children
        return cls(features, indices, aux[0], aux[1], indice_dict, overflow, validate=False)

    # ---- properties -------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Rows, active and padding (static)."""
        return self.indices.shape[-2]

    @property
    def ndim(self) -> int:
        """Spatial dimensions, ``len(spatial_shape)``."""
        return len(self.spatial_shape)

    @property
    def num_channels(self) -> int:
        """Feature channels ``C``."""
        return self.features.shape[-1]

    @property
    def active(self) -> jax.Array:
        """``[capacity]`` bool, True for active (non-padding) rows."""
        return self.indices[..., 0] >= 0

    @property
    def num_active(self) -> jax.Array:
        """Traced int32 count of active rows."""
        return jnp.sum(self.active, axis=-1, dtype=jnp.int32)

    def __repr__(self) -> str:
        return (f"SparseConvTensor(features={getattr(self.features, 'shape', '?')} "
                f"{getattr(self.features, 'dtype', '')}, spatial_shape={self.spatial_shape}, "
                f"batch_size={self.batch_size}, capacity={self.capacity}, "
                f"indice_keys={sorted(self.indice_dict)})")

    # ---- construction and conversion ---------------------------------------------
    def replace_feature(self, features) -> "SparseConvTensor":
        """A tensor on the same sites with new ``[capacity, C']`` features.

        Padding rows of ``features`` are zeroed, so padding never leaks.
        """
        features = jnp.where(self.active[..., None], features, 0).astype(features.dtype)
        return SparseConvTensor(features, self.indices, self.spatial_shape, self.batch_size,
                                self.indice_dict, self.overflow, validate=False)

    def dense(self, channels_first: bool = False) -> jax.Array:
        """``[B, *spatial_shape, C]`` (or ``[B, C, *spatial_shape]``), zeros off the sites."""
        batch = jnp.where(self.active, self.indices[:, 0], self.batch_size)  # padding: dropped
        index = (batch,) + tuple(self.indices[:, d + 1] for d in range(self.ndim))
        out = jnp.zeros((self.batch_size, *self.spatial_shape, self.num_channels), self.features.dtype)
        out = out.at[index].set(self.features, mode="drop", unique_indices=True)
        if channels_first:
            out = jnp.moveaxis(out, -1, 1)
        return out

    @classmethod
    def from_dense(cls, x, capacity: int | None = None) -> "SparseConvTensor":
        """Active sites of a dense ``[B, *spatial, C]`` array (any non-zero channel).

        With ``capacity=None`` the capacity is the number of active sites (needs concrete
        ``x``). With a capacity, it works under ``jit``; sites beyond it are counted in the
        ``overflow`` record (an eager call raises).
        """
        x = jnp.asarray(x)
        if x.ndim < 3 or x.ndim > MAX_NDIM + 2:
            raise ValueError(f"from_dense expects [B, *spatial (1-4 dims), C], got shape {x.shape}")
        mask = jnp.any(x != 0, axis=-1)
        if capacity is None:
            if not is_concrete(mask):
                raise ValueError("from_dense under jit needs a static capacity")
            capacity = max(1, int(jnp.sum(mask)))
        coords = jnp.nonzero(mask, size=capacity, fill_value=-1)
        indices = jnp.stack(coords, axis=1).astype(jnp.int32)
        valid = indices[:, 0] >= 0
        indices = jnp.where(valid[:, None], indices, -1)
        features = jnp.where(valid[:, None], x[coords], 0)
        overflow = overflow_record(jnp.sum(mask, dtype=jnp.int32), capacity)
        if is_concrete(overflow):
            raise_if_overflow(overflow, "from_dense")
        return cls(features, indices, x.shape[1:-1], x.shape[0], overflow=overflow, validate=False)

    def pad_to(self, capacity: int) -> "SparseConvTensor":
        """The same sites with padding rows appended up to ``capacity``.

        Cached rulebooks are dropped, since they are tied to the old capacity.
        """
        extra = capacity - self.capacity
        if extra < 0:
            raise ValueError(f"pad_to({capacity}) is below the current capacity {self.capacity}")
        features = jnp.pad(self.features, ((0, extra), (0, 0)))
        indices = jnp.pad(self.indices, ((0, extra), (0, 0)), constant_values=-1)
        return SparseConvTensor(features, indices, self.spatial_shape, self.batch_size,
                                overflow=self.overflow, validate=False)

    # ---- checks -----------------------------------------------------------------
    def check_overflow(self) -> None:
        """Raises CapacityOverflowError if an op that made this tensor overflowed."""
        check_overflow(self)

    def _validate(self) -> None:
        f, idx = self.features, self.indices
        if not 1 <= self.ndim <= MAX_NDIM:
            raise ValueError(f"spatial_shape must have 1 to {MAX_NDIM} dims, got {self.spatial_shape}")
        if min(self.spatial_shape) < 1 or self.batch_size < 1:
            raise ValueError(f"spatial_shape and batch_size must be positive, got "
                             f"{self.spatial_shape} and {self.batch_size}")
        if getattr(f, "ndim", None) != 2:
            raise ValueError(f"features must be [capacity, C], got shape {getattr(f, 'shape', None)}")
        if not jnp.issubdtype(getattr(f, "dtype", None), jnp.floating):
            raise ValueError(f"features must be floating point, got {f.dtype}")
        if getattr(idx, "ndim", None) != 2 or idx.shape[1] != self.ndim + 1:
            raise ValueError(f"indices must be [capacity, ndim + 1] = [*, {self.ndim + 1}] for "
                             f"spatial_shape {self.spatial_shape}, got shape {getattr(idx, 'shape', None)}")
        if getattr(idx, "dtype", None) != jnp.int32:
            raise ValueError(f"indices must be int32, got {idx.dtype}")
        if f.shape[0] != idx.shape[0]:
            raise ValueError(f"features has {f.shape[0]} rows but indices has {idx.shape[0]}")
        if is_concrete(f, idx):
            validate_sites(np.asarray(idx), self.spatial_shape, self.batch_size)


def validate_sites(indices: np.ndarray, spatial_shape: Sequence[int], batch_size: int) -> None:
    """Raises ValueError for out-of-range or duplicate active sites (host-side check)."""
    active = indices[indices[:, 0] >= 0]
    if len(active) == 0:
        return
    if active[:, 0].max() >= batch_size:
        row = active[active[:, 0] >= batch_size][0]
        raise ValueError(f"batch index {row[0]} >= batch_size {batch_size} (site {tuple(row.tolist())})")
    coords = active[:, 1:]
    shape = np.asarray(spatial_shape)
    bad = np.any((coords < 0) | (coords >= shape), axis=1)
    if bad.any():
        row = active[bad][0]
        kind = "negative" if (row[1:] < 0).any() else "outside spatial_shape"
        raise ValueError(f"site {tuple(row.tolist())} has coordinates {kind} "
                         f"{tuple(spatial_shape)}")
    unique, counts = np.unique(active, axis=0, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"duplicate site {tuple(unique[counts > 1][0].tolist())} "
                         f"appears {counts.max()} times; sites must be unique")


def capacity_bucket(n: int, minimum: int = 256) -> int:
    """Smallest capacity of the form ``m * 2**e`` (m in 4..7) that holds ``n`` rows.

    Scans padded to such buckets share compilations while wasting at most 25% of rows.
    """
    n = max(int(n), minimum)
    e = max(0, math.ceil(math.log2(n)) - 3)
    while True:
        for m in (4, 5, 6, 7, 8):
            if m * 2**e >= n:
                return m * 2**e
        e += 1


def grown_capacity(capacity: int, overflow) -> int:
    """The capacity bucket to run a batch again at after it overflowed at ``capacity``.

    ``overflow``: the step's overflow record(s) ``[needed, capacity of that op]``. Assumes
    the ops' capacities scale with the input's (``out_capacity`` fractions, as in
    ``models``): the result fits the op that overflowed, and is at least the next bucket.
    """
    scale = max((needed / op_capacity for needed, op_capacity in _set_records(overflow)), default=1.0)
    return capacity_bucket(max(capacity + 1, math.ceil(capacity * scale)))


def from_numpy(features: np.ndarray, indices: np.ndarray, spatial_shape: Sequence[int],
               batch_size: int, capacity: int | None = None) -> SparseConvTensor:
    """A SparseConvTensor from unpadded numpy rows, padded to ``capacity``.

    ``capacity=None`` picks ``capacity_bucket(len(features))``, so scans of different
    sizes share a few compilations.
    """
    features = np.asarray(features)
    indices = np.asarray(indices, np.int32)
    n = len(features)
    capacity = capacity_bucket(n) if capacity is None else capacity
    if n > capacity:
        raise CapacityOverflowError(f"{n} sites do not fit in capacity {capacity}")
    padded_f = np.zeros((capacity, features.shape[1]), features.dtype)
    padded_f[:n] = features
    padded_i = np.full((capacity, indices.shape[1]), -1, np.int32)
    padded_i[:n] = indices
    return SparseConvTensor(jnp.asarray(padded_f), jnp.asarray(padded_i), spatial_shape, batch_size)
