"""The 3D backbone of a LiDAR detector (SECOND / OpenPCDet's VoxelBackBone8x) on KITTI scans.

    python examples/detection_backbone.py [--scans 000000 000001 000002] [--repeats 5] [--checkpoint PATH]

Voxelizes the KITTI scans in ``../shared/data/kitti`` as OpenPCDet does for KITTI
(0.05 x 0.05 x 0.1 m voxels over x 0..70.4, y -40..40, z -3..1 m, the mean of at most 5
points per voxel, a ``(41, 1600, 1408)`` grid), runs ``jax_sparseconv.models.VoxelBackBone8x``
on them as one batch and on each alone, and times the jitted forward passes (compile time,
then the median of ``--repeats`` calls). The stride-8 output is flattened into the
bird's-eye-view map a detection head reads (``models.bev_features``: ``[B, 200, 176, 256]``),
and a PNG shows each scan from above next to the magnitude of its BEV features, with the
labelled KITTI boxes drawn on both.

Without ``--checkpoint`` the weights are random (the picture then shows where the
backbone has active sites, not what it learned). ``--checkpoint`` takes an OpenPCDet
checkpoint (``.pth`` with ``model_state``; PyTorch needed to read it) of a model with a
``VoxelBackBone8x`` and loads its ``backbone_3d.*`` tensors with ``jsc.convert.from_spconv``.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import jax_sparseconv as jsc
from jax_sparseconv import models, utils

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "kitti"
VOXEL_SIZE = (0.05, 0.05, 0.1)
GRID = (41, 1600, 1408)  # OpenPCDet adds one z layer to the (40, 1600, 1408) voxel grid
STRIDE = 8  # of the BEV map, in voxels


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", nargs="+", default=["000000", "000001", "000002"], help="KITTI frame ids")
    parser.add_argument("--data", type=pathlib.Path, default=DATA, help="folder with the .bin, label and calib files")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after the compiling one")
    parser.add_argument("--max-voxels", type=int, default=48_000,
                        help="voxel capacity per scan (OpenPCDet: 40000, which these scans exceed: 41,281 for 000000)")
    parser.add_argument("--checkpoint", type=pathlib.Path, help="an OpenPCDet checkpoint to load backbone_3d from")
    parser.add_argument("--backend", choices=["ffi", "xla"], default=None,
                        help="default: per platform, ffi where compiled (CPU, CUDA), else xla")
    parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("example_outputs"))
    return parser.parse_args(argv)


def load_backbone_checkpoint(path: pathlib.Path, variables):
    """``variables`` filled from the ``backbone_3d.*`` tensors of an OpenPCDet checkpoint."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("model_state", checkpoint)
    prefix = "backbone_3d."
    backbone = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if not backbone:
        raise ValueError(f"{path} has no '{prefix}*' tensors (keys start with {sorted(state)[:3]} ...)")
    return jsc.convert.from_spconv(backbone, variables)


def voxel_tensor(scans, max_voxels: int):
    """``scans``: a list of ``[N_i, 4]`` point arrays -> (the backbone's input tensor, voxels)."""
    voxels = [jsc.voxelize(points, VOXEL_SIZE, utils.KITTI_RANGE, max_voxels, max_points_per_voxel=5)
              for points in scans]
    return jsc.voxels.to_tensor(voxels, spatial_shape=GRID), voxels


def make_forward(model, max_voxels: int):
    @jax.jit
    def forward(variables, scans):
        """``scans``: a list of ``[N_i, 4]`` point arrays -> (BEV map, conv_out tensor, voxel counts)."""
        x, voxels = voxel_tensor(scans, max_voxels)
        out = model.apply(variables, x)
        return models.bev_features(out), out, [v.num_voxels for v in voxels]

    return forward


def padded(points: np.ndarray) -> jax.Array:
    """``points`` padded with NaN rows to ``jsc.capacity_bucket(N)``, so that scans of
    different sizes share one compilation (``voxelize`` drops NaN rows, counting them in
    ``num_invalid``)."""
    rows = jsc.capacity_bucket(len(points))
    return jnp.asarray(np.concatenate([points, np.full((rows - len(points), points.shape[1]), np.nan, np.float32)]))


