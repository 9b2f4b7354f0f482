"""Masked normalization (functional, Linen, NNX) against numpy float64 references over the
active rows only: batch norm (training, eval, running averages, cross-device statistics),
layer norm, group norm, Linen == NNX bitwise, and bfloat16 features."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from flax import nnx

import jax_sparseconv as jsc
from jax_sparseconv import linen as spnn
from jax_sparseconv import normalization as N
from jax_sparseconv import nnx as spnnx
import sparse_testing as T

SHAPE = (6, 7, 5)


def _tensor(rng, batch_size=2, channels=4, dtype=np.float32, **kwargs):
    x = T.random_tensor(rng, batch_size, SHAPE, channels, dtype=dtype, **kwargs)
    # An offset and a spread per channel, so a wrong mean or variance shows.
    shift = rng.normal(size=channels) * 3
    spread = rng.uniform(0.5, 4.0, size=channels)
    return x.replace_feature((x.features.astype(jnp.float32) * spread + shift).astype(dtype))


def _active_rows(x) -> np.ndarray:
    return np.asarray(x.features, np.float64)[np.asarray(x.active)]


def _np_normalize(rows, mean, var, epsilon, scale, bias):
    return (rows - mean) / np.sqrt(var + epsilon) * scale + bias


def _affine(rng, channels):
    scale = rng.uniform(0.5, 2.0, size=channels).astype(np.float32)
    bias = rng.normal(size=channels).astype(np.float32)
    return scale, bias


def _check_output(y, x, expected_active_rows, rtol=2e-5, atol=2e-5):
    """Active rows equal the reference, padding rows are zero, the sites are unchanged."""
    active = np.asarray(x.active)
    features = np.asarray(y.features, np.float64)
    np.testing.assert_array_equal(y.indices, x.indices)
    np.testing.assert_allclose(features[active], expected_active_rows, rtol=rtol, atol=atol)
    assert not features[~active].any(), "padding rows must stay zero"


# ---- batch norm (Linen) ---------------------------------------------------------------------

def _batch_norm_variables(rng, channels):
    scale, bias = _affine(rng, channels)
    return {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)},
            "batch_stats": {"mean": jnp.asarray(rng.normal(size=channels), jnp.float32),
                            "var": jnp.asarray(rng.uniform(0.5, 2.0, size=channels), jnp.float32)}}


@pytest.mark.parametrize("batch_size, channels, momentum, epsilon", [(1, 3, 0.9, 1e-5), (2, 5, 0.99, 1e-3),
                                                                     (3, 8, 0.5, 1e-2)])
def test_linen_batch_norm_training_matches_numpy(batch_size, channels, momentum, epsilon, rng):
    x = _tensor(rng, batch_size, channels, padding_rows=int(rng.integers(1, 8)))
    model = spnn.SparseBatchNorm(momentum=momentum, epsilon=epsilon)
    initial = model.init(jax.random.key(0), x, use_running_average=True)
    assert set(initial) == {"params", "batch_stats"}
    np.testing.assert_array_equal(initial["batch_stats"]["var"], np.ones(channels))
    variables = _batch_norm_variables(rng, channels)
    params, stats = variables["params"], variables["batch_stats"]
    train = jax.jit(functools.partial(model.apply, use_running_average=False, mutable=["batch_stats"]))

    y, updates = train(variables, x)
    rows = _active_rows(x)
    mean, var = rows.mean(0), rows.var(0)  # biased variance, active rows only
    _check_output(y, x, _np_normalize(rows, mean, var, epsilon, params["scale"], params["bias"]))
    np.testing.assert_allclose(updates["batch_stats"]["mean"], momentum * np.asarray(stats["mean"]) +
                               (1 - momentum) * mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["var"], momentum * np.asarray(stats["var"]) +
                               (1 - momentum) * var, rtol=1e-5, atol=1e-5)
    assert updates["batch_stats"]["mean"].dtype == jnp.float32

    # More padding rows change nothing: they are not counted.
    padded = x.pad_to(x.capacity + 50)
    y_padded, updates_padded = train(variables, padded)
    np.testing.assert_allclose(y_padded.features[:x.capacity], y.features, rtol=1e-5, atol=1e-5)
    assert not np.asarray(y_padded.features[x.capacity:]).any()
    for key in ("mean", "var"):
        np.testing.assert_allclose(updates_padded["batch_stats"][key], updates["batch_stats"][key], rtol=1e-5,
                                   atol=1e-6)

    # Eval mode normalizes with the running averages and leaves them alone.
    y_eval = jax.jit(functools.partial(model.apply, use_running_average=True))(variables, x)
    _check_output(y_eval, x, _np_normalize(rows, np.asarray(stats["mean"]), np.asarray(stats["var"]), epsilon,
                                           params["scale"], params["bias"]))
    _, unchanged = model.apply(variables, x, use_running_average=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(unchanged["batch_stats"]["mean"], stats["mean"])


@pytest.mark.parametrize("use_scale, use_bias", [(False, True), (True, False), (False, False)])
def test_linen_batch_norm_without_affine(use_scale, use_bias, rng):
    x = _tensor(rng)
    model = spnn.SparseBatchNorm(use_scale=use_scale, use_bias=use_bias, use_running_average=False)
    variables = model.init(jax.random.key(0), x)
    assert set(variables.get("params", {})) == {n for n, used in (("scale", use_scale), ("bias", use_bias)) if used}
    scale, bias = _affine(rng, x.num_channels)
    variables = {"params": {k: jnp.asarray(v) for k, v in (("scale", scale), ("bias", bias))
                            if k in variables.get("params", {})}, "batch_stats": variables["batch_stats"]}
    y, _ = jax.jit(functools.partial(model.apply, mutable=["batch_stats"]))(variables, x)
    rows = _active_rows(x)
    _check_output(y, x, _np_normalize(rows, rows.mean(0), rows.var(0), 1e-5, scale if use_scale else 1,
                                      bias if use_bias else 0))


# ---- cross-device statistics ---------------------------------------------------------------------

def _device_tensors(rng, channels, sizes=(0.05, 0.3, 0.7)):
    """Three tensors with clearly different numbers of active rows, padded to one capacity."""
    xs = [_tensor(rng, 2, channels, density=d) for d in sizes]
    capacity = max(x.capacity for x in xs) + 5
    xs = [x.pad_to(capacity) for x in xs]
    assert len({int(x.num_active) for x in xs}) == 3
    return xs


def test_masked_moments_matches_numpy_and_psums_across_devices(rng):
    xs = _device_tensors(rng, 5)
    for x in xs:  # one device
        rows = _active_rows(x)
        mean, var = jax.jit(N.masked_moments)(x.features, x.active)
        np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(var, rows.var(0), rtol=1e-5, atol=1e-5)

    features = jnp.stack([x.features for x in xs])
    active = jnp.stack([x.active for x in xs])
    moments = jax.jit(jax.vmap(functools.partial(N.masked_moments, axis_name="d"), axis_name="d"))
    mean, var = moments(features, active)
    rows = np.concatenate([_active_rows(x) for x in xs])  # all devices' rows, weighted by count
    for d in range(3):
        np.testing.assert_allclose(mean[d], rows.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(var[d], rows.var(0), rtol=1e-5, atol=1e-5)
    # Not the mean of per-device means: the devices hold different numbers of rows.
    per_device = np.mean([_active_rows(x).mean(0) for x in xs], axis=0)
    assert np.abs(per_device - rows.mean(0)).max() > 1e-3


def test_linen_batch_norm_with_axis_name_under_vmap(rng):
    xs = _device_tensors(rng, 4)
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *xs)
    momentum, epsilon = 0.9, 1e-4
    model = spnn.SparseBatchNorm(momentum=momentum, epsilon=epsilon, axis_name="d")
    initial = model.init(jax.random.key(0), xs[0], use_running_average=False)  # init runs outside the vmap
    assert set(initial["batch_stats"]) == {"mean", "var"}
    variables = _batch_norm_variables(rng, 4)
    step = jax.jit(jax.vmap(lambda x: model.apply(variables, x, use_running_average=False, mutable=["batch_stats"]),
                            axis_name="d"))
    y, updates = step(stacked)
    rows = np.concatenate([_active_rows(x) for x in xs])
    mean, var = rows.mean(0), rows.var(0)
    params, stats = variables["params"], variables["batch_stats"]
    for d, x in enumerate(xs):
        y_d = jax.tree_util.tree_map(lambda a: a[d], y)
        _check_output(y_d, x, _np_normalize(_active_rows(x), mean, var, epsilon, params["scale"], params["bias"]))
        np.testing.assert_allclose(updates["batch_stats"]["mean"][d],
                                   momentum * np.asarray(stats["mean"]) + (1 - momentum) * mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(updates["batch_stats"]["var"][d],
                                   momentum * np.asarray(stats["var"]) + (1 - momentum) * var, rtol=1e-5, atol=1e-5)


# ---- layer norm and group norm ------------------------------------------------------------------

@pytest.mark.parametrize("channels, epsilon", [(1, 1e-6), (3, 1e-6), (8, 1e-2)])
def test_linen_layer_norm_matches_numpy(channels, epsilon, rng):
    x = _tensor(rng, 2, channels)
    model = spnn.SparseLayerNorm(epsilon=epsilon)
    assert set(model.init(jax.random.key(0), x)["params"]) == {"scale", "bias"}
    scale, bias = _affine(rng, channels)
    y = jax.jit(model.apply)({"params": {"scale": scale, "bias": bias}}, x)
    rows = _active_rows(x)
    mean, var = rows.mean(1, keepdims=True), rows.var(1, keepdims=True)  # per row, over the channels
    _check_output(y, x, _np_normalize(rows, mean, var, epsilon, scale, bias))

    mean, var = jax.jit(N.layer_norm_moments)(x.features)
    assert mean.shape == var.shape == (x.capacity, 1)
    np.testing.assert_allclose(np.asarray(mean)[np.asarray(x.active)], rows.mean(1, keepdims=True), rtol=1e-5,
                               atol=1e-5)


def _np_group_norm(x, num_groups, epsilon, scale, bias):
    """Per batch item and channel group: normalize over all its active rows and the group's channels."""
    features, indices = np.asarray(x.features, np.float64), np.asarray(x.indices)
    out = np.zeros_like(features)
    size = features.shape[1] // num_groups
    for b in range(x.batch_size):
        rows = indices[:, 0] == b
        for g in range(num_groups):
            cols = slice(g * size, (g + 1) * size)
            block = features[rows, cols]
            if block.size:
                out[rows, cols] = (block - block.mean()) / np.sqrt(block.var() + epsilon)
    return out * scale + bias


