"""Reference networks in Flax Linen, built from ``jax_sparseconv.linen`` layers.

- ``MinkUNet``: a MinkUNet-style U-Net for per-voxel segmentation (SubM residual
  blocks, 2x2x2 stride-2 downsampling, inverse convs back up, skip concatenation).
- ``VoxelBackBone8x``: the SECOND / CenterPoint / OpenPCDet 3D backbone, with the same
  module names as OpenPCDet (``conv_input``, ``conv1`` ... ``conv_out``), so its
  checkpoints load with ``jsc.convert.from_spconv``; ``bev_features`` flattens its output
  to a bird's-eye-view map.

Batch norms use spconv's usual settings (epsilon 1e-3, PyTorch momentum 0.01 = Flax
``bn_momentum=0.99``); a short training run may want a lower ``bn_momentum`` (say 0.9) so
that the running averages used by ``train=False`` catch up with the weights.
Call with ``train=True`` to use and update batch statistics (``mutable=["batch_stats"]``).

Every model also takes the options it hands to all of its layers: ``backend``, ``dtype``
(computation, e.g. ``jnp.bfloat16`` with float32 accumulation in the convs),
``param_dtype``, ``axis_name`` for batch statistics across devices (``shard_map``) and
``bn_momentum``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_sparseconv import linen as spnn
from jax_sparseconv.functional import sparse_cat
from jax_sparseconv.tensor import SparseConvTensor



def _conv(model, cls, *args, **kwargs):
    return cls(*args, use_bias=False, backend=model.backend, dtype=model.dtype, param_dtype=model.param_dtype,
               **kwargs)


def _batch_norm(model, **kwargs):
    return spnn.SparseBatchNorm(epsilon=1e-3, momentum=model.bn_momentum, dtype=model.dtype,
                                param_dtype=model.param_dtype, axis_name=model.axis_name, **kwargs)


def _dense(model, features, **kwargs):
    return nn.Dense(features, dtype=model.dtype, param_dtype=model.param_dtype, **kwargs)


def _options(model) -> dict:
    return dict(backend=model.backend, dtype=model.dtype, param_dtype=model.param_dtype, axis_name=model.axis_name,
                bn_momentum=model.bn_momentum)


class ResidualBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`` with 3x3x3 SubM convs.

    The shortcut is a linear map of the features (a 1x1x1 SubM conv) with batch norm
    when the channel count changes, else the identity.
    """
    features: int
    indice_key: str
    backend: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    axis_name: str | None = None
    bn_momentum: float = 0.99

    @nn.compact
    def __call__(self, x: SparseConvTensor, train: bool) -> SparseConvTensor:
        conv = partial(_conv, self, spnn.SubMConv3d, self.features, 3, indice_key=self.indice_key)
        y = _batch_norm(self, name="bn1")(conv(name="conv1")(x), use_running_average=not train, relu=True)
        shortcut = x
        if x.num_channels != self.features:
            shortcut = x.replace_feature(_dense(self, self.features, use_bias=False, name="shortcut")(x.features))
            shortcut = _batch_norm(self, name="shortcut_bn")(shortcut, use_running_average=not train)
        return _batch_norm(self, name="bn2")(conv(name="conv2")(y), use_running_average=not train, residual=shortcut,
                                             relu=True)


class MinkUNet(nn.Module):
    """MinkUNet-style U-Net on 3D grids: per-site class scores ``[capacity, num_classes]``.

    Defaults follow MinkUNet18 (TorchSparse): stem 32, encoder 32-64-128-256, decoder
    256-128-96-96, two residual blocks per stage. Each encoder stage halves the grid
    with a 2x2x2 stride-2 conv (``indice_key="down{i}"``); each decoder stage inverts one
    and concatenates the skip connection of the same level. The output tensor lives on
    the input sites, in the input's row order.

    ``out_capacities`` are the row capacities of the downsampled levels, as multiples of
    the previous level's capacity (ints for absolute counts). Each level keeps at most all
    of its input sites; on KITTI and SemanticKITTI scans at 0.05 m the levels keep about
    60%, 47%, 40% and 38% of the sites of the level above, so the defaults leave room
    while sparing the deep, wide levels most of the padding rows. Very sparse scans (a
    32-beam sweep) may need ``(1.0, 1.0, 0.75, 0.75)``: an overflow is reported, never
    silent (``jsc.check_overflow``).
    """
    num_classes: int
    stem_features: int = 32
    encoder_features: Sequence[int] = (32, 64, 128, 256)
    decoder_features: Sequence[int] = (256, 128, 96, 96)
    blocks_per_stage: int = 2
    out_capacities: Sequence[int | float] = (0.75, 0.6, 0.5, 0.5)
    backend: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    axis_name: str | None = None
    bn_momentum: float = 0.99

    @nn.compact
    def __call__(self, x: SparseConvTensor, train: bool = False) -> SparseConvTensor:
        if not len(self.decoder_features) == len(self.encoder_features) == len(self.out_capacities):
            raise ValueError("MinkUNet needs as many decoder stages and out_capacities as encoder stages")

        def conv_bn_relu(layer, name, y):
            return _batch_norm(self, name=f"{name}_bn")(layer(name=f"{name}_conv")(y), use_running_average=not train,
                                                        relu=True)

        def block(features, indice_key, name):
            return ResidualBlock(features, indice_key, **_options(self), name=name)

        stem = partial(_conv, self, spnn.SubMConv3d, self.stem_features, 3, indice_key="subm0")
        y = conv_bn_relu(stem, "stem1", x)
        y = conv_bn_relu(stem, "stem2", y)
        skips = []
        levels = len(self.encoder_features)
        for level, (features, capacity) in enumerate(zip(self.encoder_features, self.out_capacities), start=1):
            skips.append(y)
            down = partial(_conv, self, spnn.SparseConv3d, features, 2, strides=2, indice_key=f"down{level}",
                           out_capacity=capacity)
            y = conv_bn_relu(down, f"down{level}", y)
            for b in range(self.blocks_per_stage):
                y = block(features, f"subm{level}", f"encoder{level}_block{b}")(y, train)
        for stage, features in enumerate(self.decoder_features, start=1):
            level = levels - stage + 1
            up = partial(_conv, self, spnn.SparseInverseConv3d, features, 2, indice_key=f"down{level}")
            y = sparse_cat(conv_bn_relu(up, f"up{stage}", y), skips[level - 1])
            for b in range(self.blocks_per_stage):
                y = block(features, f"subm{level - 1}", f"decoder{stage}_block{b}")(y, train)
        return y.replace_feature(_dense(self, self.num_classes, name="classifier")(y.features))


