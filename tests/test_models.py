"""Reference models: parameter names and shapes, rulebook reuse, training on a real
labeled scan, one compilation per capacity, and checkpoint round trips."""


import flax.linen as nn
import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jax_sparseconv as jsc
from jax_sparseconv import models
from jax_sparseconv.backends import ffi, xla

NUM_CLASSES = 20  # SemanticKITTI learning ids (see conftest.py)


def test_parameter_names_and_shapes_are_stable(tiny_unet):
    x = jsc.SparseConvTensor(jnp.zeros((4, 4)), -jnp.ones((4, 4), jnp.int32), (20, 100, 100), 1)
    variables = jax.eval_shape(tiny_unet().init, jax.random.key(0), x)
    shapes = {"/".join(k.key for k in path): v.shape
              for path, v in jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
    assert len(shapes) == 71
    assert shapes["stem1_conv/kernel"] == (3, 3, 3, 4, 8)
    assert shapes["stem2_bn/scale"] == (8,)
    assert shapes["down1_conv/kernel"] == (2, 2, 2, 8, 8)
    assert shapes["encoder3_block0/conv2/kernel"] == (3, 3, 3, 16, 16)
    assert shapes["up1_conv/kernel"] == (2, 2, 2, 16, 16)
    assert shapes["decoder1_block0/conv1/kernel"] == (3, 3, 3, 32, 16)  # after concatenating the skip
    assert shapes["decoder1_block0/shortcut/kernel"] == (32, 16)
    assert shapes["decoder3_block0/conv1/kernel"] == (3, 3, 3, 16, 8)
    assert shapes["classifier/kernel"] == (8, NUM_CLASSES)
    assert set(variables["batch_stats"]["stem1_bn"]) == {"mean", "var"}

    x = jsc.SparseConvTensor(jnp.zeros((4, 4)), -jnp.ones((4, 4), jnp.int32), (41, 1600, 1408), 1)
    variables = jax.eval_shape(models.VoxelBackBone8x().init, jax.random.key(0), x)
    params = variables["params"]
    assert set(params) == {"conv_input", "conv1", "conv2", "conv3", "conv4", "conv_out"}
    assert params["conv_input"]["layers_0"]["kernel"].shape == (3, 3, 3, 4, 16)
    assert params["conv2"]["layers_0"]["layers_0"]["kernel"].shape == (3, 3, 3, 16, 32)
    assert params["conv4"]["layers_2"]["layers_1"]["scale"].shape == (64,)
    assert params["conv_out"]["layers_0"]["kernel"].shape == (3, 1, 1, 64, 128)
    assert variables["batch_stats"]["conv_out"]["layers_1"]["var"].shape == (128,)


@pytest.mark.parametrize("backend", ["xla", "ffi"])
@pytest.mark.parametrize("name", ["unet", "backbone"])
def test_each_rulebook_is_built_once_per_forward_pass(name, backend, monkeypatch, labeled_scan, tiny_unet):
    x, _ = labeled_scan(voxel_size=(0.4, 0.4, 0.2))  # 40 voxels high: enough for the backbone's 4 z-strides
    model = tiny_unet(backend) if name == "unet" else models.VoxelBackBone8x(features=(4, 4, 4, 4, 4),
                                                                            backend=backend)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    impl = {"xla": xla, "ffi": ffi}[backend]
    builds = []
    original = impl.build_rulebook
    monkeypatch.setattr(impl, "build_rulebook", lambda *a: builds.append(a[1].mode) or original(*a))
    jax.jit(model.apply).lower(variables, x)  # tracing is enough to count them
    if name == "unet":  # subm0..3 and down1..3; the three inverse convs reuse down1..3
        assert sorted(builds) == ["regular"] * 3 + ["subm"] * 4
    else:  # subm1..4 and spconv2, spconv3, spconv4, spconv_down2
        assert sorted(builds) == ["regular"] * 4 + ["subm"] * 4


def _train_step(model, optimizer):
    def loss_fn(params, batch_stats, x, labels):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
        weights = (labels > 0).astype(jnp.float32)  # padding (-1) and unlabeled (0) voxels do not count
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.features, jnp.maximum(labels, 0))
        return jnp.sum(losses * weights) / jnp.sum(weights), updates["batch_stats"]

    @jax.jit
    def step(params, batch_stats, opt_state, x, labels):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return step


@pytest.mark.parametrize("backend", ["ffi", pytest.param("xla", marks=pytest.mark.slow)])
def test_training_lowers_the_loss_on_a_real_scan(backend, labeled_scan, tiny_unet):
    x, labels = labeled_scan()
    model = tiny_unet(backend)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    params, batch_stats = variables["params"], variables["batch_stats"]
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)
    step = _train_step(model, optimizer)
    losses = []
    for _ in range(12):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x, labels)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.6 * losses[0], losses
    assert step._cache_size() == 1