@pytest.mark.parametrize("batch_size, channels, num_groups", [(2, 6, 3), (3, 8, 2), (2, 4, 4), (3, 6, 1)])
def test_linen_group_norm_matches_numpy(batch_size, channels, num_groups, rng):
    epsilon = 1e-5
    x = _tensor(rng, batch_size, channels, density=float(rng.uniform(0.05, 0.4)))
    model = spnn.SparseGroupNorm(num_groups=num_groups, epsilon=epsilon)
    scale, bias = _affine(rng, channels)
    y = jax.jit(model.apply)({"params": {"scale": scale, "bias": bias}}, x)
    expected = _np_group_norm(x, num_groups, epsilon, scale, bias)
    _check_output(y, x, expected[np.asarray(x.active)])
    # More padding rows change nothing.
    y_padded = jax.jit(model.apply)({"params": {"scale": scale, "bias": bias}}, x.pad_to(x.capacity + 40))
    np.testing.assert_allclose(y_padded.features[:x.capacity], y.features, rtol=1e-5, atol=1e-5)
    assert not np.asarray(y_padded.features[x.capacity:]).any()


def test_group_norm_with_an_empty_batch_item(rng):
    x = _tensor(rng, 3, 4)
    keep = np.asarray(x.indices[:, 0]) != 1  # batch item 1 has no sites
    x = jsc.SparseConvTensor(jnp.where(keep[:, None], x.features, 0), jnp.where(keep[:, None], x.indices, -1),
                             x.spatial_shape, 3)
    scale, bias = _affine(rng, 4)
    y = jax.jit(spnn.SparseGroupNorm(num_groups=2).apply)({"params": {"scale": scale, "bias": bias}}, x)
    _check_output(y, x, _np_group_norm(x, 2, 1e-6, scale, bias)[np.asarray(x.active)])
    assert np.isfinite(np.asarray(y.features)).all()


