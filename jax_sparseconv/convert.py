"""Load spconv / PyTorch weights into the variables of an equivalent Flax model.

Names map by rule: the PyTorch key ``conv2.0.1.running_mean`` names module path
``conv2/0/1``, whose numbered children are ``SparseSequential`` entries (``layers_0`` in
Linen, ``layers/0`` in NNX), and the attribute maps as

===================  =======================================================
PyTorch              Flax
===================  =======================================================
conv ``weight``      ``kernel`` ``(*k, C_in, C_out)`` from ``[C_out, *k, C_in]``
Linear ``weight``    ``kernel`` ``(C_in, C_out)`` from ``[C_out, C_in]``
norm ``weight``      ``scale``
``bias``             ``bias``
``running_mean/var`` ``mean`` / ``var`` (Linen: in ``batch_stats``)
===================  =======================================================

spconv reads a kernel of volume 1 (every 1x1x1 SubM conv, and 1x1x1 convs with stride 1)
as ``weight.reshape(C_in, C_out)``, not as its transpose; the converter does the same,
which is also how such a conv loads into an ``nn.Dense``. List the rare strided 1x1x1
convs in ``strided_pointwise``. Every PyTorch tensor must find a Flax variable of the
right shape and every Flax variable must be filled, else a ``ValueError`` names them.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Collection, Mapping

import jax
import jax.numpy as jnp
import numpy as np

_STATS = {"running_mean": "mean", "running_var": "var"}
_IGNORED = {"num_batches_tracked"}


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _linen_path(module: tuple[str, ...], attribute: str) -> tuple[str, tuple]:
    path = tuple(f"layers_{p}" if p.isdigit() else p for p in module)
    if attribute in _STATS:
        return "batch_stats", path + (_STATS[attribute],)
    return "params", path + (attribute,)


def _nnx_path(module: tuple[str, ...], attribute: str) -> tuple[str, tuple]:
    path = tuple(x for p in module for x in (("layers", int(p)) if p.isdigit() else (p,)))
    return "", path + (_STATS.get(attribute, attribute),)


def _thaw(tree):
    """Nested plain dicts of numpy arrays (Linen variables may be FrozenDicts)."""
    if isinstance(tree, Mapping):
        return {k: _thaw(v) for k, v in tree.items()}
    return np.asarray(tree)


def _lookup(tree: Mapping, path: tuple):
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _convert_weight(weight: np.ndarray, target_shape: tuple[int, ...], pointwise_as_matrix: bool) -> np.ndarray:
    if weight.ndim == 2:  # Linear: [out, in]
        return weight.T
    c_out, c_in = weight.shape[0], weight.shape[-1]
    if math.prod(weight.shape[1:-1]) == 1 and pointwise_as_matrix:
        return weight.reshape(c_in, c_out).reshape(target_shape)
    converted = np.moveaxis(weight, 0, -1)  # [*k, C_in, C_out]
    return converted.reshape(target_shape) if len(target_shape) == 2 else converted


def from_spconv(state_dict: Mapping[str, Any], variables: Mapping, *, strided_pointwise: Collection[str] = (),
                rename: Callable[[str], str] | None = None) -> dict:
    """A copy of ``variables`` filled from a spconv / PyTorch ``state_dict``.

    Args:
      state_dict: ``module.state_dict()`` of the PyTorch model (tensors or arrays).
      variables: Linen variables ``{"params": ..., "batch_stats": ...}`` of the Flax
        model (from ``model.init``), or an NNX model's ``nnx.to_pure_dict(nnx.state(model))``
        (load the result with ``nnx.replace_by_pure_dict``).
      strided_pointwise: PyTorch module paths (``"down.0"``) of strided 1x1x1 convs.
      rename: maps a PyTorch module path (``"backbone.conv1.0"``) to the Flax one,
        still dotted (``"conv1.0"``), for models whose names differ.

    Returns:
      New variables with the same structure, dtypes and shapes as ``variables``.
    """
    linen = "params" in variables
    to_path = _linen_path if linen else _nnx_path
    out = _thaw(variables)
    filled, errors = set(), []
    for key, value in state_dict.items():
        module, _, attribute = key.rpartition(".")
        if attribute in _IGNORED:
            continue
        flax_module = rename(module) if rename else module
        value = _to_numpy(value)
        if attribute == "weight":
            attribute = "kernel" if value.ndim >= 2 else "scale"
        collection, path = to_path(tuple(flax_module.split(".")) if flax_module else (), attribute)
        full_path = ((collection,) if collection else ()) + path
        parent = _lookup(out, full_path[:-1])
        target = None if parent is None else parent.get(full_path[-1])
        if target is None:
            errors.append(f"{key}: no Flax variable {'/'.join(map(str, full_path))}")
            continue
        if attribute == "kernel":
            value = _convert_weight(value, target.shape, module not in strided_pointwise)
        if value.shape != target.shape:
            errors.append(f"{key}: shape {value.shape} does not fit {'/'.join(map(str, full_path))} "
                          f"of shape {target.shape}")
            continue
        parent[full_path[-1]] = value.astype(target.dtype)
        filled.add(full_path)
    for path, _ in jax.tree_util.tree_flatten_with_path(out)[0]:
        names = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        if names not in filled:
            errors.append(f"Flax variable {'/'.join(map(str, names))} has no PyTorch tensor")
    if errors:
        raise ValueError("state_dict does not match the Flax model:\n  " + "\n  ".join(errors))
    return jax.tree_util.tree_map(jnp.asarray, out)
