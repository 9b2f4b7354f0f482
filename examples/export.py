"""Export a trained segmentation model for CPU, CUDA and TPU, and serve it in a fresh process.

    python examples/export.py [--steps 80] [--voxel-size 0.3] [--width 8] [--out-dir example_outputs]

Trains the MinkUNet of ``examples/segmentation.py`` briefly on the labeled SemanticKITTI
scan in ``../shared/data/semantickitti``, then exports its inference function (points in,
one class per point out, the trained weights inside) for "cpu", "cuda" and "tpu" at once
with ``jsc.export``: with the default backend the cpu part calls our native kernels, the
cuda part our CUDA kernels (where this installation has them, ``jsc.build_info()``), and
the tpu part the pure-JAX xla backend. The artifact is written to ``segmentation_model.jax``.

Then a fresh Python, which imports only jax, numpy and jax_sparseconv (``--serve``: none of
the training code), loads the file with ``jsc.deserialize``, runs it on the scan, prints
the classes it found and writes ``export_served.png`` (the scan from above, coloured by
served class). This process then checks that the served predictions are bitwise its own.
A point cloud of any size up to the exported point capacity is served; the rest is padding
(NaN points, which voxelization drops).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import jax_sparseconv as jsc

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

EXAMPLES = pathlib.Path(__file__).resolve().parent
PLATFORMS = ("cpu", "cuda", "tpu")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80, help="training steps")
    parser.add_argument("--voxel-size", type=float, default=0.3, help="voxel edge in metres")
    parser.add_argument("--width", type=int, default=8, help="channels of the MinkUNet's first level")
    parser.add_argument("--data", type=pathlib.Path, default=EXAMPLES.parents[1] / "shared" / "data" / "semantickitti",
                        help="folder with o3dml_000700_points.npy")
    parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("example_outputs"))
    parser.add_argument("--serve", type=pathlib.Path, default=None, metavar="ARTIFACT",
                        help="only serve: load ARTIFACT (and its .json), run it on the scan, print and draw the result")
    return parser.parse_args(argv)


def padded(points: np.ndarray, capacity: int) -> np.ndarray:
    """``points [P, 3]`` padded with NaN rows to ``[capacity, 3]``."""
    if len(points) > capacity:
        raise SystemExit(f"{len(points)} points do not fit the exported point capacity {capacity}")
    return np.concatenate([points, np.full((capacity - len(points), 3), np.nan, np.float32)])


def serve(artifact: pathlib.Path, points: np.ndarray, out_dir: pathlib.Path) -> np.ndarray:
    """Loads an exported model and its label map, runs it on ``points``: one class per point."""
    exported = jsc.deserialize(artifact.read_bytes())
    labels = json.loads(artifact.with_suffix(".json").read_text())
    predicted, overflow = exported.call(padded(points, exported.in_avals[0].shape[0]))
    jsc.tensor.raise_if_overflow(np.asarray(overflow), "the served model")
    predicted = np.asarray(predicted)[:len(points)]
    print(f"served {artifact.name} (exported for {', '.join(exported.platforms)}) on "
          f"{jax.devices()[0].platform}: {len(points)} points, {int(np.sum(predicted >= 0))} inside the grid")
    found = np.bincount(predicted[predicted >= 0], minlength=len(labels["classes"]))
    ranked = [c for c in np.argsort(-found, kind="stable") if found[c]]  # classes found, most points first
    for c in ranked[:6]:
        print(f"{labels['classes'][c]:>14} {found[c]:>7} points")

    colours = matplotlib.colors.to_rgba_array(labels["colours"])
    fig, ax = plt.subplots(figsize=(7, 7))
    inside = predicted >= 0
    ax.scatter(points[inside, 0], points[inside, 1], c=colours[predicted[inside]], s=0.5, linewidths=0)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours[c], label=labels["classes"][c])
               for c in ranked[:8]]
    ax.legend(handles=handles, loc="lower right", fontsize=7, markerscale=1.5)
    ax.set(title=f"served in a fresh process from {artifact.name}", aspect="equal", xlabel="x (m)", ylabel="y (m)")
    picture = out_dir / "export_served.png"
    fig.tight_layout()
    fig.savefig(picture, dpi=110)
    plt.close(fig)
    print(f"wrote {picture}")
    return predicted


def main(argv=None) -> dict:
    args = parse_args(argv)
    points_file = args.data / "o3dml_000700_points.npy"
    if not points_file.is_file():
        raise SystemExit(f"no scan at {points_file} (the data lives in ../shared/data beside the repo; see --data)")
    points = np.load(points_file).astype(np.float32)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.serve is not None:  # the fresh process: no training code imported
        np.save(args.out_dir / "served.npy", serve(args.serve, points, args.out_dir))
        return {}

    sys.path.insert(0, str(EXAMPLES))
    import segmentation

    trained = segmentation.main(["--steps", str(args.steps), "--voxel-size", str(args.voxel_size), "--width",
                                 str(args.width), "--data", str(args.data), "--out-dir", str(args.out_dir)])
    model, variables, max_voxels = trained["model"], trained["variables"], trained["max_voxels"]
    capacity = jsc.capacity_bucket(len(points))

    def infer(points):
        """``points [capacity, 3]`` (NaN rows: padding) -> (class per point, -1 outside the grid;
        the overflow record)."""
        no_labels = jnp.zeros(points.shape[0], jnp.int32)
        x, _, voxels = segmentation.voxelize_scan(points, no_labels, args.voxel_size, max_voxels)
        logits = model.apply(variables, x)
        voxel_class = jnp.argmax(logits.features, axis=1).astype(jnp.int32)
        return jnp.where(voxels.point_to_voxel >= 0, voxel_class[voxels.point_to_voxel], -1), logits.overflow

    exported = jsc.export(jax.jit(infer), platforms=PLATFORMS)(jax.ShapeDtypeStruct((capacity, 3), jnp.float32))
    artifact = args.out_dir / "segmentation_model.jax"
    artifact.write_bytes(exported.serialize())
    artifact.with_suffix(".json").write_text(json.dumps({"classes": segmentation.CLASSES,
                                                         "colours": segmentation.COLOURS}))
    print(f"exported for {', '.join(exported.platforms)}: {artifact} ({artifact.stat().st_size / 1e6:.1f} MB with "
          f"the weights; up to {capacity} points, {max_voxels} voxels)")
    here = np.asarray(jax.jit(infer)(padded(points, capacity))[0])[:len(points)]

    served_file = args.out_dir / "served.npy"
    served_file.unlink(missing_ok=True)
    result = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--serve", str(artifact.resolve()),
                             "--data", str(args.data.resolve()), "--out-dir", str(args.out_dir.resolve())],
                            capture_output=True, text=True)
    print(result.stdout, end="")
    if result.returncode != 0:
        raise SystemExit(f"serving in a fresh process failed:\n{result.stderr[-3000:]}")
    served = np.load(served_file)
    if not np.array_equal(served, here):
        raise SystemExit("the fresh process's predictions differ from this process's")
    print("the served predictions are bitwise this process's")
    return {"artifact": artifact, "platforms": exported.platforms, "served": served, "here": here,
            "picture": args.out_dir / "export_served.png"}


if __name__ == "__main__":
    main()