def test_group_norm_channels_not_divisible_raise(rng):
    x = _tensor(rng, 2, 6)
    with pytest.raises(ValueError, match="6 channels do not split into 4 groups"):
        spnn.SparseGroupNorm(num_groups=4).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="do not split"):
        spnnx.SparseGroupNorm(6, num_groups=4, rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match="do not split"):
        N.group_norm_moments(x.features, jnp.maximum(x.indices[:, 0], 0), 2, 5)


# ---- NNX equals Linen ------------------------------------------------------------------------------

def _set(variable, value):
    variable[...] = jnp.asarray(value)


def test_nnx_batch_norm_matches_linen(rng):
    x = _tensor(rng, 2, 5)
    momentum, epsilon = 0.8, 1e-3
    variables = _batch_norm_variables(rng, 5)
    linen = spnn.SparseBatchNorm(momentum=momentum, epsilon=epsilon)
    model = spnnx.SparseBatchNorm(5, momentum=momentum, epsilon=epsilon, rngs=nnx.Rngs(0))
    for name in ("scale", "bias"):
        _set(getattr(model, name), variables["params"][name])
    for name in ("mean", "var"):
        _set(getattr(model, name), variables["batch_stats"][name])

    # Eval mode.
    y_linen = jax.jit(functools.partial(linen.apply, use_running_average=True))(variables, x)
    y_nnx = nnx.jit(lambda m, x: m(x, use_running_average=True))(model, x)
    np.testing.assert_array_equal(y_nnx.features, y_linen.features)
    np.testing.assert_array_equal(y_nnx.indices, x.indices)
    np.testing.assert_array_equal(model.mean[...], variables["batch_stats"]["mean"])

    # Training mode, twice: outputs and running averages agree bitwise at each step.
    train_linen = jax.jit(functools.partial(linen.apply, use_running_average=False, mutable=["batch_stats"]))
    train_nnx = nnx.jit(lambda m, x: m(x))  # NNX batch norm defaults to training mode
    for step in range(2):
        x_step = _tensor(rng, 2, 5) if step else x
        y_linen, updates = train_linen(variables, x_step)
        y_nnx = train_nnx(model, x_step)
        np.testing.assert_array_equal(y_nnx.features, y_linen.features)
        np.testing.assert_array_equal(model.mean[...], updates["batch_stats"]["mean"])
        np.testing.assert_array_equal(model.var[...], updates["batch_stats"]["var"])
        variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    rows = _active_rows(x_step)
    assert not np.allclose(np.asarray(model.mean[...]), rows.mean(0))  # a moving average, not the batch mean


