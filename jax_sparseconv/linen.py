"""Flax Linen layers over sparse tensors (``import jax_sparseconv.linen as spnn``).

Layers infer their input channels, like ``flax.linen.Conv``. Every layer takes and
returns a ``SparseConvTensor``, except ``SparseGlobal*Pool`` and ``ToDense`` (dense
arrays). Define ``SparseSequential`` blocks in ``setup`` to get parameter paths such as
``conv1/layers_0/kernel``, which match spconv's ``conv1.0.weight`` (see ``jsc.convert``).

Layers: ``SubMConv``, ``SparseConv``, ``SparseConvTranspose``, ``SparseInverseConv``,
``SparseMaxPool``, ``SparseAvgPool`` (any rank) and their fixed-rank forms ``SubMConv1d`` ...
``SparseAvgPool4d``; ``SparseGlobalMaxPool``, ``SparseGlobalAvgPool``, ``ToDense``,
``SparseBatchNorm``, ``SparseLayerNorm``, ``SparseGroupNorm``, ``SparseSequential``.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jax_sparseconv import _layers

Initializer = Callable[..., Any]
IntOrSeq = int | Sequence[int]
default_kernel_init = nn.initializers.lecun_normal()


class _SparseConv(nn.Module):
    features: int
    kernel_size: IntOrSeq
    strides: IntOrSeq = 1
    padding: IntOrSeq = 0
    kernel_dilation: IntOrSeq = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    indice_key: str | None = None
    out_capacity: int | float | None = None
    backend: str | None = None

    mode: ClassVar[str]
    num_spatial_dims: ClassVar[int | None] = None
    takes_sparse_tensor: ClassVar[bool] = True

    @nn.compact
    def __call__(self, x):
        _layers.check_input(type(self).__name__, x, self.num_spatial_dims)
        shape = _layers.kernel_shape(self.kernel_size, x.ndim, x.num_channels, self.features)
        kernel = self.param("kernel", _layers.flat_kernel_init(self.kernel_init), shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        return _layers.conv(self.mode, x, kernel, bias, strides=self.strides, padding=self.padding,
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


class _SparsePool(nn.Module):
    kernel_size: IntOrSeq
    strides: IntOrSeq | None = None
    padding: IntOrSeq = 0
    kernel_dilation: IntOrSeq = 1
    indice_key: str | None = None
    out_capacity: int | float | None = None
    backend: str | None = None

    kind: ClassVar[str]
    num_spatial_dims: ClassVar[int | None] = None
    takes_sparse_tensor: ClassVar[bool] = True

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


class _GlobalPool(nn.Module):
    kind: ClassVar[str]
    takes_sparse_tensor: ClassVar[bool] = True

    __call__ = _layers.global_pool_call


class SparseGlobalMaxPool(_GlobalPool):
    """``[B, C]`` max over each batch item's active sites (spconv's SparseGlobalMaxPool)."""
    kind: ClassVar[str] = "max"


class SparseGlobalAvgPool(_GlobalPool):
    """``[B, C]`` mean over each batch item's active sites (spconv's SparseGlobalAvgPool)."""
    kind: ClassVar[str] = "avg"


class ToDense(nn.Module):
    """``[B, *spatial_shape, C]`` dense array (spconv's ToDense gives channels first:
    set ``channels_first=True`` for ``[B, C, *spatial_shape]``)."""
    channels_first: bool = False
    takes_sparse_tensor: ClassVar[bool] = True

    __call__ = _layers.to_dense_call


# ---- normalization ---------------------------------------------------------------------------

class SparseBatchNorm(nn.Module):
    """Batch norm over active sites only (``nn.BatchNorm`` applied to spconv features).

    Same arguments and variables as ``flax.linen.BatchNorm`` (``params``: scale, bias;
    ``batch_stats``: mean, var). ``axis_name`` averages statistics over devices, weighted
    by each device's active rows. spconv models usually use ``epsilon=1e-3`` and PyTorch
    momentum 0.01, which is ``momentum=0.99`` here.
    """
    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros_init()
    scale_init: Initializer = nn.initializers.ones_init()
    axis_name: str | None = None
    axis_index_groups: Any = None
    takes_sparse_tensor: ClassVar[bool] = True
    fuses_relu: ClassVar[bool] = True  # SparseSequential runs [SparseBatchNorm, nn.relu] as one op

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, residual=None, relu: bool = False):
        """``x`` normalized; with ``residual`` (a tensor on the same sites) added, then ReLU if
        ``relu``: a residual block's ``relu(bn(x) + shortcut)`` as one op, which in training
        keeps less for the backward pass than the three apart (``normalization.batch_norm_act``)."""
        _layers.check_input("SparseBatchNorm", x, None)
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        channels = (x.num_channels,)
        mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(channels, jnp.float32))
        var = self.variable("batch_stats", "var", lambda: jnp.ones(channels, jnp.float32))
        scale = self.param("scale", self.scale_init, channels, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, channels, self.param_dtype) if self.use_bias else None
        y, (new_mean, new_var) = _layers.batch_norm(
            x, use_running_average=use_running_average, running_mean=mean.value, running_var=var.value,
            scale=scale, bias=bias, momentum=self.momentum, epsilon=self.epsilon,
            axis_name=None if self.is_initializing() else self.axis_name,  # as nn.BatchNorm: init runs unmapped
            axis_index_groups=self.axis_index_groups, dtype=self.dtype, residual=residual, relu=relu)
        if not use_running_average and not self.is_initializing():
            mean.value, var.value = new_mean, new_var
        return y


class _AffineNorm(nn.Module):
    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros_init()
    scale_init: Initializer = nn.initializers.ones_init()
    takes_sparse_tensor: ClassVar[bool] = True

    def _affine(self, x):
        channels = (x.num_channels,)
        scale = self.param("scale", self.scale_init, channels, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, channels, self.param_dtype) if self.use_bias else None
        return scale, bias


class SparseLayerNorm(_AffineNorm):
    """Layer norm of each active site's channels; padding stays zero (as ``nn.LayerNorm``)."""

    @nn.compact
    def __call__(self, x):
        _layers.check_input("SparseLayerNorm", x, None)
        scale, bias = self._affine(x)
        return _layers.layer_norm(x, scale=scale, bias=bias, epsilon=self.epsilon, dtype=self.dtype)


class SparseGroupNorm(_AffineNorm):
    """Group norm: statistics per batch item and channel group over its active sites."""
    num_groups: int = 32

    @nn.compact
    def __call__(self, x):
        _layers.check_input("SparseGroupNorm", x, None)
        scale, bias = self._affine(x)
        return _layers.group_norm(x, num_groups=self.num_groups, scale=scale, bias=bias, epsilon=self.epsilon,
                                  dtype=self.dtype)


_REJECTED = {nn.BatchNorm: "SparseBatchNorm", nn.GroupNorm: "SparseGroupNorm"}


class SparseSequential(nn.Module):
    """Applies ``layers`` in order (spconv's SparseSequential).

    Sparse layers get the tensor; other modules and callables (``nn.relu``, ``nn.Dense``,
    ``nn.Dropout``) get the ``[capacity, C]`` features, with padding rows kept at zero.
    Keyword arguments go to the layers whose call names them, for example
    ``block(x, use_running_average=not train, deterministic=not train)``.
    """
    layers: Sequence[Callable[..., Any]]
    takes_sparse_tensor: ClassVar[bool] = True

    def __call__(self, x, **kwargs):
        return _layers.apply_sequential(self.layers, x, lambda layer: _layers.reject_layer(layer, _REJECTED),
                                        **kwargs)
