"""How much multiply work the CUDA kernels' mask order saves, counted (no GPU needed).

    python benchmarks/mask_order_count.py [--scan ../shared/data/kitti/000000.bin]

The CUDA convolution kernels (``xla_ffi/conv.cu``) multiply one (64-row tile, kernel offset)
product wherever a row of the tile has a neighbour through that offset, and the kernel
gradient one (16-row group, offset) product likewise. This counts those products for the
rulebooks of a KITTI scan at 0.05 m, with the rows in their own order and sorted (stably) by
their neighbour masks, as the kernels sort them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from jax_sparseconv.backends import ffi
from jax_sparseconv.geometry import make_geometry
from jax_sparseconv.utils import kitti_tensor

SCAN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kitti" / "000000.bin"
FULL_RANGE = (-80.0, -80.0, -5.0, 80.0, 80.0, 3.0)


def products(has: np.ndarray, rows_per_tile: int) -> tuple[int, int]:
    """(products with a pair, all products) of ``has [rows, K]`` cut into tiles of rows."""
    pad = (-has.shape[0]) % rows_per_tile
    tiles = np.concatenate([has, np.zeros((pad, has.shape[1]), bool)]).reshape(-1, rows_per_tile, has.shape[1])
    return int(tiles.any(axis=1).sum()), tiles.shape[0] * has.shape[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scan", type=Path, default=SCAN)
    args = parser.parse_args()
    x = kitti_tensor([args.scan], 0.05, FULL_RANGE)
    print(f"{args.scan.name}: {int(x.num_active)} voxels, capacity {x.capacity}")
    print("| map | rows | (64-row tile, offset) products | (16-row group, offset) products |")
    print("|---|---|---|---|")
    for mode, kernel, stride, padding in (("subm", 3, 1, 0), ("regular", 3, 2, 1)):
        rulebook = ffi.build_rulebook(x.indices, make_geometry(mode, x.spatial_shape, kernel, stride, padding, 1),
                                      1, x.capacity)
        maps = {"out_nbr": rulebook[1]} if mode == "subm" else {"out_nbr": rulebook[1], "in_nbr": rulebook[2]}
        for name, nbr in maps.items():
            has = np.asarray(nbr).T >= 0  # [rows, K]
            masks = (has * (np.uint64(1) << np.arange(has.shape[1], dtype=np.uint64))).sum(axis=1, dtype=np.uint64)
            for order_name, order in (("in order", np.arange(len(has))),
                                      ("mask order", np.argsort(masks, kind="stable"))):
                (t, t_all), (g, g_all) = products(has[order], 64), products(has[order], 16)
                print(f"| {mode} 3^3 {name}, {order_name} | {len(has)} | {t} of {t_all} | {g} of {g_all} |")


if __name__ == "__main__":
    main()
