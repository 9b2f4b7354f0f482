"""Reading other point cloud formats: a nuScenes LiDAR sweep and an indoor PCD frame.

    python examples/read_point_clouds.py [--out-dir example_outputs]

- ``../shared/data/nuscenes/*.pcd.bin``: a nuScenes LIDAR_TOP sweep (32 beams; x, y, z,
  intensity, ring), read with ``jsc.pcd.load_nuscenes_points`` and voxelized at 0.1 m over
  nuScenes' usual 102.4 x 102.4 x 8 m range around the car.
- ``../shared/data/pcl/office1.pcd``: an organized 640 x 480 RGB-D frame from the Point
  Cloud Library, stored ``binary_compressed`` (LZF), read with ``jsc.pcd.read_pcd``;
  invalid pixels are NaN (``voxelize`` drops and counts them), colours are unpacked with
  ``jsc.pcd.unpack_rgb`` and become voxel features next to the coordinates.

Each cloud then goes through the same small Linen network (SubM conv, strided conv, global
average pool) with random weights, to show that any ``[N, F]`` point array becomes a
``SparseConvTensor``. A PNG shows the sweep from above, the PCD frame as the camera saw it,
and its voxels from above.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import jax_sparseconv as jsc
import jax_sparseconv.linen as spnn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
NUSCENES_RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
OFFICE_RANGE = (-3.0, -2.5, 0.0, 3.0, 2.5, 6.0)  # camera frame: x right, y down, z forward (metres)


class TinyNet(nn.Module):
    """SubM conv -> stride-2 conv -> global average pool: ``[B, 32]``."""

    @nn.compact
    def __call__(self, x: jsc.SparseConvTensor) -> jax.Array:
        x = spnn.SubMConv3d(16, 3, indice_key="subm1")(x)
        x = x.replace_feature(nn.relu(x.features))
        x = spnn.SparseConv3d(32, 3, strides=2, padding=1, out_capacity=2.0)(x)
        return jsc.functional.global_avg_pool(x.replace_feature(nn.relu(x.features)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=pathlib.Path, default=DATA, help="the shared data folder")
    parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("example_outputs"))
    return parser.parse_args(argv)


def run_network(name: str, points: np.ndarray, voxel_size: float, coors_range, max_voxels: int):
    """Voxelizes ``points [N, F]`` (jitted), runs TinyNet on them and prints what happened."""
    start = time.perf_counter()
    voxels = jax.jit(jsc.voxelize, static_argnums=(1, 2, 3))(jnp.asarray(points), voxel_size, coors_range, max_voxels)
    x = jsc.voxels.to_tensor(voxels)
    model = TinyNet()
    variables = jax.jit(model.init)(jax.random.key(0), x)
    pooled = jax.block_until_ready(jax.jit(model.apply)(variables, x))
    seconds = time.perf_counter() - start
    dropped = len(points) - int(jnp.sum(voxels.point_to_voxel >= 0))
    print(f"{name}: {len(points)} points x {points.shape[1]} features, {int(voxels.num_invalid)} non-finite, "
          f"{dropped} dropped in all -> {int(voxels.num_voxels)} voxels at {voxel_size} m on a "
          f"{voxels.spatial_shape} grid; TinyNet -> {tuple(pooled.shape)} ({seconds:.1f} s with compiling)")
    return voxels


def main(argv=None) -> dict:
    args = parse_args(argv)
    sweep_file = next(iter(sorted((args.data / "nuscenes").glob("*.pcd.bin"))), None)
    pcd_file = args.data / "pcl" / "office1.pcd"
    if sweep_file is None or not pcd_file.is_file():
        raise SystemExit(f"no nuScenes sweep or office1.pcd under {args.data} (see --data)")

    sweep = jsc.pcd.load_nuscenes_points(sweep_file)  # [N, 5]: x, y, z, intensity, ring
    sweep_voxels = run_network("nuScenes sweep", sweep[:, :4], 0.1, NUSCENES_RANGE, 32_768)

    start = time.perf_counter()
    header = jsc.pcd.read_pcd_header(pcd_file)
    fields = jsc.pcd.read_pcd(pcd_file)
    width, height = int(header["WIDTH"][0]), int(header["HEIGHT"][0])
    print(f"{pcd_file.name}: {header['DATA'][0]} PCD, fields {header['FIELDS']}, organized {width} x {height}, "
          f"read in {time.perf_counter() - start:.2f} s")
    rgb = jsc.pcd.unpack_rgb(fields["rgb"])
    office = np.concatenate([np.stack([fields["x"], fields["y"], fields["z"]], axis=1),
                             rgb.astype(np.float32) / 255], axis=1)  # [N, 6]: x, y, z, r, g, b
    office_voxels = run_network("office1.pcd", office, 0.05, OFFICE_RANGE, 32_768)

    fig, axes = plt.subplots(1, 3, figsize=(18, 6))
    inside = np.all(np.abs(sweep[:, :2]) < 51.2, axis=1)
    axes[0].scatter(sweep[inside, 0], sweep[inside, 1], c=np.log1p(sweep[inside, 3]), s=0.3, cmap="plasma",
                    linewidths=0)
    axes[0].set(title=f"nuScenes sweep from above ({len(sweep)} points)", aspect="equal",
                xlabel="x (m)", ylabel="y (m)")
    image = np.where(np.isfinite(fields["z"])[:, None], rgb, 0).reshape(height, width, 3)
    axes[1].imshow(image)
    axes[1].set(title=f"office1.pcd as an image ({width} x {height}; black: no depth)")
    axes[1].axis("off")
    occupied = np.asarray(office_voxels.num_points) > 0
    coords = np.asarray(office_voxels.coords)[occupied]  # (z, y, x) voxel indices
    colours = np.asarray(office_voxels.features)[occupied, 3:6]
    # From above: each (z, x) column shows its highest voxel (smallest camera y), white where empty.
    top = np.ones(office_voxels.spatial_shape[::2] + (3,))
    order = np.argsort(-coords[:, 1])  # highest last, so it is the one that stays
    top[coords[order, 0], coords[order, 2]] = np.clip(colours[order], 0, 1)
    axes[2].imshow(top, origin="lower", extent=(OFFICE_RANGE[0], OFFICE_RANGE[3], OFFICE_RANGE[2], OFFICE_RANGE[5]))
    axes[2].set(title=f"office1.pcd voxels from above ({int(office_voxels.num_voxels)} at 0.05 m)",
                aspect="equal", xlabel="x (m, right)", ylabel="z (m, forward)")
    fig.tight_layout()
    picture = args.out_dir / "point_clouds.png"
    picture.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(picture, dpi=100)
    plt.close(fig)
    print(f"wrote {picture}")
    return {"sweep_voxels": sweep_voxels, "office_voxels": office_voxels, "picture": picture}


if __name__ == "__main__":
    main()