def _post_act_block(model, features, kernel_size, indice_key, strides=None, padding=1, out_capacity=None):
    """conv, batch norm, ReLU (OpenPCDet's ``post_act_block``): SubM without strides, else strided."""
    if strides is None:
        conv = _conv(model, spnn.SubMConv3d, features, kernel_size, indice_key=indice_key)
    else:
        conv = _conv(model, spnn.SparseConv3d, features, kernel_size, strides=strides, padding=padding,
                     indice_key=indice_key, out_capacity=out_capacity)
    return spnn.SparseSequential([conv, _batch_norm(model), nn.relu])


class VoxelBackBone8x(nn.Module):
    """SECOND-style 3D backbone, 8x downsampling (OpenPCDet's ``VoxelBackBone8x``).

    Input: a ``(z, y, x)`` grid, for KITTI ``[41, 1600, 1408]``. Output: the stride-8
    tensor of ``conv_out`` (``features[4]`` channels); ``bev_features`` turns it into
    ``[B, H, W, C * D]``. ``features`` defaults to OpenPCDet's 16-32-64-64-128.
    ``out_capacities`` are the row capacities of the four strided convs, as multiples
    of their input capacity (ints for absolute counts): on KITTI scans the first one
    creates up to 1.7x the input sites, later ones at most 0.8x.
    """
    features: Sequence[int] = (16, 32, 64, 64, 128)
    last_padding: int = 0
    out_capacities: Sequence[int | float] = (2.0, 1.0, 1.0, 1.0)
    backend: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    axis_name: str | None = None
    bn_momentum: float = 0.99

    def setup(self):
        c0, c1, c2, c3, c4 = self.features
        cap2, cap3, cap4, cap_out = self.out_capacities
        block = partial(_post_act_block, self)
        self.conv_input = spnn.SparseSequential([
            _conv(self, spnn.SubMConv3d, c0, 3, indice_key="subm1"), _batch_norm(self), nn.relu])
        self.conv1 = spnn.SparseSequential([block(c0, 3, "subm1")])
        self.conv2 = spnn.SparseSequential([block(c1, 3, "spconv2", strides=2, out_capacity=cap2), block(c1, 3, "subm2"),
                                            block(c1, 3, "subm2")])
        self.conv3 = spnn.SparseSequential([block(c2, 3, "spconv3", strides=2, out_capacity=cap3), block(c2, 3, "subm3"),
                                            block(c2, 3, "subm3")])
        self.conv4 = spnn.SparseSequential([block(c3, 3, "spconv4", strides=2, padding=(0, 1, 1), out_capacity=cap4),
                                            block(c3, 3, "subm4"), block(c3, 3, "subm4")])
        self.conv_out = spnn.SparseSequential([
            _conv(self, spnn.SparseConv3d, c4, (3, 1, 1), strides=(2, 1, 1), padding=self.last_padding,
                  indice_key="spconv_down2", out_capacity=cap_out),
            _batch_norm(self), nn.relu])

    def __call__(self, x: SparseConvTensor, train: bool = False) -> SparseConvTensor:
        for stage in (self.conv_input, self.conv1, self.conv2, self.conv3, self.conv4, self.conv_out):
            x = stage(x, use_running_average=not train)
        return x


def bev_features(x: SparseConvTensor) -> jax.Array:
    """``[B, H, W, C * D]`` bird's-eye view of a ``(z, y, x)`` tensor (OpenPCDet's
    ``HeightCompression``: channel ``c * D + d``)."""
    dense = x.dense()  # [B, D, H, W, C]
    b, d, h, w, c = dense.shape
    return jnp.transpose(dense, (0, 2, 3, 4, 1)).reshape(b, h, w, c * d)