@pytest.mark.parametrize("kind", ["layer", "group"])
def test_nnx_layer_and_group_norm_match_linen(kind, rng):
    channels = 6
    x = _tensor(rng, 3, channels)
    scale, bias = _affine(rng, channels)
    if kind == "layer":
        linen = spnn.SparseLayerNorm(epsilon=1e-4)
        model = spnnx.SparseLayerNorm(channels, epsilon=1e-4, rngs=nnx.Rngs(0))
    else:
        linen = spnn.SparseGroupNorm(num_groups=3, epsilon=1e-4)
        model = spnnx.SparseGroupNorm(channels, 3, epsilon=1e-4, rngs=nnx.Rngs(0))
    _set(model.scale, scale)
    _set(model.bias, bias)
    y_linen = jax.jit(linen.apply)({"params": {"scale": scale, "bias": bias}}, x)
    y_nnx = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_array_equal(y_nnx.features, y_linen.features)
    np.testing.assert_array_equal(y_nnx.indices, x.indices)


# ---- bfloat16 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["batch", "layer", "group"])
def test_bfloat16_features(kind, rng):
    x16 = _tensor(rng, 2, 4, dtype=jnp.bfloat16)
    x32 = x16.replace_feature(x16.features.astype(jnp.float32))  # the same values, exactly
    scale, bias = _affine(rng, 4)
    params = {"scale": scale, "bias": bias}
    if kind == "batch":
        model = spnn.SparseBatchNorm(use_running_average=False, momentum=0.5)
        variables = {"params": params, "batch_stats": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}
        apply = jax.jit(functools.partial(model.apply, mutable=["batch_stats"]))
        (y16, stats16), (y32, stats32) = apply(variables, x16), apply(variables, x32)
        # Statistics of bfloat16 features are computed in float32: the same as from the float32 copy.
        for key in ("mean", "var"):
            assert stats16["batch_stats"][key].dtype == jnp.float32
            np.testing.assert_allclose(stats16["batch_stats"][key], stats32["batch_stats"][key], rtol=1e-5,
                                       atol=1e-6)
        mean, var = N.masked_moments(x16.features, x16.active)
        rows = _active_rows(x32)
        assert mean.dtype == var.dtype == jnp.float32
        np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-5, atol=1e-5)  # not bf16-rounded
        np.testing.assert_allclose(var, rows.var(0), rtol=1e-5, atol=1e-5)
    else:
        model = spnn.SparseLayerNorm() if kind == "layer" else spnn.SparseGroupNorm(num_groups=2)
        apply = jax.jit(model.apply)
        y16, y32 = apply({"params": params}, x16), apply({"params": params}, x32)
        if kind == "layer":
            assert N.layer_norm_moments(x16.features)[1].dtype == jnp.float32
        else:
            segments = jnp.where(x16.active, x16.indices[:, 0], 2)
            assert N.group_norm_moments(x16.features, segments, 2, 2)[1].dtype == jnp.float32
    assert y16.features.dtype == jnp.bfloat16 and y32.features.dtype == jnp.float32
    # Statistics in float32, only the output rounded to bfloat16 (8 bits of mantissa).
    out16, out32 = np.asarray(y16.features, np.float64), np.asarray(y32.features, np.float64)
    np.testing.assert_allclose(out16, out32, rtol=2 ** -8, atol=1e-6)
    assert not out16[~np.asarray(x16.active)].any()


