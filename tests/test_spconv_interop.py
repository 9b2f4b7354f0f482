"""spconv weights in our models: the same network in spconv (PyTorch, CPU, forward) and
in jax_sparseconv with converted weights gives the same output on a real KITTI scan.

spconv 2.3.8 with torch 2.13.0 (CPU) is an optional dependency: without it these tests
skip, except under CI (``CI`` set), which installs it and where a skip would hide a gap;
CI's run on a Python that has no CPU torch wheel here sets ``JSC_CI_WITHOUT_SPCONV``.
spconv runs with one thread: its multi-threaded CPU path races.
"""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

import jax_sparseconv as jsc
import spconv_twins
from jax_sparseconv import linen as spnn
from jax_sparseconv import models
from jax_sparseconv import nnx as spnnx
from jax_sparseconv import utils

if os.environ.get("CI") and not os.environ.get("JSC_CI_WITHOUT_SPCONV"):
    import spconv.pytorch as sp
    import torch
else:
    torch = pytest.importorskip("torch")
    sp = pytest.importorskip("spconv.pytorch")

CHANNELS = (8, 16, 16, 24, 32)


@pytest.fixture(scope="module")
def scan(shared_data):
    return utils.kitti_tensor([shared_data("kitti/000000.bin")], voxel_size=(0.05, 0.05, 0.1))


def _run_spconv(module, x):
    torch.set_num_threads(1)
    with torch.no_grad():
        out = module(spconv_twins.to_spconv(x))
    return out.indices.numpy(), out.features.numpy()


def _rows_by_site(indices, features):
    order = np.lexsort(indices.T[::-1])
    return indices[order], features[order]


