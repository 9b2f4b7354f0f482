"""Rulebooks: which input row meets which output row through which kernel offset.

A rulebook is a pair of static-shape neighbour maps (int32, ``-1`` = no neighbour),
offset-leading (a TPU pads an array's minor dimension to 128 lanes; the capacity is the
long one):

- ``out_nbr [K, out_capacity]``: ``out_nbr[k, o]`` is the input row that output row
  ``o`` reads through kernel offset ``k``. The forward pass gathers along it.
- ``in_nbr [K, in_capacity]``: ``in_nbr[k, i]`` is the output row that input row ``i``
  feeds through offset ``k``. For a fixed offset each input feeds at most one output,
  so this is the exact transpose, and backward passes gather along it instead of
  scattering (deterministic, no atomics).

Output rows of regular and transposed convolutions are the reached sites in sorted
``(batch, coords)`` order, followed by padding rows (indices ``-1``). Both backends
build identical rulebooks. The cost of the neighbour maps is ``capacity x K`` int32s;
the ``ffi`` kernels skip ``-1`` entries, so their work scales with the real pairs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jax_sparseconv.geometry import SUBM, ConvGeometry


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["in_indices", "out_indices", "out_nbr", "in_nbr", "needed"],
                   meta_fields=["geometry", "inverted"])
@dataclasses.dataclass(frozen=True)
class Rulebook:
    """A rulebook with the sites it connects (spconv's ``IndiceData``).

    Attributes:
      geometry: the static geometry it was built for.
      inverted: True for the transpose used by an inverse convolution.
      in_indices: ``[in_capacity, ndim + 1]`` int32 input sites.
      out_indices: ``[out_capacity, ndim + 1]`` int32 output sites (``-1`` rows: padding).
      out_nbr: ``[K, out_capacity]`` int32, see the module docstring.
      in_nbr: ``[K, in_capacity]`` int32.
      needed: int32 scalar, the number of output sites the geometry produces; more than
        ``out_capacity`` means the rulebook overflowed (extra sites were counted, not stored).
    """

    geometry: ConvGeometry
    inverted: bool
    in_indices: jax.Array
    out_indices: jax.Array
    out_nbr: jax.Array
    in_nbr: jax.Array
    needed: jax.Array

    @property
    def out_capacity(self) -> int:
        """Rows of the output tensor."""
        return self.out_nbr.shape[-1]

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The output grid (the input grid of the geometry when inverted)."""
        return self.geometry.in_shape if self.inverted else self.geometry.out_shape

    def inverse(self) -> "Rulebook":
        """The rulebook of the transposed map: outputs become inputs and back."""
        return Rulebook(self.geometry, not self.inverted, self.out_indices, self.in_indices,
                        self.in_nbr, self.out_nbr, jnp.sum(self.in_indices[:, 0] >= 0, dtype=jnp.int32))


def build_rulebook(indices: jax.Array, geometry: ConvGeometry, batch_size: int,
                   out_capacity: int, backend, presorted: bool = False) -> Rulebook:
    """Builds the rulebook of ``geometry`` over the sites ``indices`` with ``backend``.

    ``presorted``: the caller knows the active rows of ``indices`` are in sorted
    ``(batch, coords)`` order with padding rows last (the output sites of a regular or
    transposed rulebook), which spares the xla backend a sort.
    """
    if geometry.mode == SUBM:
        out_capacity = indices.shape[0]
    out_indices, out_nbr, in_nbr, needed = backend.build_rulebook(indices, geometry, batch_size,
                                                                 out_capacity, presorted)
    if geometry.mode == SUBM:
        out_indices = indices
    return Rulebook(geometry, False, indices, out_indices, out_nbr, in_nbr, needed)
