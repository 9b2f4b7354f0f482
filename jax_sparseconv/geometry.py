"""Static geometry of sparse convolutions: shapes, offsets and site mapping.

Everything here is static (Python ints and tuples): it decides array shapes
and is hashed into jit caches. The same mapping is written in C++ in
``xla_ffi/include/jsc/geometry.h``; keep the two in step.

For an input site ``i``, kernel offset ``k`` (per dimension, enumerated
row-major over the kernel) and output site ``o``:

- ``subm``:       ``o = i - (k - kernel_size // 2) * dilation`` (output sites = input sites)
- ``regular``:    ``o * stride = i + padding - k * dilation`` (cross-correlation)
- ``transposed``: ``o = i * stride - padding + k * dilation`` (gradient of a regular conv)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

SUBM, REGULAR, TRANSPOSED = "subm", "regular", "transposed"
MODE_CODES = {SUBM: 0, REGULAR: 1, TRANSPOSED: 2}
MAX_NDIM = 4


def normalize_tuple(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    """Expands a scalar to ``ndim`` ints, or checks a sequence has ``ndim`` ints."""
    if isinstance(value, (int, np.integer)):
        return (int(value),) * ndim
    value = tuple(int(v) for v in value)
    if len(value) != ndim:
        raise ValueError(f"{name} must be an int or {ndim} ints, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """How one sparse convolution or pooling maps input sites to output sites."""

    mode: str
    in_shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    @property
    def ndim(self) -> int:
        """Spatial dimensions (1 to 4)."""
        return len(self.in_shape)

    @property
    def kernel_volume(self) -> int:
        """Kernel offsets ``K = prod(kernel_size)``, the rulebook's columns."""
        return math.prod(self.kernel_size)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The output grid: ``in_shape`` for subm, else as ``jax.lax.conv_general_dilated``
        (regular) or its transpose (transposed)."""
        shape = []
        for n, k, s, p, d in zip(self.in_shape, self.kernel_size, self.strides, self.padding, self.dilation):
            if self.mode == SUBM:
                shape.append(n)
            elif self.mode == REGULAR:
                shape.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
            else:
                shape.append((n - 1) * s - 2 * p + d * (k - 1) + 1)
        return tuple(shape)

    def offsets(self) -> np.ndarray:
        """Kernel offsets ``[K, ndim]`` int32, row-major over the kernel dims."""
        grids = np.meshgrid(*[np.arange(k) for k in self.kernel_size], indexing="ij")
        return np.stack([g.reshape(-1) for g in grids], axis=1).astype(np.int32)

    def reaching_offsets(self) -> tuple[int, ...]:
        """Per dim, how many kernel offsets of one input site reach an output at most.

        Regular: those with ``offset * dilation`` in the input's residue class modulo the
        stride, every ``stride / gcd(stride, dilation)``-th offset. Otherwise all of them.
        """
        if self.mode == REGULAR:
            return tuple(-(-k // (s // math.gcd(s, d)))
                         for k, s, d in zip(self.kernel_size, self.strides, self.dilation))
        return self.kernel_size

    def max_outputs_per_input(self) -> int:
        """How many output sites one input site can reach at most."""
        return math.prod(self.reaching_offsets())

    def default_out_capacity(self, in_capacity: int, batch_size: int) -> int:
        """``out_capacity`` when none is given (see ``sparse_conv``).

        Regular: the input capacity (downsampling rarely adds sites). Transposed: the
        largest count the geometry allows, so it never overflows. Both are capped by the
        grid size; pass an explicit ``out_capacity`` to save memory.
        """
        if self.mode == SUBM:
            return in_capacity
        bound = min(batch_size * math.prod(self.out_shape), in_capacity * self.max_outputs_per_input())
        return max(1, bound if self.mode == TRANSPOSED else min(bound, in_capacity))


def make_geometry(
    mode: str,
    in_shape: Sequence[int],
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
) -> ConvGeometry:
    """Normalizes and validates convolution arguments; raises ValueError on bad ones."""
    if mode not in MODE_CODES:
        raise ValueError(f"unknown convolution mode {mode!r}")
    in_shape = tuple(int(n) for n in in_shape)
    ndim = len(in_shape)
    if not 1 <= ndim <= MAX_NDIM:
        raise ValueError(f"sparse convolutions support 1 to {MAX_NDIM} spatial dims, got {ndim}")
    kernel_size = normalize_tuple(kernel_size, ndim, "kernel_size")
    strides = normalize_tuple(strides, ndim, "strides")
    padding = normalize_tuple(padding, ndim, "padding")
    dilation = normalize_tuple(dilation, ndim, "dilation")
    for name, values, low in (("kernel_size", kernel_size, 1), ("strides", strides, 1),
                              ("dilation", dilation, 1), ("padding", padding, 0)):
        if min(values) < low:
            raise ValueError(f"{name} must be >= {low}, got {values}")
    if mode == SUBM:
        if any(k % 2 == 0 for k in kernel_size):
            raise ValueError(f"submanifold convolutions need odd kernel sizes, got {kernel_size}")
        # Like spconv, a submanifold conv keeps its sites: stride and padding do not apply.
        strides, padding = (1,) * ndim, (0,) * ndim
    geometry = ConvGeometry(mode, in_shape, kernel_size, strides, padding, dilation)
    if min(geometry.out_shape) < 1:
        raise ValueError(
            f"{mode} convolution of spatial shape {in_shape} with kernel_size={kernel_size}, "
            f"strides={strides}, padding={padding}, dilation={dilation} has an empty output "
            f"shape {geometry.out_shape}")
    return geometry
