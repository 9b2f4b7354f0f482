"""Linen and NNX layers: each against the functional op it wraps, Linen == NNX with the
same weights, SparseSequential's handling of feature-wise layers, and bad arguments.

The functional ops are tested against dense float64 references in test_conv.py and
test_pool.py; here the layers must reproduce them bit for bit.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_sparseconv as jsc
from jax_sparseconv import linen as spnn
from jax_sparseconv import nnx as spnnx
import sparse_testing as T

SHAPES = {1: (11,), 2: (7, 8), 3: (6, 7, 5), 4: (4, 5, 4, 3)}
CONVS = {  # layer name -> functional keyword arguments that select the op
    "SubMConv": dict(subm=True),
    "SparseConv": dict(),
    "SparseConvTranspose": dict(transposed=True),
    "SparseInverseConv": dict(inverse=True),
}


def _layer_args(name, ndim):
    """Geometry arguments of the layer (a float out_capacity is a multiple of the input's;
    the strided convs reach at most 2 outputs per input and dim, more than the input holds)."""
    return {"SubMConv": dict(kernel_size=3, kernel_dilation=2),
            "SparseConv": dict(kernel_size=3, strides=2, padding=1, out_capacity=2.0 ** ndim),
            "SparseConvTranspose": dict(kernel_size=2, strides=2, out_capacity=2.0 ** ndim),
            "SparseInverseConv": dict(kernel_size=3, indice_key="down")}[name]


def _nnx_apply(module, x):
    return nnx.jit(lambda m, t: m(t))(module, x)


def _input(rng, name, ndim):
    x = T.random_tensor(rng, 2, SHAPES[ndim], 3)
    if name == "SparseInverseConv":  # invert a strided conv run first
        kernel = rng.normal(size=(3,) * ndim + (3, 3)).astype(np.float32)
        x = jsc.sparse_conv(x, kernel, strides=2, padding=1, indice_key="down", out_capacity=2**ndim * x.capacity)
    return x


def _functional_kwargs(name, args, x):
    kw = dict(CONVS[name])
    if "out_capacity" in args:
        kw.update(out_capacity=int(args["out_capacity"] * x.capacity))
    if name == "SubMConv":
        kw.update(dilation=args["kernel_dilation"])
    elif name == "SparseConv":
        kw.update(strides=args["strides"], padding=args["padding"])
    elif name == "SparseConvTranspose":
        kw.update(strides=args["strides"])
    else:
        kw.update(indice_key="down")
    return kw


# Every layer kind on 3 dims; every dimension-specific class of one kind.
CONV_CASES = [(name, 3) for name in CONVS] + [("SparseConv", 1), ("SubMConv", 2), ("SparseConvTranspose", 4)]


@pytest.mark.parametrize("name, ndim", CONV_CASES)
def test_conv_layers_match_functional_and_each_other(name, ndim, backend, rng):
    x = _input(rng, name, ndim)
    args = _layer_args(name, ndim)
    linen_layer = getattr(spnn, f"{name}{ndim}d")(5, **args, backend=backend)
    params = linen_layer.init(jax.random.key(0), x)["params"]
    assert params["kernel"].shape == (args["kernel_size"],) * ndim + (3, 5)
    assert params["bias"].shape == (5,)
    params["bias"] = jnp.asarray(rng.normal(size=5), jnp.float32)  # must reach active rows only
    nnx_layer = getattr(spnnx, f"{name}{ndim}d")(3, 5, **args, backend=backend, rngs=nnx.Rngs(0))
    nnx_layer.kernel[...], nnx_layer.bias[...] = params["kernel"], params["bias"]
    graph, state = nnx.split(nnx_layer)

    @jax.jit
    def run(params, state, x):
        reference = jsc.sparse_conv(x, params["kernel"], params["bias"], backend=backend,
                                    **_functional_kwargs(name, args, x))
        return linen_layer.apply({"params": params}, x), nnx.merge(graph, state)(x), reference

    ours, ours_nnx, reference = run(params, state, x)
    np.testing.assert_array_equal(np.asarray(ours.indices), np.asarray(reference.indices))
    np.testing.assert_array_equal(np.asarray(ours.features), np.asarray(reference.features))
    np.testing.assert_array_equal(np.asarray(ours_nnx.features), np.asarray(reference.features))
    assert ours.spatial_shape == reference.spatial_shape == ours_nnx.spatial_shape
    assert np.any(np.asarray(ours.features) != 0)


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_layers_ignore_what_padding_rows_hold(name, backend, rng):
    """A conv reads active rows only (its layer does not re-mask a same-dtype input): junk in
    padding rows changes neither the output nor the kernel gradient, and gets no gradient."""
    x = _input(rng, name, 3)
    padding = ~np.asarray(x.active)
    assert padding.any()
    junk = jnp.where(jnp.asarray(padding)[:, None], jnp.asarray(rng.normal(size=x.features.shape), jnp.float32),
                     x.features)
    layer = getattr(spnn, f"{name}3d")(5, **_layer_args(name, 3), backend=backend)
    params = layer.init(jax.random.key(0), x)["params"]

    @jax.jit
    def run(params, features):
        def loss(params, features):
            y = layer.apply({"params": params}, T.with_raw_features(x, features))
            return jnp.sum(jnp.sin(y.features)), y.features
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, features)

    (_, clean), (d_params_clean, d_clean) = run(params, x.features)
    (_, dirty), (d_params_dirty, d_dirty) = run(params, junk)
    np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))
    np.testing.assert_array_equal(np.asarray(d_params_dirty["kernel"]), np.asarray(d_params_clean["kernel"]))
    np.testing.assert_array_equal(np.asarray(d_dirty), np.asarray(d_clean))
    assert not np.asarray(d_dirty)[padding].any()


@pytest.mark.parametrize("kind", ["Max", "Avg"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_pool_layers_match_functional(kind, ndim, backend, rng):
    x = T.random_tensor(rng, 2, SHAPES[ndim], 4)
    linen_layer = getattr(spnn, f"Sparse{kind}Pool{ndim}d")(2, padding=1, backend=backend)
    ours = jax.jit(lambda x: linen_layer.apply({}, x))(x)
    op = jsc.sparse_max_pool if kind == "Max" else jsc.sparse_avg_pool
    reference = jax.jit(lambda x: op(x, 2, padding=1, backend=backend))(x)
    np.testing.assert_array_equal(np.asarray(ours.features), np.asarray(reference.features))
    nnx_layer = getattr(spnnx, f"Sparse{kind}Pool{ndim}d")(2, padding=1, backend=backend)
    np.testing.assert_array_equal(np.asarray(_nnx_apply(nnx_layer, x).features), np.asarray(ours.features))


def test_global_pools_and_to_dense(rng):
    x = T.random_tensor(rng, 3, SHAPES[3], 4)
    pairs = [(spnn.SparseGlobalMaxPool(), spnnx.SparseGlobalMaxPool(), jsc.global_max_pool(x)),
             (spnn.SparseGlobalAvgPool(), spnnx.SparseGlobalAvgPool(), jsc.global_avg_pool(x)),
             (spnn.ToDense(channels_first=True), spnnx.ToDense(channels_first=True), x.dense(channels_first=True))]
    for linen_layer, nnx_layer, expected in pairs:
        np.testing.assert_array_equal(np.asarray(linen_layer.apply({}, x)), np.asarray(expected))
        np.testing.assert_array_equal(np.asarray(nnx_layer(x)), np.asarray(expected))


class _Block(nn.Module):
    def setup(self):
        self.block = spnn.SparseSequential([
            spnn.SubMConv2d(6, 3, indice_key="s"), nn.Dense(4), spnn.SparseBatchNorm(), nn.relu, nn.Dropout(0.5),
            spnn.SparseSequential([spnn.SubMConv2d(4, 3, indice_key="s"), nn.LayerNorm()]),
            spnn.SparseGlobalAvgPool(), nn.Dense(2)])

    def __call__(self, x, train: bool):
        return self.block(x, use_running_average=not train, deterministic=not train)


def test_sparse_sequential_routes_tensors_features_and_flags(rng):
    x = T.random_tensor(rng, 2, SHAPES[2], 3, padding_rows=5)
    model = _Block()
    variables = model.init(jax.random.key(0), x, train=False)
    assert set(variables["params"]["block"]) == {"layers_0", "layers_1", "layers_2", "layers_5", "layers_7"}
    assert set(variables["params"]["block"]["layers_5"]) == {"layers_0", "layers_1"}
    eval_out = model.apply(variables, x, train=False)
    assert eval_out.shape == (2, 2)
    # Training: dropout needs its rng, batch norm updates its statistics.
    train_out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                     rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(train_out, eval_out)
    assert not np.allclose(updates["batch_stats"]["block"]["layers_2"]["mean"], 0)

    # Feature-wise layers see padding rows but their output there is zeroed (nn.Dense has a bias).
    dense_then_relu = spnn.SparseSequential([nn.Dense(4, bias_init=nn.initializers.ones), nn.relu])
    y, variables = dense_then_relu.init_with_output(jax.random.key(0), x)
    dense = variables["params"]["layers_0"]
    active = np.asarray(x.active)
    expected = np.maximum(np.asarray(x.features) @ np.asarray(dense["kernel"]) + 1, 0)
    np.testing.assert_allclose(np.asarray(y.features)[active], expected[active], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(y.features)[~active] == 0)


def test_sparse_sequential_feature_layers_see_no_padding(rng):
    """Whatever padding rows hold (NaN), a feature-wise layer's gradients are those of zero padding."""
    x = T.random_tensor(rng, 2, SHAPES[3], 3, padding_rows=5)
    model = spnn.SparseSequential([nn.Dense(4), nn.relu])
    variables = model.init(jax.random.key(0), x)
    garbage = jnp.where(x.active[:, None], x.features, jnp.nan)

    def grads(features):
        loss = lambda v: jnp.sum(model.apply(v, T.with_raw_features(x, features)).features ** 2)  # noqa: E731
        return jax.grad(loss)(variables)

    for got, want in zip(jax.tree_util.tree_leaves(grads(garbage)), jax.tree_util.tree_leaves(grads(x.features))):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layer, advice", [(nn.BatchNorm(use_running_average=False), "SparseBatchNorm"),
                                           (nn.GroupNorm(num_groups=1), "SparseGroupNorm")])