# ---- fused batch norm, residual and ReLU: gradients -------------------------------------------

@pytest.mark.parametrize("relu, with_residual, with_affine", [(False, False, True), (True, False, True),
                                                               (True, True, True), (True, True, False)])
def test_batch_norm_act_gradients_match_the_formula(relu, with_residual, with_affine, rng):
    """The hand-written backward of ``batch_norm_act`` equals autodiff of the masked formula
    (float64), and finite differences; padding rows get no gradient."""
    with jax.enable_x64():
        x = _tensor(rng, 2, 5, dtype=np.float64, padding_rows=4)
        active = x.active
        scale, bias = (jnp.asarray(a, jnp.float64) for a in _affine(rng, 5))
        residual = jnp.where(active[:, None], rng.normal(size=x.features.shape), 0)
        weights = jnp.asarray(rng.normal(size=x.features.shape))

        def fused(features, scale, bias, residual):
            y, _, _ = N.batch_norm_act(features, active, scale if with_affine else None,
                                       bias if with_affine else None, 1e-3,
                                       residual=residual if with_residual else None, relu=relu)
            return jnp.vdot(y, weights)

        def formula(features, scale, bias, residual):
            mean, var = N.masked_moments(features, active)
            y = N.normalize(features, active, mean, var, scale if with_affine else None,
                            bias if with_affine else None, 1e-3)
            y = jnp.where(active[:, None], y + (residual if with_residual else 0), 0)
            return jnp.vdot(jnp.maximum(y, 0) if relu else y, weights)

        args = (x.features, scale, bias, residual)
        np.testing.assert_allclose(fused(*args), formula(*args), rtol=1e-12)
        for got, want in zip(jax.grad(fused, argnums=(0, 1, 2, 3))(*args),
                             jax.grad(formula, argnums=(0, 1, 2, 3))(*args)):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        d_features = jax.grad(fused)(*args)
        assert not np.asarray(d_features)[~np.asarray(active)].any()
        # A small step: ReLU's kink within eps of a row's pre-activation would break the
        # central difference (it did at the default 1e-4 on one CI seed).
        check_grads(jax.jit(fused), args, order=1, modes=["rev"], eps=1e-6)


@pytest.mark.parametrize("mean, bound", [(0.0, 1e-6), (10.0, 5e-6)])
def test_batch_norm_act_float32_gradients_stay_accurate_off_centre(mean, bound, rng):
    """The float32 backward forms sum(d_y * x_hat) from sum(d_y * x), so its rounding grows
    with |mean| / std of the features: measured against float64, d_features and d_scale stay
    within ``bound`` of the largest entry (at mean 10, std 1: about 1.3e-6 for d_scale)."""
    rows, channels = 50_000, 32
    x = (mean + rng.normal(size=(rows, channels))).astype(np.float32)
    g = rng.normal(size=(rows, channels)).astype(np.float32)
    active = jnp.arange(rows) < rows - 1000
    scale, bias = rng.normal(size=channels).astype(np.float32), rng.normal(size=channels).astype(np.float32)
    # Rows whose pre-activation is near ReLU's kink may switch sides between float32 and float64
    # (one did on a CI seed); they get no cotangent, so the comparison measures the formula only.
    x64, valid = np.float64(x), np.asarray(active)
    mean64, std64 = x64[valid].mean(0), np.sqrt(x64[valid].var(0) + 1e-3)
    g[np.abs((x64 - mean64) / std64 * scale + bias) < 1e-3] = 0

    def loss(x, scale, bias):
        y, _, _ = N.batch_norm_act(x, active, scale, bias, 1e-3, relu=True)
        return jnp.sum(y * g.astype(x.dtype))

    got = jax.grad(loss, argnums=(0, 1))(x, scale, bias)
    with jax.enable_x64():
        want = [np.asarray(w) for w in jax.grad(loss, argnums=(0, 1))(*(np.float64(a) for a in (x, scale, bias)))]
    for a, b in zip(got, want):
        assert np.max(np.abs(np.asarray(a, np.float64) - b)) <= bound * np.max(np.abs(b))


