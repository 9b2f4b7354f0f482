"""Semantic segmentation of a labeled SemanticKITTI scan with a MinkUNet.

    python examples/segmentation.py [--steps 120] [--voxel-size 0.2] [--width 16] [--out-dir example_outputs]
        [--checkpoint-dir DIR --save-every K] [--metrics PATH]

Trains a MinkUNet-style U-Net (``jax_sparseconv.models.MinkUNet``) on the labeled scan in
``../shared/data/semantickitti`` (85,962 points, SemanticKITTI's 19 classes + unlabeled).
Each step draws a random rotation, flip and scaling of the scan and voxelizes it inside
the jitted step (``jsc.voxelize``), so a step is one compiled call from points to
gradients. Then the model predicts every point of the original scan (voxel scores
scattered back through ``point_to_voxel``), the script prints the per-class IoU and writes
a bird's-eye-view picture of labels vs predictions, with the loss curve, to a PNG.

There is one labeled scan, so the IoU is measured on the scan the model trained on: it
shows the pipeline working and the model fitting, not how it generalises to new scans.
The small default (120 steps at 0.2 m) takes a few minutes on a 2-core CPU.

``--checkpoint-dir DIR`` saves the training state every ``--save-every`` steps
(``jax_sparseconv.checkpoint``: parameters, batch statistics, optimizer state, RNG key, data
position) and, started again with the same DIR, resumes from the newest checkpoint: the steps
after it are bitwise those of a run that was never interrupted. ``--metrics PATH`` appends one
JSON line per step (``step``, ``loss`` at full precision, ``overflows``, ``capacity``). A step
whose voxels or layers overflow their capacity is run again at a larger capacity bucket
(``jsc.grown_capacity``; each bucket compiles once), never dropped; ``--capacity`` sets the
first bucket (default: from the scan's voxel count).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from tqdm import tqdm

import jax_sparseconv as jsc
from jax_sparseconv import models, utils
from jax_sparseconv.checkpoint import TrainingCheckpoints

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "semantickitti"
CLASSES = ("unlabeled", "car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist",
           "motorcyclist", "road", "parking", "sidewalk", "other-ground", "building", "fence", "vegetation",
           "trunk", "terrain", "pole", "traffic-sign")  # SemanticKITTI's learning ids 0..19
COLOURS = ("lightgrey", "royalblue", "deepskyblue", "navy", "slateblue", "cyan", "red", "magenta", "darkred",
           "purple", "violet", "orchid", "indigo", "orange", "chocolate", "forestgreen", "saddlebrown", "yellowgreen",
           "gold", "crimson")  # one per class; unlabeled and unpredicted points are light grey
# This scan's points lie in a world frame; 98% of them fall in this 84 x 84 x 8 m box.
RANGE = (-40.0, -131.0, -4.0, 44.0, -47.0, 4.0)
CENTRE = np.array([(RANGE[0] + RANGE[3]) / 2, (RANGE[1] + RANGE[4]) / 2, 0.0], np.float32)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="training steps")
    parser.add_argument("--voxel-size", type=float, default=0.2, help="voxel edge in metres")
    parser.add_argument("--width", type=int, default=16, help="channels of the first level (MinkUNet18: 32)")
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--backend", choices=["ffi", "xla"], default=None,
                        help="default: per platform, ffi where compiled (CPU, CUDA), else xla")
    parser.add_argument("--data", type=pathlib.Path, default=DATA, help="folder with o3dml_000700_{points,labels}.npy")
    parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("example_outputs"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--capacity", type=int, default=None, help="first voxel capacity (default: from the scan)")
    parser.add_argument("--checkpoint-dir", type=pathlib.Path, default=None,
                        help="save the training state here and resume from the newest checkpoint in it")
    parser.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    parser.add_argument("--metrics", type=pathlib.Path, default=None, help="append one JSON line per step here")
    return parser.parse_args(argv)


def augment(points: jax.Array, key: jax.Array) -> jax.Array:
    """A random rotation about the vertical axis through CENTRE, x flip and scaling."""
    angle_key, flip_key, scale_key = jax.random.split(key, 3)
    angle = jax.random.uniform(angle_key, (), minval=0.0, maxval=2 * np.pi)
    flip = jnp.where(jax.random.bernoulli(flip_key), -1.0, 1.0)
    scale = jax.random.uniform(scale_key, (), minval=0.95, maxval=1.05)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    rotation = jnp.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]]) * jnp.array([flip, 1.0, 1.0])
    return (points - CENTRE) @ rotation.T * scale + CENTRE


def voxelize_scan(points, labels, voxel_size: float, max_voxels: int):
    """Points -> (tensor with position features, voxel labels, voxels), jit-able."""
    voxels = jsc.voxelize(points, voxel_size, RANGE, max_voxels)
    features = utils.position_features(voxels.features, CENTRE)  # to_tensor zeroes the padding rows
    return jsc.voxels.to_tensor(voxels, features), jsc.voxels.majority_labels(voxels, labels, len(CLASSES)), voxels


def make_train_step(model, optimizer, voxel_size: float, max_voxels: int):
    def loss_fn(params, batch_stats, x, voxel_labels):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
        labeled = voxel_labels > 0  # padding (-1) and unlabeled (0) do not count
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.features, jnp.maximum(voxel_labels, 0))
        loss = jnp.sum(jnp.where(labeled, losses, 0)) / jnp.maximum(jnp.sum(labeled), 1)
        return loss, (updates["batch_stats"], logits)

    @jax.jit
    def step(params, batch_stats, opt_state, points, labels, key):
        x, voxel_labels, _ = voxelize_scan(augment(points, key), labels, voxel_size, max_voxels)
        (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, voxel_labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss, logits.overflow

    return step


def make_predict(model, voxel_size: float, max_voxels: int):
    @jax.jit
    def predict(variables, points, labels):
        """Per-point predicted class (-1 where the point fell outside RANGE)."""
        x, _, voxels = voxelize_scan(points, labels, voxel_size, max_voxels)
        logits = model.apply(variables, x, train=False)
        voxel_class = jnp.argmax(logits.features, axis=1).astype(jnp.int32)
        return jnp.where(voxels.point_to_voxel >= 0, voxel_class[voxels.point_to_voxel], -1), logits.overflow

    return predict


def per_class_iou(predicted: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """IoU of each class that occurs in ``labels`` (unlabeled points and points without a
    prediction left out)."""
    scored = (labels > 0) & (predicted >= 0)
    predicted, labels = predicted[scored], labels[scored]
    return {c: float(np.sum((predicted == c) & (labels == c)) / np.sum((predicted == c) | (labels == c)))
            for c in np.unique(labels)}


def save_picture(path: pathlib.Path, points, labels, predicted, losses, iou) -> None:
    colours = matplotlib.colors.to_rgba_array(COLOURS)
    fig, axes = plt.subplots(1, 3, figsize=(18, 6.2), gridspec_kw={"width_ratios": [1, 1, 0.8]})
    for ax, values, title in ((axes[0], labels, "labels"), (axes[1], predicted, "predictions")):
        ax.scatter(points[:, 0], points[:, 1], c=colours[np.maximum(values, 0)], s=0.5, linewidths=0)
        ax.set(title=title, xlim=(RANGE[0], RANGE[3]), ylim=(RANGE[1], RANGE[4]), aspect="equal",
               xlabel="x (m)", ylabel="y (m)")
    present = sorted(iou)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours[c], label=f"{CLASSES[c]} {iou[c]:.2f}")
               for c in present]
    axes[1].legend(handles=handles, title="class, IoU", loc="lower right", fontsize=7, markerscale=1.5)
    axes[2].plot(np.arange(1, len(losses) + 1), losses)
    axes[2].set(title="training loss", xlabel="step", ylabel="cross-entropy", yscale="log")
    fig.suptitle(f"MinkUNet on SemanticKITTI (one scan, trained on itself): mIoU {np.mean(list(iou.values())):.3f}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    points_file, labels_file = args.data / "o3dml_000700_points.npy", args.data / "o3dml_000700_labels.npy"
    if not points_file.is_file():
        raise SystemExit(f"no scan at {points_file} (the data lives in ../shared/data beside the repo; see --data)")
    points = np.load(points_file).astype(np.float32)
    labels = np.load(labels_file).reshape(-1).astype(np.int32)

    # A static voxel capacity: the scan's voxel count with room for the augmentations (a step
    # that overflows it runs again at a larger one).
    num_voxels = len(utils.voxelize(points, args.voxel_size, RANGE)[0])
    max_voxels = args.capacity or jsc.capacity_bucket(int(1.15 * num_voxels))
    w = args.width
    model = models.MinkUNet(len(CLASSES), stem_features=w, encoder_features=(w, 2 * w, 4 * w, 4 * w),
                            decoder_features=(4 * w, 4 * w, 2 * w, 2 * w), blocks_per_stage=1,
                            out_capacities=(0.9, 0.8, 0.8, 0.8), bn_momentum=0.9, backend=args.backend)
    print(f"{len(points)} points -> {num_voxels} voxels at {args.voxel_size} m (capacity {max_voxels}); "
          f"backend {jsc.backends.describe(args.backend)}")

    points_d, labels_d = jnp.asarray(points), jnp.asarray(labels)
    x, _, _ = jax.jit(voxelize_scan, static_argnums=(2, 3))(points_d, labels_d, args.voxel_size, max_voxels)
    variables = jax.jit(model.init)(jax.random.key(args.seed), x)
    params, batch_stats = variables["params"], variables["batch_stats"]
    optimizer = optax.adam(optax.cosine_decay_schedule(args.learning_rate, max(args.steps, 1), alpha=0.05))
    # Everything the next step depends on; data_position counts the scans consumed (one scan
    # here, so the step count).
    state = {"params": params, "batch_stats": batch_stats, "opt_state": optimizer.init(params),
             "rng": jax.random.key_data(jax.random.key(args.seed + 1)), "data_position": 0}
    checkpoints = args.checkpoint_dir and TrainingCheckpoints(args.checkpoint_dir, args.save_every)
    first = 0
    if checkpoints:
        state, first = checkpoints.restore(state)
        print(f"resumed from the checkpoint of step {first} in {args.checkpoint_dir}" if first else
              f"no checkpoint in {args.checkpoint_dir}: starting from step 0")
    steps = {}  # capacity -> jitted step, each compiled once

    losses, overflows = [], 0
    start = time.perf_counter()
    with tqdm(range(first, args.steps), desc="training", unit="step", disable=None) as progress:  # no bar off a terminal
        for i in progress:
            rng, step_key = jax.random.split(jax.random.wrap_key_data(state["rng"]))
            step_overflows = 0
            while True:
                if max_voxels not in steps:
                    steps[max_voxels] = make_train_step(model, optimizer, args.voxel_size, max_voxels)
                *new_state, loss, overflow = steps[max_voxels](state["params"], state["batch_stats"], state["opt_state"],
                                                  points_d, labels_d, step_key)
                if not jsc.tensor.overflowed(overflow):
                    break
                step_overflows += 1  # the same step again, at a larger capacity: nothing is dropped
                max_voxels = jsc.grown_capacity(max_voxels, overflow)
            overflows += step_overflows
            state = dict(zip(("params", "batch_stats", "opt_state"), new_state), rng=jax.random.key_data(rng),
                         data_position=state["data_position"] + 1)
            losses.append(float(loss))
            progress.set_postfix(loss=f"{losses[-1]:.3f}", overflows=overflows, capacity=max_voxels)
            if args.metrics:
                with open(args.metrics, "a") as metrics:
                    print(json.dumps({"step": i, "loss": losses[-1], "overflows": step_overflows,
                                      "capacity": max_voxels}), file=metrics)
            if checkpoints:
                checkpoints.save(i + 1, state)
    train_s = time.perf_counter() - start
    if checkpoints:
        checkpoints.close()
    params, batch_stats = state["params"], state["batch_stats"]

    predict = make_predict(model, args.voxel_size, max_voxels)
    predicted, overflow = predict({"params": params, "batch_stats": batch_stats}, points_d, labels_d)
    jsc.tensor.raise_if_overflow(overflow, "prediction")
    predicted = np.asarray(predicted)
    iou = per_class_iou(predicted, labels)

    print(f"trained steps {first}..{args.steps - 1} in {train_s:.1f} s (first step includes compiling); "
          f"final loss {losses[-1]:.3f}; {overflows} overflowed and ran again at capacity {max_voxels}"
          if losses else "no training steps")
    print(f"{'class':>14} {'points':>7} {'IoU':>6}")
    for c, value in iou.items():
        print(f"{CLASSES[c]:>14} {int(np.sum(labels == c)):>7} {value:>6.3f}")
    miou = float(np.mean(list(iou.values())))
    accuracy = float(np.mean(predicted[labels > 0] == labels[labels > 0]))
    print(f"mIoU over the {len(iou)} classes present: {miou:.3f}; point accuracy {accuracy:.3f}")
    picture = args.out_dir / "segmentation.png"
    save_picture(picture, points, labels, predicted, losses, iou)
    print(f"wrote {picture}")
    return {"losses": losses, "iou": iou, "miou": miou, "accuracy": accuracy, "picture": picture, "model": model,
            "variables": {"params": params, "batch_stats": batch_stats}, "max_voxels": max_voxels}


if __name__ == "__main__":
    main()
