"""Flax NNX layers over sparse tensors (``import jax_sparseconv.nnx as spnnx``).

The same layers as ``jax_sparseconv.linen``, computing the same thing through the same
shared code; as in ``flax.nnx``, constructors take ``in_features, out_features`` (or
``num_features``) and ``rngs``. Conv layers need the number of spatial dims when they
are built: use the ``...3d`` classes or give ``kernel_size`` as a tuple.

Layers: ``SubMConv``, ``SparseConv``, ``SparseConvTranspose``, ``SparseInverseConv``,
``SparseMaxPool``, ``SparseAvgPool`` (any rank) and their fixed-rank forms ``SubMConv1d`` ...
``SparseAvgPool4d``; ``SparseGlobalMaxPool``, ``SparseGlobalAvgPool``, ``ToDense``,
``SparseBatchNorm``, ``SparseLayerNorm``, ``SparseGroupNorm``, ``SparseSequential``.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import jax.numpy as jnp
from flax import nnx

from jax_sparseconv import _layers

Initializer = Callable[..., Any]
IntOrSeq = int | Sequence[int]
default_kernel_init = nnx.initializers.lecun_normal()


def _spatial_dims(layer: Any, kernel_size: IntOrSeq) -> int:
    if layer.num_spatial_dims is not None:
        return layer.num_spatial_dims
    if isinstance(kernel_size, int):
        raise ValueError(f"{type(layer).__name__} needs kernel_size as a tuple (one per spatial dim), or use "
                         f"its fixed-dimension form such as {type(layer).__name__}3d")
    return len(kernel_size)


class _SparseConv(nnx.Module):
    mode: ClassVar[str]
    num_spatial_dims: ClassVar[int | None] = None
    takes_sparse_tensor: ClassVar[bool] = True

    def __init__(self, in_features: int, out_features: int, kernel_size: IntOrSeq, strides: IntOrSeq = 1, *,
                 padding: IntOrSeq = 0, kernel_dilation: IntOrSeq = 1, use_bias: bool = True, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None,
                 kernel_init: Initializer = default_kernel_init,
                 bias_init: Initializer = nnx.initializers.zeros_init(), indice_key: str | None = None,
                 out_capacity: int | float | None = None, backend: str | None = None, rngs: nnx.Rngs):
        shape = _layers.kernel_shape(kernel_size, _spatial_dims(self, kernel_size), in_features, out_features)
        self.kernel = nnx.Param(_layers.flat_kernel_init(kernel_init)(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None
        self.in_features, self.out_features, self.kernel_size = in_features, out_features, kernel_size
        self.strides, self.padding, self.kernel_dilation = strides, padding, kernel_dilation
        self.dtype, self.precision = dtype, precision
        self.indice_key, self.out_capacity, self.backend = indice_key, out_capacity, backend

    def __call__(self, x):
        _layers.check_input(type(self).__name__, x, self.num_spatial_dims)
        bias = None if self.bias is None else self.bias[...]
        return _layers.conv(self.mode, x, self.kernel[...], bias, strides=self.strides, padding=self.padding,
                            kernel_dilation=self.kernel_dilation, indice_key=self.indice_key,
                            out_capacity=self.out_capacity, precision=self.precision, backend=self.backend,
                            dtype=self.dtype)


class SubMConv(_SparseConv):
    __doc__ = "Submanifold conv: output sites = input sites, odd kernels (spconv's SubMConv).\n" + _layers.CONV_DOC
    mode: ClassVar[str] = _layers.SUBM


class SparseConv(_SparseConv):
    __doc__ = "Regular sparse conv: strided, creates sites (spconv's SparseConv).\n" + _layers.CONV_DOC
    mode: ClassVar[str] = _layers.REGULAR


class SparseConvTranspose(_SparseConv):
    __doc__ = "Transposed sparse conv, creates sites (spconv's SparseConvTranspose).\n" + _layers.CONV_DOC
    mode: ClassVar[str] = _layers.TRANSPOSED


class SparseInverseConv(_SparseConv):
    __doc__ = ("Back to the input sites of the strided conv under ``indice_key`` (spconv's "
               "SparseInverseConv); strides, padding and dilation come from that conv.\n" + _layers.CONV_DOC)
    mode: ClassVar[str] = _layers.INVERSE


class _SparsePool(nnx.Module):
    kind: ClassVar[str]
    num_spatial_dims: ClassVar[int | None] = None
    takes_sparse_tensor: ClassVar[bool] = True

    def __init__(self, kernel_size: IntOrSeq, strides: IntOrSeq | None = None, padding: IntOrSeq = 0,
                 kernel_dilation: IntOrSeq = 1, *, indice_key: str | None = None, out_capacity: int | float | None = None,
                 backend: str | None = None):
        self.kernel_size, self.strides, self.padding, self.kernel_dilation = kernel_size, strides, padding, kernel_dilation
        self.indice_key, self.out_capacity, self.backend = indice_key, out_capacity, backend

    __call__ = _layers.pool_call


class SparseMaxPool(_SparsePool):
    """Max over active inputs of each window (spconv's SparseMaxPool); ``strides=None``
    means ``kernel_size``. Arguments as ``functional.sparse_max_pool``; a float
    ``out_capacity`` is a multiple of the input capacity, as for the conv layers."""
    kind: ClassVar[str] = "max"


class SparseAvgPool(_SparsePool):
    """Mean over active inputs of each window (spconv's SparseAvgPool)."""
    kind: ClassVar[str] = "avg"


# SubMConv1d ... SubMConv4d, SparseConv1d ..., SparseAvgPool4d.
_layers.define_dimension_variants(globals(), SubMConv, SparseConv, SparseConvTranspose, SparseInverseConv,
                                  SparseMaxPool, SparseAvgPool)


class _GlobalPool(nnx.Module):
    kind: ClassVar[str]
    takes_sparse_tensor: ClassVar[bool] = True

    __call__ = _layers.global_pool_call


class SparseGlobalMaxPool(_GlobalPool):
    """``[B, C]`` max over each batch item's active sites (spconv's SparseGlobalMaxPool)."""
    kind: ClassVar[str] = "max"


class SparseGlobalAvgPool(_GlobalPool):
    """``[B, C]`` mean over each batch item's active sites (spconv's SparseGlobalAvgPool)."""
    kind: ClassVar[str] = "avg"


class ToDense(nnx.Module):
    """``[B, *spatial_shape, C]`` dense array (``channels_first=True``: spconv's layout)."""
    takes_sparse_tensor: ClassVar[bool] = True

    def __init__(self, channels_first: bool = False):
        self.channels_first = channels_first

    __call__ = _layers.to_dense_call


# ---- normalization ---------------------------------------------------------------------------

class _Norm(nnx.Module):
    takes_sparse_tensor: ClassVar[bool] = True

    def _init_affine(self, num_features, use_scale, use_bias, scale_init, bias_init, param_dtype, rngs):
        shape = (num_features,)
        self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype)) if use_scale else None
        self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype)) if use_bias else None

    def _affine(self):
        return (None if self.scale is None else self.scale[...], None if self.bias is None else self.bias[...])


