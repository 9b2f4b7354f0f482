"""Capacity planning: how many active sites each layer of a model sees on sample scans.

    python -m jax_sparseconv.capacity SCANS... --voxel-size 0.05 [--model minkunet] [--buckets 3]

voxelizes each scan (KITTI ``.bin``, nuScenes ``.pcd.bin``, ``.pcd``, or an ``[N, >=3]``
``.npy`` of x, y, z first), runs the model (tiny widths: only its sites matter) with room for
every site, and prints per layer the active sites (max, p99) and, for the layers that create
sites, their largest ratio to the level above, then a few input capacity buckets (few buckets, few compilations) with the fraction
of scans each holds. ``plan_capacities`` returns the same as a ``CapacityPlan``.

Use the plan as: input capacity = the smallest bucket that holds a scan, and each strided
layer's ``out_capacity`` >= its ratio (``suggested_out_capacities``). A scan that still
overflows is reported (``jsc.check_overflow``); the examples then run that batch again at
a larger bucket (``jsc.grown_capacity``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_sparseconv import _layers, pcd, utils
from jax_sparseconv.tensor import SparseConvTensor, capacity_bucket, from_numpy

__all__ = ["CapacityPlan", "LayerSites", "load_points", "plan_capacities"]


@dataclasses.dataclass(frozen=True)
class LayerSites:
    """Active sites of one layer's output over the scans."""
    name: str
    max: int
    p99: float
    max_ratio: float  # largest (sites / sites of the level above) over the scans; strided layers only


@dataclasses.dataclass(frozen=True)
class CapacityPlan:
    voxels: np.ndarray                 # input voxels of each scan
    layers: tuple[LayerSites, ...]     # layers that change the active sites, in call order
    strided: tuple[str, ...]           # those that downsample (the others return to a level above)
    buckets: tuple[int, ...]           # input capacities, smallest first
    fits: tuple[float, ...]            # fraction of the scans that each bucket holds

    def suggested_out_capacities(self, margin: float = 1.1) -> dict[str, float]:
        """Per strided layer: ``out_capacity`` as a multiple of the level above's capacity
        (MinkUNet's ``out_capacities``, in order), its largest ratio times ``margin``
        rounded up to 0.05, at most 1 where a level never held more sites than the one above."""
        suggested = {}
        for layer in self.layers:
            if layer.name in self.strided:
                value = math.ceil(20 * margin * layer.max_ratio) / 20
                suggested[layer.name] = min(value, 1.0) if layer.max_ratio <= 1 else value
        return suggested

    def table(self) -> str:
        """The plan as the command prints it."""
        lines = [f"{len(self.voxels)} scans: input voxels max {self.voxels.max()}, "
                 f"p99 {np.percentile(self.voxels, 99):.0f}, min {self.voxels.min()}",
                 f"{'layer':<28} {'max sites':>10} {'p99':>10} {'max / level above':>18}"]
        lines += [f"{layer.name:<28} {layer.max:>10} {layer.p99:>10.0f} "
                  + (f"{layer.max_ratio:>18.3f}" if layer.name in self.strided else f"{'':>18}")
                  for layer in self.layers]
        lines.append("input capacity buckets: " + ", ".join(f"{bucket} (holds {fit:.0%} of the scans)"
                                                           for bucket, fit in zip(self.buckets, self.fits)))
        return "\n".join(lines)


def load_points(path: str | os.PathLike) -> np.ndarray:
    """``[N, >=3]`` float32 points (x, y, z first) of a scan file."""
    path = os.fspath(path)
    if path.endswith(".pcd.bin"):
        return pcd.load_nuscenes_points(path)
    if path.endswith(".bin"):
        return utils.load_kitti_points(path)
    if path.endswith(".pcd"):
        fields = pcd.read_pcd(path)
        return np.stack([fields["x"], fields["y"], fields["z"]], axis=1).astype(np.float32)
    if path.endswith(".npy"):
        return np.load(path).astype(np.float32)
    raise ValueError(f"{path}: unknown scan format (.bin, .pcd.bin, .pcd or .npy)")


MODELS = ("minkunet", "voxelbackbone8x")


def _model(name: str, room: float):
    """The model at tiny widths; ``room`` scales the capacities of levels that can hold
    more sites than the level above."""
    from jax_sparseconv import models
    if name == "minkunet":  # 2x2x2 stride-2 levels hold at most the sites of the level above
        return models.MinkUNet(2, stem_features=2, encoder_features=(2,) * 4, decoder_features=(2,) * 4,
                               blocks_per_stage=1, out_capacities=(1.0,) * 4)
    if name == "voxelbackbone8x":  # 3x3x3 stride-2 convs create sites (up to 1.7x the input on KITTI)
        return models.VoxelBackBone8x(features=(2,) * 5, out_capacities=(2.0 * room, room, room, room))
    raise ValueError(f"unknown model {name!r} (known: {', '.join(MODELS)})")


