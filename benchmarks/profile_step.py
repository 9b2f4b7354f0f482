"""Where a MinkUNet18 training step (or eval forward) spends its time, from a ``jax.profiler`` trace.

    python benchmarks/profile_step.py [--capacity 81920] [--forward] [--by-shape]

Runs bench_train's MinkUNet18 step (KITTI ``000000`` at 0.05 m, loss, gradients, Adam), or with
``--forward`` the eval forward, once to compile, traces one more run, and prints the thread time of XLA's CPU thunks summed over all
of XLA's threads: native kernels by custom-call target (``jsc_gather_matmul_v2`` runs both the
forward and the input gradient of a conv, ``jsc_gather_matmul_grad_v2`` its kernel gradient),
the rest by fusion kind. Thread time, not wall time: XLA runs independent thunks side by side.
``--by-shape`` also lists the native calls by target and operand shapes (a conv's forward,
input gradient and kernel gradient are told apart by their shapes).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import optax  # noqa: E402

from bench_cpu import DATA, FULL_RANGE, NUM_CLASSES, training_step  # noqa: E402
from jax_sparseconv import models  # noqa: E402
from jax_sparseconv.utils import kitti_tensor  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capacity", type=int, default=81920)
    parser.add_argument("--forward", action="store_true", help="the eval forward instead of the training step")
    parser.add_argument("--by-shape", action="store_true", help="also list native calls by operand shapes")
    args = parser.parse_args()
    x = kitti_tensor([DATA / "000000.bin"], 0.05, FULL_RANGE, capacity=args.capacity)
    labels = jax.random.randint(jax.random.key(1), (x.capacity,), 0, NUM_CLASSES)
    model = models.MinkUNet(NUM_CLASSES)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    params = variables["params"]
    if args.forward:
        step = jax.jit(lambda variables, x: model.apply(variables, x, train=False).features)
        step_args = (variables, x)
    else:
        step = training_step(model)
        step_args = (params, variables["batch_stats"], optax.adam(1e-3).init(params), x, labels)
    hlo = step.lower(*step_args).compile().as_text()
    targets = dict(re.findall(r"%(\S+) = .*?custom_call_target=\"([^\"]+)\"", hlo))
    jax.block_until_ready(step(*step_args))
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            jax.block_until_ready(step(*step_args))
        profile = jax.profiler.ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
    seconds, calls, per_call = collections.Counter(), collections.Counter(), collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):  # XLA's CPU threads
                continue
            for event in line.events:
                if event.name.startswith("ThunkExecutor") or event.name.startswith("end:"):
                    continue
                kind = targets.get(event.name) or re.sub(r"[.\d]+$", "", event.name)
                seconds[kind] += event.duration_ns / 1e9
                calls[kind] += 1
                if event.name in targets:
                    per_call[event.name] += event.duration_ns / 1e9
    total = sum(seconds.values())
    print(f"{int(x.num_active)} voxels, capacity {x.capacity}; thread time {total:.2f} s")
    print("| thunk | calls | thread s | share |\n|---|---|---|---|")
    for kind, value in seconds.most_common(12):
        print(f"| {kind} | {calls[kind]} | {value:.2f} | {value / total:.0%} |")
    if args.by_shape:
        print_by_shape(hlo, targets, per_call)


def print_by_shape(hlo: str, targets: dict, seconds: dict) -> None:
    """Native calls grouped by target and operand shapes (from the compiled HLO), slowest first."""
    shape_of = dict(re.findall(r"%(\S+) = ([a-z]\w*\[[\d,]*\])", hlo))
    groups, counts = collections.Counter(), collections.Counter()
    for name, operands in re.findall(r"%(\S+) = \S+ custom-call\(([^)]*)\)", hlo):
        if name in targets:
            shapes = " ".join(shape_of.get(o.strip().lstrip("%"), "?") for o in operands.split(","))
            groups[targets[name], shapes] += seconds.get(name, 0.0)
            counts[targets[name], shapes] += 1
    print("\n| target | operands | calls | thread ms | ms per call |\n|---|---|---|---|---|")
    for (target, shapes), value in groups.most_common():
        n = counts[target, shapes]
        print(f"| {target} | {shapes} | {n} | {value * 1e3:.1f} | {value * 1e3 / n:.1f} |")


if __name__ == "__main__":
    main()