def _assert_same_rows(ours: jsc.SparseConvTensor, theirs):
    active = np.asarray(ours.active)
    our_idx, our_f = _rows_by_site(np.asarray(ours.indices)[active], np.asarray(ours.features)[active])
    their_idx, their_f = _rows_by_site(*theirs)
    np.testing.assert_array_equal(our_idx, their_idx)
    scale = np.abs(their_f).max()
    np.testing.assert_allclose(our_f, their_f, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("backend", ["ffi", pytest.param("xla", marks=pytest.mark.slow)])
def test_voxel_backbone_matches_spconv(scan, backend):
    torch_model = spconv_twins.randomize(spconv_twins.voxel_backbone_8x(scan.num_channels, CHANNELS), seed=1)
    theirs = _run_spconv(torch_model, scan)
    model = models.VoxelBackBone8x(features=CHANNELS, backend=backend)
    variables = model.init(jax.random.key(0), scan)
    variables = jsc.convert.from_spconv(torch_model.state_dict(), variables)
    ours = jax.jit(model.apply)(variables, scan)
    jsc.check_overflow(ours)
    _assert_same_rows(ours, theirs)


def test_mink_unet_matches_spconv(scan):
    sizes = dict(stem_features=8, encoder_features=(8, 16, 16, 24), decoder_features=(16, 16, 8, 8),
                 blocks_per_stage=1)
    torch_model = spconv_twins.randomize(spconv_twins.mink_unet(scan.num_channels, 5, **sizes), seed=3)
    theirs = _run_spconv(torch_model, scan)
    model = models.MinkUNet(5, **sizes)
    variables = jsc.convert.from_spconv(torch_model.state_dict(), model.init(jax.random.key(0), scan))
    ours = jax.jit(model.apply)(variables, scan)
    np.testing.assert_array_equal(np.asarray(ours.indices), np.asarray(scan.indices))
    _assert_same_rows(ours, theirs)


def _torch_unet_like():
    """Strided conv, inverse conv, 1x1x1 SubM (spconv's matrix reading) and a Linear head."""
    return sp.SparseSequential(
        sp.SubMConv3d(4, 8, 3, bias=False, indice_key="subm0"), torch.nn.BatchNorm1d(8, eps=1e-3), torch.nn.ReLU(),
        sp.SparseConv3d(8, 16, 2, stride=2, bias=False, indice_key="down1"), torch.nn.ReLU(),
        sp.SparseInverseConv3d(16, 8, 2, bias=False, indice_key="down1"),
        sp.SubMConv3d(8, 12, 1, bias=False), torch.nn.Linear(12, 5))


class LinenUNetLike(nn.Module):
    def setup(self):
        self.net = spnn.SparseSequential([
            spnn.SubMConv3d(8, 3, use_bias=False, indice_key="subm0"), spnn.SparseBatchNorm(epsilon=1e-3), nn.relu,
            spnn.SparseConv3d(16, 2, strides=2, use_bias=False, indice_key="down1"), nn.relu,
            spnn.SparseInverseConv3d(8, 2, use_bias=False, indice_key="down1"),
            spnn.SubMConv3d(12, 1, use_bias=False), nn.Dense(5)])

    def __call__(self, x):
        return self.net(x, use_running_average=True)


def _nnx_unet_like(rngs):
    return spnnx.SparseSequential(
        spnnx.SubMConv3d(4, 8, 3, use_bias=False, indice_key="subm0", rngs=rngs),
        spnnx.SparseBatchNorm(8, epsilon=1e-3, use_running_average=True, rngs=rngs), nnx.relu,
        spnnx.SparseConv3d(8, 16, 2, 2, use_bias=False, indice_key="down1", rngs=rngs), nnx.relu,
        spnnx.SparseInverseConv3d(16, 8, 2, use_bias=False, indice_key="down1", rngs=rngs),
        spnnx.SubMConv3d(8, 12, 1, use_bias=False, rngs=rngs), nnx.Linear(12, 5, rngs=rngs))


def test_inverse_and_pointwise_layers_match_spconv_in_linen_and_nnx(scan):
    torch_model = spconv_twins.randomize(_torch_unet_like(), seed=2)
    theirs = _run_spconv(torch_model, scan)
    state_dict = {f"net.{k}": v for k, v in torch_model.state_dict().items()}

    linen_model = LinenUNetLike()
    variables = jsc.convert.from_spconv(state_dict, linen_model.init(jax.random.key(0), scan))
    ours = jax.jit(linen_model.apply)(variables, scan)
    _assert_same_rows(ours, theirs)
    np.testing.assert_array_equal(np.asarray(ours.indices), np.asarray(scan.indices))  # input row order kept

    nnx_model = _nnx_unet_like(nnx.Rngs(0))
    state = nnx.state(nnx_model)
    nnx.replace_by_pure_dict(state, jsc.convert.from_spconv(torch_model.state_dict(), nnx.to_pure_dict(state)))
    nnx.update(nnx_model, state)
    nnx_out = nnx.jit(lambda model, x: model(x))(nnx_model, scan)
    np.testing.assert_array_equal(np.asarray(nnx_out.features), np.asarray(ours.features))


def test_converter_names_what_does_not_match(scan):
    torch_model = _torch_unet_like()
    variables = LinenUNetLike().init(jax.random.key(0), scan)
    state_dict = {f"net.{k}": v for k, v in torch_model.state_dict().items()}
    with pytest.raises(ValueError, match="net.7.weight"):
        jsc.convert.from_spconv({**state_dict, "net.7.weight": torch.zeros(5, 13)}, variables)
    with pytest.raises(ValueError, match="no Flax variable params/net/layers_9/kernel"):
        jsc.convert.from_spconv({**state_dict, "net.9.weight": torch.zeros(5, 12)}, variables)
    del state_dict["net.1.running_mean"]
    with pytest.raises(ValueError, match="batch_stats/net/layers_1/mean has no PyTorch tensor"):
        jsc.convert.from_spconv(state_dict, variables)


def test_detection_example_loads_an_openpcdet_checkpoint(scan, tmp_path, load_example):
    """An OpenPCDet-style checkpoint (``model_state`` with ``backbone_3d.*`` among other heads'
    tensors) saved by torch loads into the example's VoxelBackBone8x as from_spconv does."""
    detection = load_example("detection_backbone")
    torch_model = spconv_twins.randomize(spconv_twins.voxel_backbone_8x(scan.num_channels), seed=5)
    state = {f"backbone_3d.{key}": value for key, value in torch_model.state_dict().items()}
    state["dense_head.conv_cls.weight"] = torch.zeros(18, 512, 1, 1)
    torch.save({"model_state": state, "epoch": 80}, tmp_path / "checkpoint.pth")
    variables = jax.jit(models.VoxelBackBone8x().init)(jax.random.key(0), scan)
    loaded = detection.load_backbone_checkpoint(tmp_path / "checkpoint.pth", variables)
    expected = jsc.convert.from_spconv(torch_model.state_dict(), variables)
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="backbone_3d"):
        torch.save({"model_state": {"vfe.weight": torch.zeros(1)}}, tmp_path / "other.pth")
        detection.load_backbone_checkpoint(tmp_path / "other.pth", variables)
