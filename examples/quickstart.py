"""Quickstart: a small sparse U-Net step on a real KITTI scan, under jax.jit.

    python examples/quickstart.py [--data PATH] [--voxel-size 0.05] [--backend ffi|xla]

Loads a Velodyne scan, voxelizes it at 0.05 m (features: mean x, y, z, reflectance
per voxel), and runs submanifold conv -> strided conv -> submanifold conv -> inverse
conv -> global average pool in one jitted function, then checks capacities.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_sparseconv as jsc
from jax_sparseconv import functional as F
from jax_sparseconv.backends import describe
from jax_sparseconv.utils import kitti_tensor, load_kitti_points

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "kitti" / "000000.bin"


def init_params(key, c_in: int) -> dict:
    """Kernels in Flax layout ``(*kernel_size, C_in, C_out)``."""
    shapes = {"subm1": (3, 3, 3, c_in, 16), "down1": (3, 3, 3, 16, 32),
              "subm2": (3, 3, 3, 32, 32), "up1": (3, 3, 3, 32, 16)}
    keys = jax.random.split(key, len(shapes))
    return {name: jax.random.normal(k, shape, jnp.float32) / np.sqrt(np.prod(shape[:-1]))
            for k, (name, shape) in zip(keys, shapes.items())}


def make_network(down_capacity: int, backend: str | None):
    def network(params, x: jsc.SparseConvTensor):
        relu = lambda t: t.replace_feature(jax.nn.relu(t.features))
        h = relu(F.sparse_conv(x, params["subm1"], subm=True, indice_key="subm1", backend=backend))
        d = relu(F.sparse_conv(h, params["down1"], strides=2, padding=1, indice_key="down1",
                               out_capacity=down_capacity, backend=backend))
        d = relu(F.sparse_conv(d, params["subm2"], subm=True, indice_key="subm2", backend=backend))
        # Back to exactly the sites (and rows) of h, through the transpose of "down1".
        u = F.sparse_conv(d, params["up1"], inverse=True, indice_key="down1", backend=backend)
        return d, u, F.global_avg_pool(u)

    return jax.jit(network)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA, help="KITTI .bin scan")
    parser.add_argument("--voxel-size", type=float, default=0.05, help="voxel edge in metres")
    parser.add_argument("--backend", choices=["ffi", "xla"], default=None,
                        help="default: per platform, ffi where compiled (CPU, CUDA), else xla")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after the first")
    args = parser.parse_args()

    print("build_info:", jsc.build_info())
    print(f"backend: {describe(args.backend)}; JAX's default device is a {jax.default_backend()}")

    if not args.data.is_file():
        parser.error(f"no scan at {args.data} (the data lives in ../shared/data beside the repo; see --data)")
    points = load_kitti_points(args.data)
    start = time.perf_counter()
    x = kitti_tensor(points, voxel_size=args.voxel_size)
    print(f"{args.data.name}: {len(points)} points -> {int(x.num_active)} voxels "
          f"({time.perf_counter() - start:.2f} s), spatial_shape {x.spatial_shape}, capacity {x.capacity}")

    # A static capacity for the strided conv's output, whose site count is only known
    # once its rulebook is built. On 0.05 m LiDAR voxels a k3 s2 conv makes more sites
    # than it reads (each input reaches up to 8 outputs), so leave room; too small a
    # value is not dropped silently: check_overflow below reports the count needed.
    down_capacity = 2 * x.capacity
    step = make_network(down_capacity, args.backend)
    params = init_params(jax.random.key(0), x.num_channels)

    start = time.perf_counter()
    d, u, pooled = jax.block_until_ready(step(params, x))
    compile_s = time.perf_counter() - start
    jsc.check_overflow((d, u))  # raises CapacityOverflowError if any capacity was too small

    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params, x))
        times.append(time.perf_counter() - start)

    print(f"active voxels: input {int(x.num_active)}, after down1 {int(d.num_active)} "
          f"(capacity {d.capacity}, spatial_shape {d.spatial_shape}), after inverse {int(u.num_active)}")
    print(f"shapes: down1 features {d.features.shape}, inverse features {u.features.shape}, "
          f"global_avg_pool {pooled.shape}")
    assert np.array_equal(np.asarray(u.indices), np.asarray(x.indices)), "inverse conv must restore the input sites"
    print(f"pooled[0, :4] = {np.asarray(pooled)[0, :4]}")
    print(f"first call (compile + run): {compile_s:.2f} s; "
          f"median of {args.repeats} calls: {statistics.median(times) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
