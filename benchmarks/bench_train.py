"""MinkUNet18 training step against its eval forward: time and XLA temp memory per voxel.

    python benchmarks/bench_train.py [--capacities 81920 131072] [--repeats 3]

One KITTI scan (``000000`` by default) at 0.05 m over the full range, padded to each
capacity; jitted eval forward, and the training step of ``bench_cpu.py`` (loss, gradients,
Adam update), each the median of ``--repeats`` runs after a warm-up, on all of this
process's CPUs. Temp memory is XLA's ``memory_analysis().temp_size_in_bytes`` of the
compiled function, per active voxel. Issue 19's targets: step <= 3x forward, <= 24 KiB per
voxel. The detection backbone is not measured yet.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import optax  # noqa: E402

from bench_cpu import DATA, FULL_RANGE, NUM_CLASSES, jax_call, median_time, training_step  # noqa: E402
from jax_sparseconv import models  # noqa: E402
from jax_sparseconv.utils import kitti_tensor  # noqa: E402


def measure(fn, args, repeats: int, voxels: int) -> tuple[float, float]:
    """``(ms, temp KiB per voxel)`` of the jitted ``fn`` on ``args``."""
    compiled = fn.lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    return median_time(jax_call(compiled, *args), repeats) * 1e3, temp / 1024 / voxels


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scan", default="000000.bin")
    parser.add_argument("--capacities", type=int, nargs="+", default=[81920, 131072])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{len(os.sched_getaffinity(0))} CPUs, jax {jax.__version__}", file=sys.stderr)
    print("| capacity | voxels | forward ms | step ms | step / forward | forward KiB/voxel | step KiB/voxel |")
    print("|---|---|---|---|---|---|---|")
    for capacity in args.capacities:
        x = kitti_tensor([DATA / args.scan], 0.05, FULL_RANGE, capacity=capacity)
        voxels = int(x.num_active)
        model = models.MinkUNet(NUM_CLASSES)
        variables = jax.jit(model.init)(jax.random.key(0), x)
        labels = jax.random.randint(jax.random.key(1), (x.capacity,), 0, NUM_CLASSES)
        params = variables["params"]
        forward_ms, forward_kib = measure(jax.jit(lambda variables, x: model.apply(variables, x)), (variables, x),
                                          args.repeats, voxels)
        step_args = (params, variables["batch_stats"], optax.adam(1e-3).init(params), x, labels)
        step_ms, step_kib = measure(training_step(model), step_args, args.repeats, voxels)
        print(f"| {capacity} | {voxels} | {forward_ms:.0f} | {step_ms:.0f} | {step_ms / forward_ms:.2f} | "
              f"{forward_kib:.1f} | {step_kib:.1f} |", flush=True)


if __name__ == "__main__":
    main()