@pytest.mark.parametrize("backend", ["ffi", pytest.param("xla", marks=pytest.mark.slow)])
def test_padding_rows_reach_no_loss_or_gradient(backend, labeled_scan, tiny_unet):
    """A training step's loss, gradients and batch statistics are bitwise the same whatever the
    input's padding rows hold (NaN, inf): every layer of a network keeps them out."""
    x, labels = labeled_scan()
    x = x.pad_to(x.capacity + 64)
    labels = jnp.concatenate([labels, jnp.full((64,), -1, labels.dtype)])
    padding = ~x.active[:, None]
    garbage = jnp.where(padding, jnp.where(jnp.arange(x.num_channels) % 2, jnp.nan, jnp.inf), x.features)
    model = tiny_unet(backend)
    variables = jax.jit(model.init)(jax.random.key(0), x)

    @jax.jit
    def loss_and_grads(features):
        def loss_fn(params):
            t = jsc.SparseConvTensor(features, x.indices, x.spatial_shape, x.batch_size, validate=False)
            logits, updates = model.apply({**variables, "params": params}, t, train=True, mutable=["batch_stats"])
            losses = optax.softmax_cross_entropy_with_integer_labels(logits.features, jnp.maximum(labels, 0))
            return jnp.sum(jnp.where(labels > 0, losses, 0)), updates
        return jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])

    clean, dirty = loss_and_grads(x.features), loss_and_grads(garbage)
    assert np.isfinite(clean[0][0])
    for want, got in zip(jax.tree_util.tree_leaves(clean), jax.tree_util.tree_leaves(dirty)):
        np.testing.assert_array_equal(got, want)


def test_backbone_trains_on_a_bev_target(labeled_scan):
    """A detector-style head on the BEV map learns which columns hold points at stride 8."""
    x, _ = labeled_scan(voxel_size=(0.4, 0.4, 0.2))

    class Detector(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            features = models.VoxelBackBone8x(features=(4, 8, 8, 8, 8), name="backbone")(x, train)
            return nn.Dense(1)(models.bev_features(features))[..., 0], features

    model = Detector()
    variables = jax.jit(model.init, static_argnums=2)(jax.random.key(0), x, False)
    _, out = jax.jit(model.apply, static_argnums=2)(variables, x, False)
    target = jnp.any(out.dense() != 0, axis=(1, 4)).astype(jnp.float32)  # [B, H, W] occupied columns
    optimizer = optax.adam(3e-2)

    def loss_fn(params, batch_stats):
        (logits, _), updates = model.apply({"params": params, "batch_stats": batch_stats}, x, True,
                                           mutable=["batch_stats"])
        return optax.sigmoid_binary_cross_entropy(logits, target).mean(), updates["batch_stats"]

    @jax.jit
    def step(params, batch_stats, opt_state):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = optimizer.init(params)
    losses = []
    for _ in range(8):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses


def test_scans_of_one_capacity_share_one_compilation(labeled_scan, tiny_unet):
    crops = [(-20.0, -110.0, -4.0, 20.0, -70.0, 4.0), (-25.0, -105.0, -4.0, 15.0, -65.0, 4.0),
             (-15.0, -115.0, -4.0, 25.0, -75.0, 4.0)]
    scans = [labeled_scan(crop, capacity=8192) for crop in crops]
    assert len({int(x.num_active) for x, _ in scans}) == 3
    model = tiny_unet()
    variables = jax.jit(model.init)(jax.random.key(0), scans[0][0])
    forward = jax.jit(model.apply)
    for x, _ in scans:
        jsc.check_overflow(forward(variables, x))
    assert forward._cache_size() == 1


def test_checkpoints_round_trip(tmp_path, labeled_scan, tiny_unet):
    x, _ = labeled_scan()
    model = tiny_unet()
    variables = jax.jit(model.init)(jax.random.key(3), x)
    expected = jax.jit(model.apply)(variables, x).features

    empty = jax.tree_util.tree_map(jnp.zeros_like, variables)
    restored = flax.serialization.from_bytes(empty, flax.serialization.to_bytes(variables))
    np.testing.assert_array_equal(np.asarray(jax.jit(model.apply)(restored, x).features), np.asarray(expected))

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", variables)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "ckpt", empty)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, variables)


@pytest.mark.parametrize("make", ["unet", "backbone"])
def test_bn_momentum_reaches_every_batch_norm(make, labeled_scan, tiny_unet):
    """Running averages after one training call: with momentum m they are m * initial +
    (1 - m) * batch statistics, so m = 0.9 and m = 0 determine each other."""
    x, _ = labeled_scan(voxel_size=(0.4, 0.4, 0.2))
    build = (lambda m: tiny_unet(bn_momentum=m)) if make == "unet" else \
        (lambda m: models.VoxelBackBone8x(features=(4, 4, 4, 4, 4), bn_momentum=m))
    variables = jax.jit(build(0.9).init)(jax.random.key(0), x)
    stats = {m: build(m).apply(variables, x, train=True, mutable=["batch_stats"])[1]["batch_stats"]
             for m in (0.9, 0.0)}
    flat = {m: flax.traverse_util.flatten_dict(s) for m, s in stats.items()}
    assert len(flat[0.9]) > 4
    for path, new in flat[0.9].items():
        initial = 1.0 if path[-1] == "var" else 0.0
        np.testing.assert_allclose(new, 0.9 * initial + 0.1 * flat[0.0][path], rtol=1e-5, atol=1e-6)