def timed(fn, *args, repeats: int):
    """(result, seconds of the first call, median seconds of ``repeats`` more calls)."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return result, first, statistics.median(times) if times else float("nan")


def box_outlines(boxes: np.ndarray) -> np.ndarray:
    """``[M, 5, 2]`` closed BEV outlines (x, y) of ``(x, y, z, l, w, h, yaw)`` boxes."""
    corners = np.array([[0.5, 0.5], [-0.5, 0.5], [-0.5, -0.5], [0.5, -0.5], [0.5, 0.5]])
    local = corners[None] * boxes[:, None, 3:5]
    cos, sin = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    x = local[..., 0] * cos - local[..., 1] * sin + boxes[:, None, 0]
    y = local[..., 0] * sin + local[..., 1] * cos + boxes[:, None, 1]
    return np.stack([x, y], axis=-1)


def save_picture(path: pathlib.Path, names, points, bev, boxes) -> None:
    x0, y0, _, x1, y1, _ = utils.KITTI_RANGE
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 5.2 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        # x (forward) up, y (left) to the left: the view from above, as a driver sees it.
        inside = (points[row][:, 0] >= x0) & (points[row][:, 0] < x1) & (np.abs(points[row][:, 1]) < y1)
        p = points[row][inside]
        axes[row, 0].scatter(p[:, 1], p[:, 0], c=p[:, 2], s=0.2, cmap="viridis", vmin=-2.5, vmax=0.5, linewidths=0)
        magnitude = np.linalg.norm(bev[row], axis=-1)  # [H (y), W (x)]
        axes[row, 1].imshow(magnitude.T[::-1], extent=(y0, y1, x0, x1), cmap="magma", aspect="equal",
                           norm=matplotlib.colors.PowerNorm(0.5))
        for ax, title in zip(axes[row], (f"{name}: points (colour: height)", f"{name}: |BEV features|, stride 8")):
            for outline, label in zip(box_outlines(boxes[row][1]), boxes[row][0]):
                ax.plot(outline[:, 1], outline[:, 0], color="red", linewidth=1)
                ax.annotate(label, (outline[0, 1], outline[0, 0]), color="red", fontsize=7)
            ax.set(title=title, xlim=(y1, y0), ylim=(x0, x1), aspect="equal", xlabel="y (m)", ylabel="x (m)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    files = [args.data / f"{scan}.bin" for scan in args.scans]
    for file in files:
        if not file.is_file():
            raise SystemExit(f"no scan at {file} (the data lives in ../shared/data beside the repo; see --data)")
    points = [utils.load_kitti_points(file) for file in files]
    boxes = [utils.load_kitti_boxes(args.data / f"{s}_label_2.txt", args.data / f"{s}_calib.txt")
             if (args.data / f"{s}_label_2.txt").is_file() else ([], np.zeros((0, 7))) for s in args.scans]

    model = models.VoxelBackBone8x(backend=args.backend)
    forward = make_forward(model, args.max_voxels)
    variables = jax.jit(lambda key, scan: model.init(key, voxel_tensor([scan], args.max_voxels)[0]))(
        jax.random.key(0), padded(points[0]))
    if args.checkpoint:
        variables = load_backbone_checkpoint(args.checkpoint, variables)
    print(f"backend {jsc.backends.describe(args.backend)}; weights: "
          f"{args.checkpoint or 'random (pass --checkpoint for trained ones)'}")

    rows = []
    runs = [(name, [p]) for name, p in zip(args.scans, points)] + ([("batch", points)] if len(points) > 1 else [])
    for label, batch in runs:
        (bev, out, num_voxels), first, median = timed(forward, variables, [padded(p) for p in batch],
                                                      repeats=args.repeats)
        jsc.check_overflow(out)  # raises if a capacity (voxels, or a strided level) was too small
        rows.append((label, len(batch), sum(len(p) for p in batch), sum(int(n) for n in num_voxels),
                     int(out.num_active), first, median))
    print(f"{'scans':>8} {'B':>2} {'points':>8} {'voxels':>7} {'out sites':>9} {'compile+run s':>13} {'median ms':>9}")
    for label, b, n_points, n_voxels, n_out, first, median in rows:
        print(f"{label:>8} {b:>2} {n_points:>8} {n_voxels:>7} {n_out:>9} {first:>13.2f} {median * 1e3:>9.1f}")
    print(f"BEV features of the batch: {tuple(bev.shape)} {bev.dtype} (conv_out: {out.num_channels} channels "
          f"on a {out.spatial_shape} grid)")

    picture = args.out_dir / "detection_backbone.png"
    save_picture(picture, args.scans, points, np.asarray(bev), boxes)
    print(f"wrote {picture}")
    return {"bev": bev, "rows": rows, "picture": picture}


if __name__ == "__main__":
    main()
