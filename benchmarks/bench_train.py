"""Training step against eval forward, time and XLA temp memory per voxel, for two networks.

    python benchmarks/bench_train.py [--capacities 81920 131072] [--backbone-capacities 49152 81920]

- MinkUNet18 (20 classes): one KITTI scan (``000000`` by default) at 0.05 m over the full
  range; per-voxel softmax cross-entropy against random labels.
- The detection backbone: VoxelBackBone8x on the same scan in the KITTI detection range at
  (0.05, 0.05, 0.1) m (grid 41 x 1600 x 1408), its bird's-eye-view map and a 1x1 head (2
  anchors x (class + 7 box values)); squared error against random targets.

Each input is padded to each capacity. Eval forward and the training step (loss, gradients,
Adam update) are jitted, each the median of ``--repeats`` runs after a warm-up, on all of
this process's CPUs. Temp memory is XLA's ``memory_analysis().temp_size_in_bytes`` of the
compiled function, per active voxel. Issue 19's targets (MinkUNet): step <= 3x forward,
<= 24 KiB per voxel.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from bench_cpu import DATA, FULL_RANGE, NUM_CLASSES, jax_call, median_time, training_step  # noqa: E402
from jax_sparseconv import SparseConvTensor, models  # noqa: E402
from jax_sparseconv.utils import KITTI_RANGE, kitti_tensor  # noqa: E402

DETECTION_VOXEL = (0.05, 0.05, 0.1)
DETECTION_GRID = (41, 1600, 1408)  # OpenPCDet's grid: one z layer more than the range holds
HEAD_OUTPUTS = 2 * (1 + 7)


class Detector(nn.Module):
    """VoxelBackBone8x, its BEV map and a 1x1 head: ``[B, 200, 176, HEAD_OUTPUTS]``."""

    @nn.compact
    def __call__(self, x: SparseConvTensor, train: bool = False) -> jnp.ndarray:
        return nn.Dense(HEAD_OUTPUTS)(models.bev_features(models.VoxelBackBone8x()(x, train)))


def detection_loss(out, x, targets):
    return jnp.mean((out - targets) ** 2)


def detection_input(scan: str, capacity: int) -> SparseConvTensor:
    x = kitti_tensor([DATA / scan], DETECTION_VOXEL, KITTI_RANGE, capacity=capacity)
    return SparseConvTensor(x.features, x.indices, DETECTION_GRID, x.batch_size)


def cases(args):
    """``(network, capacity, model, input, step, step target)`` for every measured case."""
    for capacity in args.capacities:
        x = kitti_tensor([DATA / args.scan], 0.05, FULL_RANGE, capacity=capacity)
        labels = jax.random.randint(jax.random.key(1), (x.capacity,), 0, NUM_CLASSES)
        model = models.MinkUNet(NUM_CLASSES)
        yield "MinkUNet18", capacity, model, x, training_step(model), labels
    for capacity in args.backbone_capacities:
        x = detection_input(args.scan, capacity)
        model = Detector()
        targets = jax.random.normal(jax.random.key(1), (1, 200, 176, HEAD_OUTPUTS))
        yield "VoxelBackBone8x + head", capacity, model, x, training_step(model, detection_loss), targets


def measure(fn, args, repeats: int, voxels: int) -> tuple[float, float]:
    """``(ms, temp KiB per voxel)`` of the jitted ``fn`` on ``args``."""
    compiled = fn.lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    return median_time(jax_call(compiled, *args), repeats) * 1e3, temp / 1024 / voxels


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scan", default="000000.bin")
    parser.add_argument("--capacities", type=int, nargs="*", default=[81920, 131072])
    parser.add_argument("--backbone-capacities", type=int, nargs="*", default=[49152, 81920])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{len(os.sched_getaffinity(0))} CPUs, jax {jax.__version__}", file=sys.stderr)
    print("| network | capacity | voxels | forward ms | step ms | step / forward | forward KiB/voxel "
          "| step KiB/voxel |")
    print("|---|---|---|---|---|---|---|---|")
    for network, capacity, model, x, step, targets in cases(args):
        voxels = int(x.num_active)
        variables = jax.jit(model.init)(jax.random.key(0), x)
        params = variables["params"]
        forward_ms, forward_kib = measure(jax.jit(lambda variables, x: model.apply(variables, x)), (variables, x),
                                          args.repeats, voxels)
        step_args = (params, variables["batch_stats"], optax.adam(1e-3).init(params), x, targets)
        step_ms, step_kib = measure(step, step_args, args.repeats, voxels)
        print(f"| {network} | {capacity} | {voxels} | {forward_ms:.0f} | {step_ms:.0f} | {step_ms / forward_ms:.2f} | "
              f"{forward_kib:.1f} | {step_kib:.1f} |", flush=True)


if __name__ == "__main__":
    main()
