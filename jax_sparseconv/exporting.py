"""Exported programs (``jsc.export``, ``jsc.deserialize``): models that run without their code.

``jax.export`` refuses custom calls that carry no compatibility promise. Ours carry one of
their own (versioned target names, ``_native.TARGETS``; README, "Export and serve"), so
``export`` allows exactly those. A program traced with ``backend=None`` holds, for each
platform it is exported for, what that platform runs: the native kernels on cpu (and cuda
where ``jax_sparseconv._cuda`` is built), the xla backend elsewhere. Running a native part
needs a process that has imported jax_sparseconv, which registers the handlers; the other
parts need JAX only.

Importing this module registers SparseConvTensor and Rulebook for ``jax.export``'s
serialization of argument and result trees, so exported functions may take and return them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Sequence

import jax

from jax_sparseconv import _native
from jax_sparseconv.geometry import ConvGeometry
from jax_sparseconv.rulebook import Rulebook
from jax_sparseconv.tensor import SparseConvTensor


def export(fun_jit: Callable, *, platforms: Sequence[str] | None = None,
           disabled_checks: Sequence[jax.export.DisabledSafetyCheck] = (),
           **kwargs) -> Callable[..., jax.export.Exported]:
    """``jax.export.export`` that also allows jax_sparseconv's custom calls.

    Args:
      fun_jit: the function to export, a ``jax.jit`` result (a plain function is jitted).
      platforms: a subset of "cpu", "cuda", "rocm", "tpu"; None: JAX's default platform.
      disabled_checks: further checks to disable, as in ``jax.export.export``.
      **kwargs: passed on to ``jax.export.export``.

    Returns:
      A function of the arguments (arrays or ``jax.ShapeDtypeStruct`` pytrees) that returns
      a ``jax.export.Exported``; ``.serialize()`` gives bytes for ``deserialize``.

    Ops with ``backend='ffi'`` raise a ValueError when a platform without native kernels
    (such as "tpu") is among ``platforms``.
    """
    if not isinstance(fun_jit, jax.stages.Wrapped):
        fun_jit = jax.jit(fun_jit)
    ours = [jax.export.DisabledSafetyCheck.custom_call(target) for target in _native.TARGETS]
    return jax.export.export(fun_jit, platforms=platforms, disabled_checks=[*disabled_checks, *ours], **kwargs)


def deserialize(blob: bytes | bytearray) -> jax.export.Exported:
    """``jax.export.deserialize`` of bytes from ``Exported.serialize()``, in a process whose
    native handlers are registered (this module's import did that)."""
    return jax.export.deserialize(blob)


# ---- argument and result trees --------------------------------------------------------

def _tensor_aux_to_bytes(aux) -> bytes:
    spatial_shape, batch_size = aux
    return json.dumps([list(spatial_shape), batch_size]).encode()


def _tensor_aux_from_bytes(data: bytes):
    spatial_shape, batch_size = json.loads(data)
    return tuple(spatial_shape), batch_size


def _rulebook_aux_to_bytes(aux) -> bytes:
    geometry, inverted = aux
    return json.dumps([dataclasses.asdict(geometry), inverted]).encode()


def _rulebook_aux_from_bytes(data: bytes):
    geometry, inverted = json.loads(data)
    return ConvGeometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in geometry.items()}), inverted


jax.export.register_pytree_node_serialization(
    SparseConvTensor, serialized_name="jax_sparseconv.SparseConvTensor",
    serialize_auxdata=_tensor_aux_to_bytes, deserialize_auxdata=_tensor_aux_from_bytes)
jax.export.register_pytree_node_serialization(
    Rulebook, serialized_name="jax_sparseconv.Rulebook",
    serialize_auxdata=_rulebook_aux_to_bytes, deserialize_auxdata=_rulebook_aux_from_bytes)
