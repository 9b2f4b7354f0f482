"""spconv (PyTorch) twins of ``jax_sparseconv.models``, for the comparisons in tests and benchmarks.

Same layers, same order, same module names, so ``jsc.convert.from_spconv`` maps their
``state_dict()`` onto the Flax models' variables. Needs the optional ``compare`` extra
(``pip install ".[compare]"``: spconv 2.3.8, torch 2.13.0); torch is imported on first use.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jax_sparseconv.tensor import SparseConvTensor


def _modules():
    import spconv.pytorch as sp
    import torch
    return sp, torch


def to_spconv(x: SparseConvTensor):
    """The active rows of ``x`` as a ``spconv.pytorch.SparseConvTensor`` (same row order)."""
    sp, torch = _modules()
    active = np.asarray(x.active)
    return sp.SparseConvTensor(torch.from_numpy(np.asarray(x.features)[active].copy()),
                               torch.from_numpy(np.asarray(x.indices)[active].copy()), list(x.spatial_shape),
                               x.batch_size)


def randomize(module, seed: int):
    """``module`` in eval mode with random weights everywhere and batch norms with non-trivial
    statistics. Conv and linear weights have variance 1 / fan-in, so that activations keep their
    scale through a deep network (finite outputs to compare)."""
    _, torch = _modules()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith(("running_var", "weight")) and tensor.ndim == 1:
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif tensor.ndim >= 2:  # [out, ..., in]: every entry but the first axis feeds one output
                fan_in = tensor.numel() // tensor.shape[0]
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in**0.5)
            else:
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))
    return module.eval()


def _batch_norm(channels: int):
    _, torch = _modules()
    return torch.nn.BatchNorm1d(channels, eps=1e-3, momentum=0.01)


def voxel_backbone_8x(in_features: int, features: Sequence[int] = (16, 32, 64, 64, 128), last_padding: int = 0):
    """OpenPCDet's ``VoxelBackBone8x`` (its code structure and names), twin of ``models.VoxelBackBone8x``."""
    sp, torch = _modules()
    c0, c1, c2, c3, c4 = features

    def block(cin, cout, key, stride=None, padding=1):
        if stride is None:
            conv = sp.SubMConv3d(cin, cout, 3, bias=False, indice_key=key)
        else:
            conv = sp.SparseConv3d(cin, cout, 3, stride=stride, padding=padding, bias=False, indice_key=key)
        return sp.SparseSequential(conv, _batch_norm(cout), torch.nn.ReLU())

    class VoxelBackBone8x(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_input = sp.SparseSequential(sp.SubMConv3d(in_features, c0, 3, padding=1, bias=False,
                                                                indice_key="subm1"), _batch_norm(c0), torch.nn.ReLU())
            self.conv1 = sp.SparseSequential(block(c0, c0, "subm1"))
            self.conv2 = sp.SparseSequential(block(c0, c1, "spconv2", 2), block(c1, c1, "subm2"),
                                             block(c1, c1, "subm2"))
            self.conv3 = sp.SparseSequential(block(c1, c2, "spconv3", 2), block(c2, c2, "subm3"),
                                             block(c2, c2, "subm3"))
            self.conv4 = sp.SparseSequential(block(c2, c3, "spconv4", 2, (0, 1, 1)), block(c3, c3, "subm4"),
                                             block(c3, c3, "subm4"))
            self.conv_out = sp.SparseSequential(
                sp.SparseConv3d(c3, c4, (3, 1, 1), stride=(2, 1, 1), padding=last_padding, bias=False,
                                indice_key="spconv_down2"), _batch_norm(c4), torch.nn.ReLU())

        def forward(self, x):
            for stage in (self.conv_input, self.conv1, self.conv2, self.conv3, self.conv4, self.conv_out):
                x = stage(x)
            return x

    return VoxelBackBone8x()


def mink_unet(in_features: int, num_classes: int, stem_features: int = 32,
              encoder_features: Sequence[int] = (32, 64, 128, 256),
              decoder_features: Sequence[int] = (256, 128, 96, 96), blocks_per_stage: int = 2):
    """Twin of ``models.MinkUNet`` (same arguments after ``in_features``)."""
    sp, torch = _modules()
    relu = torch.nn.functional.relu

    class ResidualBlock(torch.nn.Module):
        def __init__(self, cin, cout, key):
            super().__init__()
            self.conv1 = sp.SubMConv3d(cin, cout, 3, bias=False, indice_key=key)
            self.bn1 = _batch_norm(cout)
            self.conv2 = sp.SubMConv3d(cout, cout, 3, bias=False, indice_key=key)
            self.bn2 = _batch_norm(cout)
            if cin != cout:
                self.shortcut = torch.nn.Linear(cin, cout, bias=False)
                self.shortcut_bn = _batch_norm(cout)

        def forward(self, x):
            y = self.conv1(x)
            y = y.replace_feature(relu(self.bn1(y.features)))
            y = self.conv2(y)
            shortcut = x.features
            if hasattr(self, "shortcut"):
                shortcut = self.shortcut_bn(self.shortcut(shortcut))
            return y.replace_feature(relu(self.bn2(y.features) + shortcut))

    class MinkUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            levels = len(encoder_features)
            self.stem1_conv = sp.SubMConv3d(in_features, stem_features, 3, bias=False, indice_key="subm0")
            self.stem1_bn = _batch_norm(stem_features)
            self.stem2_conv = sp.SubMConv3d(stem_features, stem_features, 3, bias=False, indice_key="subm0")
            self.stem2_bn = _batch_norm(stem_features)
            widths = [stem_features]
            cin = stem_features
            for level, cout in enumerate(encoder_features, start=1):
                setattr(self, f"down{level}_conv", sp.SparseConv3d(cin, cout, 2, stride=2, bias=False,
                                                                   indice_key=f"down{level}"))
                setattr(self, f"down{level}_bn", _batch_norm(cout))
                for b in range(blocks_per_stage):
                    setattr(self, f"encoder{level}_block{b}", ResidualBlock(cout, cout, f"subm{level}"))
                widths.append(cout)
                cin = cout
            for stage, cout in enumerate(decoder_features, start=1):
                level = levels - stage + 1
                setattr(self, f"up{stage}_conv", sp.SparseInverseConv3d(cin, cout, 2, bias=False,
                                                                        indice_key=f"down{level}"))
                setattr(self, f"up{stage}_bn", _batch_norm(cout))
                block_in = cout + widths[level - 1]
                for b in range(blocks_per_stage):
                    setattr(self, f"decoder{stage}_block{b}", ResidualBlock(block_in, cout, f"subm{level - 1}"))
                    block_in = cout
                cin = cout
            self.classifier = torch.nn.Linear(cin, num_classes)

        def _conv_bn_relu(self, name, x):
            x = getattr(self, f"{name}_conv")(x)
            return x.replace_feature(relu(getattr(self, f"{name}_bn")(x.features)))

        def forward(self, x):
            y = self._conv_bn_relu("stem2", self._conv_bn_relu("stem1", x))
            skips = []
            levels = len(encoder_features)
            for level in range(1, levels + 1):
                skips.append(y)
                y = self._conv_bn_relu(f"down{level}", y)
                for b in range(blocks_per_stage):
                    y = getattr(self, f"encoder{level}_block{b}")(y)
            for stage in range(1, len(decoder_features) + 1):
                level = levels - stage + 1
                y = self._conv_bn_relu(f"up{stage}", y)
                y = y.replace_feature(torch.cat([y.features, skips[level - 1].features], dim=1))
                for b in range(blocks_per_stage):
                    y = getattr(self, f"decoder{stage}_block{b}")(y)
            return y.replace_feature(self.classifier(y.features))

    return MinkUNet()