def _layer_sites(model_name: str, coords: np.ndarray, spatial_shape) -> dict[str, tuple[int, bool]]:
    """``{module path: (active sites, strided)}`` of the outputs of the model's convs that
    are not submanifold (strided: creating sites, else an inverse conv), run with capacities
    that held every site (grown until nothing overflowed)."""
    x = from_numpy(np.zeros((len(coords), 1), np.float32),
                   np.concatenate([np.zeros((len(coords), 1), np.int32), coords], axis=1), spatial_shape, 1)
    strided = set()

    def changes_sites(module, method_name: str) -> bool:  # called while tracing
        mode = getattr(module, "mode", _layers.SUBM) if method_name == "__call__" else _layers.SUBM
        if mode in (_layers.REGULAR, _layers.TRANSPOSED):
            strided.add("/".join(module.scope.path))
        return mode != _layers.SUBM

    def forward(model, x):
        variables = model.init(jax.random.key(0), x)
        _, state = model.apply(variables, x, capture_intermediates=changes_sites, mutable=["intermediates"])
        outputs = jax.tree_util.tree_flatten_with_path(
            state["intermediates"], is_leaf=lambda leaf: isinstance(leaf, SparseConvTensor))[0]
        counts = {"/".join(str(key.key) for key in path[:-2]): (y.indices[:, 0] >= 0).sum() for path, y in outputs}
        return counts, jnp.stack([y.overflow for _, y in outputs])

    for room in (1.0, 2.0, 4.0):
        counts, overflow = jax.device_get(jax.jit(forward, static_argnums=0)(_model(model_name, room), x))
        if not np.any(overflow[:, 0] > 0):
            return {name: (int(count), name in strided) for name, count in counts.items()}
    raise RuntimeError(f"{model_name}: layers still overflow at 4x their usual capacities: {overflow.tolist()}")


def plan_capacities(scans: Sequence[np.ndarray], voxel_size: float, coors_range: Sequence[float] | None = None,
                    model: str = "minkunet", buckets: int = 3) -> CapacityPlan:
    """The plan for ``scans`` (``[N, >=3]`` point arrays) voxelized at ``voxel_size`` in
    ``coors_range`` (default: the box around all points)."""
    if not scans:
        raise ValueError("plan_capacities needs at least one scan")
    if coors_range is None:
        low = np.floor(np.min([s[:, :3].min(axis=0) for s in scans], axis=0))
        high = np.ceil(np.max([s[:, :3].max(axis=0) for s in scans], axis=0)) + voxel_size
        coors_range = (*low, *high)
    _model(model, 1.0)  # an unknown name fails before any work
    voxels, sites = [], []
    for points in scans:
        coords, _, shape = utils.voxelize(points, voxel_size, coors_range)
        voxels.append(len(coords))
        sites.append(_layer_sites(model, coords, shape))
    voxels = np.asarray(voxels)
    strided = tuple(name for name, (_, is_strided) in sites[0].items() if is_strided)

    def level_ratios(scan_sites, n):  # each strided layer's sites / those of the level above
        above, ratios = n, {}
        for name in strided:
            ratios[name], above = scan_sites[name][0] / max(above, 1), scan_sites[name][0]
        return ratios
    ratios = [level_ratios(s, n) for s, n in zip(sites, voxels)]
    layers = tuple(LayerSites(name, max(s[name][0] for s in sites), float(np.percentile([s[name][0] for s in sites], 99)),
                              max((r[name] for r in ratios), default=0.0) if name in strided else float("nan"))
                   for name in sites[0])
    # Buckets that hold 1/buckets, 2/buckets, ... of the scans, the largest every scan.
    by_size = np.sort(voxels)
    chosen = sorted({capacity_bucket(int(by_size[math.ceil(len(voxels) * i / buckets) - 1]))
                     for i in range(1, buckets + 1)})
    fits = tuple(float(np.mean(voxels <= bucket)) for bucket in chosen)
    return CapacityPlan(voxels, layers, strided, tuple(chosen), fits)


def main(argv=None) -> CapacityPlan:
    """The command line: prints the plan of the scans it is given, and returns it."""
    parser = argparse.ArgumentParser(prog="python -m jax_sparseconv.capacity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scans", nargs="+", help="scan files")
    parser.add_argument("--voxel-size", type=float, required=True, help="voxel edge in metres")
    parser.add_argument("--range", type=float, nargs=6, default=None, metavar=("XMIN", "YMIN", "ZMIN", "XMAX", "YMAX", "ZMAX"),
                        help="the grid (default: the box around all points)")
    parser.add_argument("--model", default="minkunet", choices=MODELS)
    parser.add_argument("--buckets", type=int, default=3, help="how many input capacity buckets")
    args = parser.parse_args(argv)
    plan = plan_capacities([load_points(path) for path in args.scans], args.voxel_size, args.range, args.model,
                           args.buckets)
    print(plan.table())
    print("suggested out_capacity of each strided layer (a multiple of the level above's capacity): "
          + ", ".join(f"{name} {value:.2f}" for name, value in plan.suggested_out_capacities().items()))
    return plan


if __name__ == "__main__":
    main()