def test_sparse_sequential_rejects_norms_that_count_padding(layer, advice, rng):
    x = T.random_tensor(rng, 1, SHAPES[2], 4)
    with pytest.raises(TypeError, match=advice):
        spnn.SparseSequential([layer]).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="SparseBatchNorm"):
        spnnx.SparseSequential(nnx.BatchNorm(4, rngs=nnx.Rngs(0)))(x)


def test_nnx_sequential_matches_linen(rng):
    x = T.random_tensor(rng, 2, SHAPES[3], 3)
    linen_model = spnn.SparseSequential([spnn.SubMConv3d(4, 3, indice_key="a"), spnn.SparseLayerNorm(), nn.relu,
                                         spnn.SparseConv3d(6, 2, strides=2), spnn.SparseGroupNorm(num_groups=2)])
    variables = linen_model.init(jax.random.key(0), x)
    nnx_model = spnnx.SparseSequential(spnnx.SubMConv3d(3, 4, 3, indice_key="a", rngs=nnx.Rngs(1)),
                                       spnnx.SparseLayerNorm(4, rngs=nnx.Rngs(1)), nnx.relu,
                                       spnnx.SparseConv3d(4, 6, 2, 2, rngs=nnx.Rngs(1)),
                                       spnnx.SparseGroupNorm(6, num_groups=2, rngs=nnx.Rngs(1)))
    state = nnx.state(nnx_model)
    pure = {"layers": {int(k[len("layers_"):]): v for k, v in variables["params"].items()}}
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(nnx_model, state)
    expected = jax.jit(linen_model.apply)(variables, x)
    np.testing.assert_array_equal(np.asarray(_nnx_apply(nnx_model, x).features), np.asarray(expected.features))