class SparseBatchNorm(_Norm):
    """Batch norm over active sites only; variables as ``nnx.BatchNorm`` (``scale``,
    ``bias`` params; ``mean``, ``var`` batch stats). See ``linen.SparseBatchNorm``."""
    fuses_relu: ClassVar[bool] = True  # SparseSequential runs [SparseBatchNorm, nnx.relu] as one op

    def __init__(self, num_features: int, *, use_running_average: bool = False, momentum: float = 0.99,
                 epsilon: float = 1e-5, dtype: Any = None, param_dtype: Any = jnp.float32, use_bias: bool = True,
                 use_scale: bool = True, bias_init: Initializer = nnx.initializers.zeros_init(),
                 scale_init: Initializer = nnx.initializers.ones_init(), axis_name: str | None = None,
                 axis_index_groups: Any = None, rngs: nnx.Rngs):
        self._init_affine(num_features, use_scale, use_bias, scale_init, bias_init, param_dtype, rngs)
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.use_running_average, self.momentum, self.epsilon, self.dtype = use_running_average, momentum, epsilon, dtype
        self.axis_name, self.axis_index_groups = axis_name, axis_index_groups

    def __call__(self, x, use_running_average: bool | None = None, *, residual=None, relu: bool = False):
        """As ``linen.SparseBatchNorm.__call__``: ``residual`` added, then ReLU if ``relu``, fused."""
        _layers.check_input("SparseBatchNorm", x, None)
        scale, bias = self._affine()
        use_running_average = self.use_running_average if use_running_average is None else use_running_average
        y, (mean, var) = _layers.batch_norm(
            x, use_running_average=use_running_average, running_mean=self.mean[...], running_var=self.var[...],
            scale=scale, bias=bias, momentum=self.momentum, epsilon=self.epsilon, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=self.dtype, residual=residual, relu=relu)
        if not use_running_average:
            self.mean[...], self.var[...] = mean, var
        return y


class SparseLayerNorm(_Norm):
    """Layer norm of each active site's channels; padding stays zero."""

    def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype: Any = None, param_dtype: Any = jnp.float32,
                 use_bias: bool = True, use_scale: bool = True, bias_init: Initializer = nnx.initializers.zeros_init(),
                 scale_init: Initializer = nnx.initializers.ones_init(), rngs: nnx.Rngs):
        self._init_affine(num_features, use_scale, use_bias, scale_init, bias_init, param_dtype, rngs)
        self.epsilon, self.dtype = epsilon, dtype

    def __call__(self, x):
        _layers.check_input("SparseLayerNorm", x, None)
        scale, bias = self._affine()
        return _layers.layer_norm(x, scale=scale, bias=bias, epsilon=self.epsilon, dtype=self.dtype)


class SparseGroupNorm(_Norm):
    """Group norm: statistics per batch item and channel group over its active sites."""

    def __init__(self, num_features: int, num_groups: int = 32, *, epsilon: float = 1e-6, dtype: Any = None,
                 param_dtype: Any = jnp.float32, use_bias: bool = True, use_scale: bool = True,
                 bias_init: Initializer = nnx.initializers.zeros_init(),
                 scale_init: Initializer = nnx.initializers.ones_init(), rngs: nnx.Rngs):
        self._init_affine(num_features, use_scale, use_bias, scale_init, bias_init, param_dtype, rngs)
        self.num_groups, self.epsilon, self.dtype = num_groups, epsilon, dtype

    def __call__(self, x):
        _layers.check_input("SparseGroupNorm", x, None)
        scale, bias = self._affine()
        return _layers.group_norm(x, num_groups=self.num_groups, scale=scale, bias=bias, epsilon=self.epsilon,
                                  dtype=self.dtype)


_REJECTED = {nnx.BatchNorm: "SparseBatchNorm", nnx.GroupNorm: "SparseGroupNorm"}


class SparseSequential(nnx.Module):
    """Applies ``layers`` in order (spconv's SparseSequential); see ``linen.SparseSequential``."""
    takes_sparse_tensor: ClassVar[bool] = True

    def __init__(self, *layers: Callable[..., Any]):
        self.layers = nnx.List(layers)

    def __call__(self, x, **kwargs):
        return _layers.apply_sequential(list(self.layers), x, lambda layer: _layers.reject_layer(layer, _REJECTED),
                                        **kwargs)
