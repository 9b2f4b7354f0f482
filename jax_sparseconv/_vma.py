"""Varying mesh axes under ``jax.shard_map`` (with its default ``check_vma=True``).

Inside ``shard_map`` every value's type records the mesh axes it varies over. JAX
infers them for its own primitives, but an ``ffi_call`` result, a ``custom_vjp``
cotangent and a loop carry started from constants must be given them: these helpers
add the axes of the values something stands for. Outside ``shard_map`` they change
nothing.
"""

from __future__ import annotations

import jax


def varying_axes(value) -> frozenset:
    """The mesh axes ``value`` varies over (empty outside ``shard_map``)."""
    return jax.typeof(value).manual_axis_type.varying


def vary_like(value, *like):
    """``value`` made to vary over every mesh axis that any of ``like`` varies over."""
    axes = frozenset().union(*(varying_axes(v) for v in like if v is not None)) - varying_axes(value)
    return jax.lax.pcast(value, tuple(sorted(axes)), to="varying") if axes else value


def vary_together(*values):
    """``values`` (None kept), each made to vary over the axes of all of them."""
    return tuple(None if v is None else vary_like(v, *values) for v in values)
