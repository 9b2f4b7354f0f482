"""Data-parallel training of a MinkUNet over several devices with ``jax.shard_map``.

    python examples/data_parallel.py [--devices 4] [--steps 5] [--dtype bfloat16] [--check]

On a CPU the devices are simulated: this script sets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts. Each device holds
its share of the global batch as its own ``SparseConvTensor`` (local batch indices, one
capacity for all devices). Batch-norm statistics are combined across devices
(``SparseBatchNorm(axis_name="data")``, weighted by each device's active rows), the loss is
the mean over the labeled voxels of the whole global batch and its gradient (under
``shard_map``'s default ``check_vma=True``) sums over the devices, so a step computes the same loss and gradients as one device holding the whole
batch; ``--check`` verifies that against a single-device step. With float32 the check
(and the steps after it) runs in float64: summed in a different order, float32 gradient
entries that nearly cancel differ by more than any fixed relative bound, while in float64
the two agree to about 1e-12.

On GPUs or TPU hosts the same code runs unchanged: the mesh is built from
``jax.devices()`` (on several hosts, call ``jax.distributed.initialize()`` first and feed
each host its own shards), and each device runs the ``xla`` backend's ops (or the native
kernels of its platform) on its own shard. Only the batch statistics and the gradients
cross devices.

Data: crops of the labeled SemanticKITTI scan in ``../shared/data/semantickitti`` play
the scans of a global batch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--scans-per-device", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--voxel-size", type=float, default=0.4)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="computation dtype (bfloat16: bf16 activations, float32 params and accumulation)")
    parser.add_argument("--check", action="store_true",
                        help="compare one step with a single-device step (float32 runs in float64 then)")
    return parser.parse_args()


ARGS = parse_args()
if "jax" not in sys.modules:  # the simulated devices must be set before JAX starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={ARGS.devices}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

import jax_sparseconv as jsc  # noqa: E402
from jax_sparseconv import models, utils  # noqa: E402

CHECK_IN_FLOAT64 = ARGS.check and ARGS.dtype == "float32"
if CHECK_IN_FLOAT64:
    jax.config.update("jax_enable_x64", True)
DTYPE = jnp.dtype("float64" if CHECK_IN_FLOAT64 else ARGS.dtype)  # activations
PARAM_DTYPE = jnp.promote_types(DTYPE, jnp.float32)  # parameters, loss

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "semantickitti"
NUM_CLASSES = 20


def load_scans(count: int, voxel_size: float):
    """``count`` 30 x 30 m crops of the scan: (coords, input features, labels), shape."""
    points = np.load(DATA / "o3dml_000700_points.npy")
    labels = np.load(DATA / "o3dml_000700_labels.npy")
    scans, shape = [], None
    for i in range(count):
        x0, y0 = -25.0 + 5.0 * (i % 4), -115.0 + 5.0 * (i // 4)
        crop = (x0, y0, -4.0, x0 + 30.0, y0 + 30.0, 4.0)
        coords, features, voxel_labels, shape = utils.voxelize_labels(points, labels, NUM_CLASSES, voxel_size, crop)
        scans.append((coords, utils.position_features(features, (x0 + 15.0, y0 + 15.0, 0.0)), voxel_labels))
    return scans, shape


def stack_shards(scans, devices: int, capacity: int):
    """Arrays ``[devices, capacity, ...]``: device ``d`` holds scans ``d * n ... (d + 1) * n - 1``
    as batch items ``0 ... n - 1``; padding rows have index -1 and label -1."""
    per_device = len(scans) // devices
    features = np.zeros((devices, capacity, scans[0][1].shape[1]), PARAM_DTYPE)
    indices = np.full((devices, capacity, 4), -1, np.int32)
    labels = np.full((devices, capacity), -1, np.int32)
    for d in range(devices):
        row = 0
        for b in range(per_device):
            coords, inputs, voxel_labels = scans[d * per_device + b]
            n = len(coords)
            if row + n > capacity:
                raise ValueError(f"device {d} needs more than capacity {capacity} rows")
            indices[d, row:row + n] = np.concatenate([np.full((n, 1), b, np.int32), coords], axis=1)
            features[d, row:row + n], labels[d, row:row + n] = inputs, voxel_labels
            row += n
    return features, indices, labels


def make_loss(model, shape, batch_size, axis_name):
    """The mean cross-entropy over the labeled voxels of the global batch, from one shard
    (summed over the devices of ``axis_name``; None: the whole batch is this one)."""
    def total(value):
        return jnp.sum(value) if axis_name is None else jax.lax.psum(jnp.sum(value), axis_name)

    def loss_fn(params, batch_stats, features, indices, labels):
        x = jsc.SparseConvTensor(features, indices, shape, batch_size, validate=False)
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
        weights = (labels > 0).astype(PARAM_DTYPE)  # padding (-1) and unlabeled (0) do not count
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.features.astype(PARAM_DTYPE),
                                                                 jnp.maximum(labels, 0))
        return total(losses * weights) / total(weights), (updates["batch_stats"], logits)
    return loss_fn


def data_parallel_step(model, optimizer, mesh, shape, scans_per_device):
    loss_fn = make_loss(model, shape, scans_per_device, "data")

    def device_step(params, batch_stats, opt_state, features, indices, labels):
        # The loss is the global mean, the same on every device; the parameters are too, so
        # (shard_map's check_vma) their gradient is the global one, summed over the devices.
        (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, features[0], indices[0], labels[0])
        jsc.checkify_overflow(logits)  # no-op unless the step runs under checkify
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss, grads

    sharded = P("data")
    return jax.jit(jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P(), P(), sharded, sharded, sharded),
                                 out_specs=(P(), P(), P(), P(), P())))


def single_device_loss_and_grads(model, params, batch_stats, features, indices, labels, shape, scans_per_device):
    """The same global batch as one tensor on one device (batch index = global scan number)."""
    devices, capacity = features.shape[:2]
    offsets = (np.arange(devices) * scans_per_device)[:, None]
    indices = indices.copy()
    indices[..., 0] = np.where(indices[..., 0] >= 0, indices[..., 0] + offsets, -1)
    loss_fn = make_loss(model, shape, devices * scans_per_device, None)
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, batch_stats, features.reshape(devices * capacity, -1), indices.reshape(devices * capacity, -1),
        labels.reshape(-1))
    return loss, grads


def main():
    devices = jax.devices()[:ARGS.devices]
    if len(devices) < ARGS.devices:
        raise SystemExit(f"asked for {ARGS.devices} devices, JAX sees {len(jax.devices())}")
    mesh = Mesh(np.array(devices), ("data",))
    scans, shape = load_scans(ARGS.devices * ARGS.scans_per_device, ARGS.voxel_size)
    largest = max(sum(len(s[0]) for s in scans[d::ARGS.devices]) for d in range(ARGS.devices))
    capacity = jsc.capacity_bucket(2 * largest)
    features, indices, labels = stack_shards(scans, ARGS.devices, capacity)
    print(f"{len(devices)} devices, {len(scans)} scans, grid {shape}, capacity {capacity} per device, {DTYPE}")

    model = models.MinkUNet(NUM_CLASSES, stem_features=16, encoder_features=(16, 32, 32),
                            decoder_features=(32, 32, 16), blocks_per_stage=1, out_capacities=(1.0, 1.0, 1.0),
                            axis_name="data", dtype=DTYPE, param_dtype=PARAM_DTYPE)
    local = jsc.SparseConvTensor(features[0], indices[0], shape, ARGS.scans_per_device)
    variables = jax.jit(model.init)(jax.random.key(0), local)
    params, batch_stats = variables["params"], variables["batch_stats"]
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)
    step = data_parallel_step(model, optimizer, mesh, shape, ARGS.scans_per_device)

    if ARGS.check:
        reference_model = model.clone(axis_name=None)
        ref_loss, ref_grads = single_device_loss_and_grads(reference_model, params, batch_stats, features, indices,
                                                           labels, shape, ARGS.scans_per_device)
        *_, loss, grads = step(params, batch_stats, opt_state, features, indices, labels)
        # bf16 activations round differently when the batch is split: loose bounds there.
        loss_tol, grad_rtol, grad_atol = (1e-10, 1e-8, 1e-10) if CHECK_IN_FLOAT64 else (1e-2, 0.1, 0.05)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=loss_tol)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=grad_rtol, atol=grad_atol * np.abs(b).max())
        print(f"check: {len(devices)} devices give the single-device loss {float(ref_loss):.6f} and gradients")

    for i in range(ARGS.steps):
        params, batch_stats, opt_state, loss, _ = step(params, batch_stats, opt_state, features, indices, labels)
        print(f"step {i}: loss {float(loss):.4f}")


if __name__ == "__main__":
    main()
