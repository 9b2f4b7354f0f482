"""Data-parallel training of a MinkUNet over several devices and processes with ``jax.shard_map``.

    python examples/data_parallel.py [--devices 4] [--steps 5] [--dtype bfloat16] [--check]
    python examples/data_parallel.py --processes 2 --devices 1      # 2 local processes
    python examples/data_parallel.py --coordinator HOST:PORT --num-processes N --process-id I
        [--checkpoint-dir DIR --save-every K] [--metrics PATH]

``--devices D`` is the number of devices of each process. On a CPU they are simulated: this
script sets ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` before JAX starts. The mesh
holds the devices of every process (``jax.devices()``); each device holds its share of the
global batch as its own ``SparseConvTensor`` (local batch indices, one capacity for all
devices). Batch-norm statistics are combined across all devices (``SparseBatchNorm(
axis_name="data")``, weighted by each device's active rows), the loss is the mean over the
labeled voxels of the whole global batch and its gradient (under ``shard_map``'s default
``check_vma=True``) sums over the devices, so a step computes the same loss and gradients as
one device holding the whole batch; ``--check`` (one process) verifies that against a
single-device step. With float32 the check (and the steps after it) runs in float64: summed in
a different order, float32 gradient entries that nearly cancel differ by more than any fixed
relative bound, while in float64 the two agree to about 1e-12.

Several processes: ``--processes N`` starts N processes on this machine that form one JAX job
(``jax.distributed`` on a free localhost port, CPU collectives over gloo) and waits for them.
A cluster starts one process per host itself and gives each ``--coordinator HOST:PORT
--num-processes N --process-id I`` (SLURM: ``--process-id $SLURM_PROCID``; on a TPU pod or
with Kubernetes, the same three values from its environment). Each process reads and
voxelizes only the scans of its own devices; only batch statistics and gradients cross
processes.

Data: a stream of crops of the labeled SemanticKITTI scan in ``../shared/data/semantickitti``
(``--scans`` crop positions, shuffled anew each epoch from ``--seed``); step ``s`` takes stream
positions ``s * G ... (s + 1) * G - 1`` (G = global batch), device ``m`` of the mesh its
``--scans-per-device`` of them. ``--checkpoint-dir`` saves parameters, batch statistics,
optimizer state and the stream position every ``--save-every`` steps
(``jax_sparseconv.checkpoint``) and resumes from the newest checkpoint; ``--metrics PATH``
(process 0) appends one JSON line per step. A batch larger than the capacity, or one whose
layers overflow, runs again at a larger capacity bucket (``jsc.grown_capacity``), never dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=4, help="devices of each process")
    parser.add_argument("--scans-per-device", type=int, default=2)
    parser.add_argument("--scans", type=int, default=16, help="crop positions in the data stream")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--voxel-size", type=float, default=0.4)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="computation dtype (bfloat16: bf16 activations, float32 params and accumulation)")
    parser.add_argument("--check", action="store_true",
                        help="compare one step with a single-device step (float32 runs in float64 then)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--capacity", type=int, default=None,
                        help="first capacity per device (default: from the first batch)")
    parser.add_argument("--out-capacities", type=lambda s: tuple(map(float, s.split(","))), default=(1.0, 1.0, 1.0),
                        help="capacities of the 3 downsampled levels as fractions of the input's, e.g. 1,1,1")
    parser.add_argument("--processes", type=int, default=1, help="start this many local processes")
    parser.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 in a multi-process job")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--metrics", type=Path, default=None, help="process 0 appends one JSON line per step")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="--processes: seconds to wait for the processes before stopping them")
    args = parser.parse_args(argv)
    if not 1 <= args.scans <= 16:
        parser.error(f"--scans: the scan has 16 crop positions, got {args.scans}")
    if len(args.out_capacities) != 3:
        parser.error(f"--out-capacities: 3 fractions, one per downsampled level, got {len(args.out_capacities)}")
    if args.check and (args.processes > 1 or args.coordinator):
        parser.error("--check compares with one device of one process: run it without --processes/--coordinator")
    return args


def launch_local_processes(args, argv) -> int:
    """Runs this script as ``args.processes`` processes of one job on localhost; their exit
    status (the first failure's). Stops them all when one fails or the timeout passes."""
    with socket.socket() as probe:  # a free port for the coordinator
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    # This command line, each child one process of the job (argparse keeps the last --processes).
    children = [subprocess.Popen([sys.executable, __file__, *argv, "--processes", "1",
                                  "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(args.processes),
                                  "--process-id", str(i)], env=env)
                for i in range(args.processes)]
    deadline, status = time.monotonic() + args.timeout, 0
    try:
        while any(child.poll() is None for child in children):
            failed = [child.returncode for child in children if child.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                status = failed[0] if failed else 124
                print(f"data_parallel: {'a process failed' if failed else 'timed out'}; stopping the others",
                      file=sys.stderr)
                break
            time.sleep(0.2)
        status = status or next((child.returncode for child in children if child.returncode), 0)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait()
    return status


ARGS = parse_args()
if ARGS.processes > 1:
    sys.exit(launch_local_processes(ARGS, sys.argv[1:]))
if "jax" not in sys.modules:  # the simulated devices must be set before JAX starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={ARGS.devices}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jax_sparseconv as jsc  # noqa: E402
from jax_sparseconv import models, utils  # noqa: E402
from jax_sparseconv.checkpoint import TrainingCheckpoints  # noqa: E402

CHECK_IN_FLOAT64 = ARGS.check and ARGS.dtype == "float32"
if CHECK_IN_FLOAT64:
    jax.config.update("jax_enable_x64", True)
DTYPE = jnp.dtype("float64" if CHECK_IN_FLOAT64 else ARGS.dtype)  # activations
PARAM_DTYPE = jnp.promote_types(DTYPE, jnp.float32)  # parameters, loss

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "semantickitti"
NUM_CLASSES = 20


class CropStream:
    """Crops of the scan as a shuffled stream: ``scan(p)`` is the crop at stream position ``p``
    (epoch ``p // scans``, reshuffled each epoch from the seed), voxelized on first use."""

    def __init__(self, scans: int, voxel_size: float, seed: int):
        self.points = np.load(DATA / "o3dml_000700_points.npy")
        self.labels = np.load(DATA / "o3dml_000700_labels.npy")
        self.scans, self.voxel_size, self.seed = scans, voxel_size, seed
        self.shape = None
        self._crops = {}

    def scan(self, position: int):
        """(coords, input features, labels) of the crop at ``position``."""
        epoch, i = divmod(position, self.scans)
        crop_id = int(np.random.default_rng([self.seed, epoch]).permutation(self.scans)[i])
        if crop_id not in self._crops:
            x0, y0 = -25.0 + 5.0 * (crop_id % 4), -115.0 + 5.0 * (crop_id // 4 % 4)
            crop = (x0, y0, -4.0, x0 + 30.0, y0 + 30.0, 4.0)
            coords, features, labels, self.shape = utils.voxelize_labels(self.points, self.labels, NUM_CLASSES,
                                                                         self.voxel_size, crop)
            self._crops[crop_id] = (coords, utils.position_features(features, (x0 + 15.0, y0 + 15.0, 0.0)), labels)
        return self._crops[crop_id]


def stack_shards(scans_by_device, capacity: int):
    """Arrays ``[len(scans_by_device), capacity, ...]``: device ``d``'s scans as batch items
    ``0 ... n - 1``; padding rows have index -1 and label -1."""
    devices = len(scans_by_device)
    features = np.zeros((devices, capacity, scans_by_device[0][0][1].shape[1]), PARAM_DTYPE)
    indices = np.full((devices, capacity, 4), -1, np.int32)
    labels = np.full((devices, capacity), -1, np.int32)
    for d, scans in enumerate(scans_by_device):
        row = 0
        for b, (coords, inputs, voxel_labels) in enumerate(scans):
            n = len(coords)
            indices[d, row:row + n] = np.concatenate([np.full((n, 1), b, np.int32), coords], axis=1)
            features[d, row:row + n], labels[d, row:row + n] = inputs, voxel_labels
            row += n
    return features, indices, labels


def global_array(local: np.ndarray, mesh: Mesh, positions: list[int]) -> jax.Array:
    """The ``[mesh size, ...]`` array sharded over "data" whose rows ``positions`` (this
    process's devices) are ``local``; the other processes give the other rows."""
    devices = mesh.devices.reshape(-1)
    shards = [jax.device_put(local[k:k + 1], devices[m]) for k, m in enumerate(positions)]
    return jax.make_array_from_single_device_arrays((len(devices), *local.shape[1:]),
                                                    NamedSharding(mesh, P("data")), shards)


def global_max(value: int) -> int:
    """The largest of every process's ``value``."""
    return int(np.max(multihost_utils.process_allgather(np.int64(value))))


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
        # [devices, 2]: every device's overflow record, on every device.
        overflow = jax.lax.psum(jnp.zeros((mesh.devices.size, 2), jnp.int32)
                                .at[jax.lax.axis_index("data")].set(logits.overflow), "data")
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss, grads, overflow

    sharded = P("data")
    return jax.jit(jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P(), P(), sharded, sharded, sharded),
                                 out_specs=(P(), P(), P(), P(), P(), P())))


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
    if ARGS.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        jax.distributed.initialize(ARGS.coordinator, num_processes=ARGS.num_processes, process_id=ARGS.process_id,
                                   initialization_timeout=300)
    # The first --devices devices of every process, in process order.
    devices = [d for p in range(jax.process_count())
               for d in [d for d in jax.devices() if d.process_index == p][:ARGS.devices]]
    if len(jax.local_devices()) < ARGS.devices:
        raise SystemExit(f"asked for {ARGS.devices} devices per process, JAX sees {len(jax.local_devices())} here")
    mesh = Mesh(np.array(devices), ("data",))
    mine = [m for m, d in enumerate(devices) if d.process_index == jax.process_index()]
    lead = jax.process_index() == 0
    spd = ARGS.scans_per_device
    global_batch = len(devices) * spd
    stream = CropStream(ARGS.scans, ARGS.voxel_size, ARGS.seed)

    def my_scans(position: int):
        """This process's devices' scans of the global batch that starts at ``position``."""
        return [[stream.scan(position + m * spd + b) for b in range(spd)] for m in mine]

    def rows_needed(scans_by_device) -> int:
        return global_max(max(sum(len(scan[0]) for scan in scans) for scans in scans_by_device))

    scans = my_scans(0)
    first_capacity = jsc.capacity_bucket(int(1.25 * rows_needed(scans)))
    features, indices, labels = stack_shards(scans, first_capacity)  # for init and --check
    capacity = ARGS.capacity or first_capacity
    if lead:
        print(f"{jax.process_count()} process(es), {len(devices)} devices, global batch {global_batch} crops of "
              f"{ARGS.scans} in the stream, grid {stream.shape}, capacity {capacity} per device, {DTYPE}")

    model = models.MinkUNet(NUM_CLASSES, stem_features=16, encoder_features=(16, 32, 32),
                            decoder_features=(32, 32, 16), blocks_per_stage=1, out_capacities=ARGS.out_capacities,
                            axis_name="data", dtype=DTYPE, param_dtype=PARAM_DTYPE)
    local = jsc.SparseConvTensor(features[0], indices[0], stream.shape, spd)
    variables = jax.jit(model.init)(jax.random.key(ARGS.seed), local)  # the same on every process
    replicated = NamedSharding(mesh, P())
    params, batch_stats = jax.device_put((variables["params"], variables["batch_stats"]), replicated)
    optimizer = optax.adam(1e-2)
    init_optimizer = jax.jit(optimizer.init, out_shardings=replicated)  # the step count replicated too
    step = data_parallel_step(model, optimizer, mesh, stream.shape, spd)

    if ARGS.check:
        reference_model = model.clone(axis_name=None)
        ref_loss, ref_grads = single_device_loss_and_grads(reference_model, params, batch_stats, features, indices,
                                                           labels, stream.shape, spd)
        *_, loss, grads, _ = step(params, batch_stats, init_optimizer(params),
                                  *(global_array(a, mesh, mine) for a in (features, indices, labels)))
        # bf16 activations round differently when the batch is split: loose bounds there.
        loss_tol, grad_rtol, grad_atol = (1e-10, 1e-8, 1e-10) if CHECK_IN_FLOAT64 else (1e-2, 0.1, 0.05)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=loss_tol)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=grad_rtol, atol=grad_atol * np.abs(b).max())
        print(f"check: {len(devices)} devices give the single-device loss {float(ref_loss):.6f} and gradients")

    # Everything the next step depends on: the data order is a function of the seed and the
    # stream position.
    state = {"params": params, "batch_stats": batch_stats, "opt_state": init_optimizer(params), "data_position": 0}
    checkpoints = ARGS.checkpoint_dir and TrainingCheckpoints(ARGS.checkpoint_dir, ARGS.save_every)
    first = 0
    if checkpoints:
        state, first = checkpoints.restore(state)
        if lead:
            print(f"resumed from the checkpoint of step {first} in {ARGS.checkpoint_dir}" if first else
                  f"no checkpoint in {ARGS.checkpoint_dir}: starting from step 0")
    for i in range(first, ARGS.steps):
        position = int(state["data_position"])
        scans = my_scans(position)
        needed, overflows = rows_needed(scans), 0
        if needed > capacity:  # the batch does not fit: a larger bucket before it runs
            capacity, overflows = jsc.capacity_bucket(needed), 1
        while True:
            batch = [global_array(a, mesh, mine) for a in stack_shards(scans, capacity)]
            *new_state, loss, _, overflow = step(state["params"], state["batch_stats"], state["opt_state"], *batch)
            if not jsc.tensor.overflowed(overflow):
                break
            overflows += 1  # a layer overflowed: the same batch again at a larger bucket, nothing dropped
            capacity = jsc.grown_capacity(capacity, overflow)
        state = dict(zip(("params", "batch_stats", "opt_state"), new_state), data_position=position + global_batch)
        if lead:
            print(f"step {i}: loss {float(loss):.4f}" + (f" ({overflows} overflow(s), capacity {capacity})"
                                                         if overflows else ""), flush=True)
            if ARGS.metrics:
                with open(ARGS.metrics, "a") as metrics:
                    print(json.dumps({"step": i, "loss": float(loss), "overflows": overflows, "capacity": capacity}),
                          file=metrics)
        if checkpoints:
            checkpoints.save(i + 1, state)
    if checkpoints:
        checkpoints.close()


if __name__ == "__main__":
    main()