def test_residual_block_norm_matches_the_unfused_layers(rng):
    """``SparseBatchNorm(residual=, relu=True)`` equals batch norm, ``sparse_add`` and ReLU."""
    x = _tensor(rng, 2, 4)
    shortcut = x.replace_feature(jnp.asarray(rng.normal(size=x.features.shape), jnp.float32))
    model = spnn.SparseBatchNorm(use_running_average=False)
    variables = {**_batch_norm_variables(rng, 4)}

    def fused(variables, features):
        y, _ = model.apply(variables, x.replace_feature(features), residual=shortcut, relu=True,
                           mutable=["batch_stats"])
        return y.features

    def unfused(variables, features):
        y, _ = model.apply(variables, x.replace_feature(features), mutable=["batch_stats"])
        y = jsc.functional.sparse_add(y, shortcut)
        return jax.nn.relu(y.features)

    np.testing.assert_allclose(jax.jit(fused)(variables, x.features), jax.jit(unfused)(variables, x.features),
                               rtol=1e-5, atol=1e-5)
    weights = jnp.asarray(rng.normal(size=x.features.shape), jnp.float32)
    for f in (fused, unfused):
        f.grad = jax.jit(jax.grad(lambda v, feats, f=f: jnp.vdot(f(v, feats), weights), argnums=(0, 1)))
    got, want = fused.grad(variables, x.features), unfused.grad(variables, x.features)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# ---- padding rows ------------------------------------------------------------------------------------

def _norm_layer(kind):
    """``(Linen layer, apply keyword arguments)`` of each normalization and mode."""
    return {"batch train": (spnn.SparseBatchNorm(use_running_average=False), {"mutable": ["batch_stats"]}),
            "batch train + residual + relu": (spnn.SparseBatchNorm(use_running_average=False),
                                              {"mutable": ["batch_stats"], "relu": True}),
            "batch eval": (spnn.SparseBatchNorm(use_running_average=True), {}),
            "layer": (spnn.SparseLayerNorm(), {}),
            "group": (spnn.SparseGroupNorm(num_groups=2), {})}[kind]


@pytest.mark.parametrize("kind", ["batch train", "batch train + residual + relu", "batch eval", "layer", "group"])
def test_padding_rows_reach_no_statistic(kind, rng):
    """Whatever padding rows hold (NaN, inf, huge values), a norm's outputs, statistics and
    gradients are bitwise those of zero padding, and padding rows get zero gradient."""
    x = _tensor(rng, 2, 4, padding_rows=6)
    padding = ~np.asarray(x.active)
    garbage = np.asarray(x.features).copy()
    garbage[padding] = rng.choice([np.nan, np.inf, -np.inf, 3e38], size=garbage[padding].shape)
    layer, options = _norm_layer(kind)
    variables = layer.init(jax.random.key(0), x)
    variables = {**variables, "params": {k: jnp.asarray(rng.normal(size=v.shape), v.dtype)
                                         for k, v in variables["params"].items()}}
    weights = jnp.asarray(rng.normal(size=x.features.shape), jnp.float32)

    @jax.jit
    def run(params, features):
        def loss(params, features):
            t = T.with_raw_features(x, features)
            residual = {"residual": t.replace_feature(jnp.flip(t.features, 1))} if "residual" in kind else {}
            out = layer.apply({**variables, "params": params}, t, **options, **residual)
            y, state = out if "mutable" in options else (out, None)
            return jnp.vdot(y.features, weights), (y.features, state)
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, features)

    clean = run(variables["params"], x.features)
    dirty = run(variables["params"], jnp.asarray(garbage))
    for want, got in zip(jax.tree_util.tree_leaves(clean), jax.tree_util.tree_leaves(dirty)):
        np.testing.assert_array_equal(got, want)
    (_, (features, _)), (_, d_features) = dirty
    assert not np.asarray(features)[padding].any()
    assert not np.asarray(d_features)[padding].any()