@pytest.mark.parametrize("dtype, param_dtype", [(jnp.bfloat16, jnp.float32), (None, jnp.bfloat16),
                                                (jnp.float16, jnp.float16)])
def test_dtype_and_param_dtype(dtype, param_dtype, rng):
    x = T.random_tensor(rng, 1, SHAPES[3], 4)
    layer = spnn.SubMConv3d(8, 3, dtype=dtype, param_dtype=param_dtype)
    variables = layer.init(jax.random.key(0), x)
    assert variables["params"]["kernel"].dtype == param_dtype
    y = layer.apply(variables, x)
    assert y.features.dtype == (dtype or jnp.result_type(x.features, param_dtype))
    full = jsc.sparse_conv(x, variables["params"]["kernel"].astype(jnp.float32),
                           variables["params"]["bias"].astype(jnp.float32), subm=True)
    np.testing.assert_allclose(np.asarray(y.features, np.float32), np.asarray(full.features), rtol=3e-2, atol=3e-2)


def test_bad_layer_arguments_raise(rng):
    x2 = T.random_tensor(rng, 1, SHAPES[2], 3)
    with pytest.raises(ValueError, match="SubMConv3d expects a tensor with 3 spatial dims"):
        spnn.SubMConv3d(4, 3).init(jax.random.key(0), x2)
    with pytest.raises(TypeError, match="expects a SparseConvTensor"):
        spnn.SubMConv(4, 3).init(jax.random.key(0), x2.features)
    with pytest.raises(ValueError, match="kernel_size as a tuple"):
        spnnx.SubMConv(3, 4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="takes its strides"):
        spnn.SparseInverseConv2d(4, 3, strides=2, indice_key="k").init(jax.random.key(0), x2)
    with pytest.raises(ValueError, match="indice_key 'missing' is not in"):
        spnn.SparseInverseConv2d(4, 3, indice_key="missing").init(jax.random.key(0), x2)
