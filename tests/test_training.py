"""Training the way users do: determinism, a fixed compile budget over scans of varying
size, overflow checks with checkify, mixed precision, and data parallelism over four
simulated devices (in a subprocess, since the device count is fixed when JAX starts)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify

import jax_sparseconv as jsc

REPO = Path(__file__).resolve().parents[1]


def _trainer(model):
    optimizer = optax.adam(1e-2)

    def loss_fn(params, batch_stats, x, labels):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
        weights = (labels > 0).astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.features.astype(jnp.float32),
                                                                 jnp.maximum(labels, 0))
        return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1), (updates["batch_stats"], logits)

    def step(state, x, labels):
        params, batch_stats, opt_state = state
        (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x,
                                                                                         labels)
        jsc.checkify_overflow(logits)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    def init(x, seed=0):
        variables = jax.jit(model.init)(jax.random.key(seed), x)
        return variables["params"], variables["batch_stats"], optimizer.init(variables["params"])

    return init, step


@pytest.mark.parametrize("backend", ["ffi", "xla"])
def test_two_training_runs_are_bitwise_identical(backend, labeled_scan, tiny_unet):
    x, labels = labeled_scan(voxel_size=0.6)
    init, step = _trainer(tiny_unet(backend))
    step = jax.jit(step)
    runs = []
    for _ in range(2):
        state = init(x)
        for _ in range(3):
            state, loss = step(state, x, labels)
        runs.append(jax.device_get(state))
    for a, b in zip(jax.tree_util.tree_leaves(runs[0]), jax.tree_util.tree_leaves(runs[1])):
        np.testing.assert_array_equal(a, b)


def test_scans_of_varying_size_compile_once_per_capacity_bucket(labeled_scan, tiny_unet):
    """Ten crops with different voxel counts, padded to capacity buckets: one compile per bucket."""
    scans = []
    for i in range(10):
        x0, y0 = -20.0 + 1.5 * i, -110.0 + 0.7 * i  # same 30 x 30 m size (same grid), different content
        scans.append(labeled_scan((x0, y0, -4.0, x0 + 30.0, y0 + 30.0, 4.0), voxel_size=0.5))
    sizes = {int(x.num_active) for x, _ in scans}
    buckets = {x.capacity for x, _ in scans}
    assert len(sizes) >= 8 and len(buckets) <= 3
    init, step = _trainer(tiny_unet())
    step = jax.jit(step)
    state = init(scans[0][0])
    for x, labels in scans:
        state, loss = step(state, x, labels)
        assert np.isfinite(float(loss))
    assert step._cache_size() == len(buckets)


def test_checkify_stops_a_step_that_overflowed(labeled_scan, tiny_unet):
    x, labels = labeled_scan(voxel_size=0.6)
    init, step = _trainer(tiny_unet(out_capacities=(0.05, 1.0, 1.0)))  # far too few rows for level 1
    state = init(x)  # init runs under jit: its overflow is data, not an error
    err, _ = jax.jit(checkify.checkify(step))(state, x, labels)
    with pytest.raises(checkify.JaxRuntimeError, match=r"needed \d+ active rows but its capacity is \d+"):
        err.throw()
    init_ok, step_ok = _trainer(tiny_unet())
    err, _ = jax.jit(checkify.checkify(step_ok))(init_ok(x), x, labels)
    err.throw()  # nothing overflowed


def test_bfloat16_training_tracks_float32(labeled_scan, tiny_unet):
    """bf16 features, activations and params with float32 accumulation: same loss within bf16
    accuracy at the start, and the loss falls."""
    x, labels = labeled_scan(voxel_size=0.6)
    losses = {}
    for name, dtype in (("float32", None), ("bfloat16", jnp.bfloat16)):
        init, step = _trainer(tiny_unet(dtype=dtype))
        step = jax.jit(step)
        state = init(x)
        losses[name] = []
        for _ in range(10):
            state, loss = step(state, x, labels)
            losses[name].append(float(loss))
    assert abs(losses["bfloat16"][0] - losses["float32"][0]) < 0.02 * losses["float32"][0]
    assert losses["bfloat16"][-1] < 0.7 * losses["bfloat16"][0]


def test_data_parallel_over_four_devices_matches_one_device():
    # The example sets the simulated device count itself; the environment keeps conftest's XLA_FLAGS.
    result = subprocess.run([sys.executable, str(REPO / "examples" / "data_parallel.py"), "--devices", "4",
                             "--steps", "2", "--voxel-size", "0.6", "--check"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check: 4 devices give the single-device loss" in result.stdout
