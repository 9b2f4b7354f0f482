"""The examples run at a tiny size (a few steps, coarse voxels), so they cannot rot, and
what they compute is checked against independent numpy code where it can be."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jax_sparseconv import utils

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def assert_png(path: Path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_segmentation_trains_and_scores_every_point(shared_data, tmp_path, load_example):
    """Also: a first capacity far too small (about 9k voxels at 0.5 m) makes step 0 run again
    at a larger bucket, and a run resumed from the checkpoint of step 2 repeats steps 2 and 3
    bitwise."""
    shared_data("semantickitti/o3dml_000700_points.npy")
    segmentation = load_example("segmentation")
    checkpoints, metrics = tmp_path / "checkpoints", tmp_path / "metrics.jsonl"
    args = ["--steps", "4", "--voxel-size", "0.5", "--width", "8", "--out-dir", str(tmp_path), "--capacity", "2048",
            "--checkpoint-dir", str(checkpoints), "--save-every", "2", "--metrics", str(metrics)]
    result = segmentation.main(args)
    assert len(result["losses"]) == 4 and result["losses"][-1] < result["losses"][0]
    labels = np.load(shared_data("semantickitti/o3dml_000700_labels.npy")).reshape(-1)
    assert set(result["iou"]) == set(np.unique(labels[labels > 0]).tolist())
    assert all(0.0 <= value <= 1.0 for value in result["iou"].values())
    assert_png(result["picture"])
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert [r["loss"] for r in records] == result["losses"]
    assert records[0]["overflows"] >= 1 and records[0]["capacity"] > 2048 and records[1]["overflows"] == 0

    shutil.rmtree(checkpoints / "4")
    resumed = segmentation.main(args)
    assert resumed["losses"] == result["losses"][2:]


def test_export_serves_the_trained_model_in_a_fresh_process(shared_data, tmp_path, load_example):
    """examples/export.py: exported for cpu, cuda and tpu, served by a fresh process (which the
    example checks to be bitwise its own predictions)."""
    points = np.load(shared_data("semantickitti/o3dml_000700_points.npy"))
    export = load_example("export")
    result = export.main(["--steps", "1", "--voxel-size", "0.5", "--width", "4", "--out-dir", str(tmp_path)])
    assert result["platforms"] == ("cpu", "cuda", "tpu")
    served = result["served"]
    assert served.shape == (len(points),) and np.array_equal(served, result["here"])
    grid = np.asarray(load_example("segmentation").RANGE)
    outside = np.any((points[:, :3] < grid[:3]) | (points[:, :3] >= grid[3:]), axis=1)
    assert np.all(served[outside] == -1) and np.mean(served[~outside] >= 0) > 0.999
    assert served.max() < 20  # SemanticKITTI's learning ids
    assert_png(result["picture"])


def test_per_class_iou_by_hand(load_example):
    segmentation = load_example("segmentation")
    labels = np.array([0, 1, 1, 1, 2, 2, 3])
    predicted = np.array([2, 1, 1, 2, 2, -1, 1])  # point 0 unlabeled, point 5 unpredicted: both left out
    # class 1: 2 hits / (3 labelled + 1 extra); class 2: 1 / 2; class 3: 0 / 1
    assert segmentation.per_class_iou(predicted, labels) == {1: 0.5, 2: 0.5, 3: 0.0}


def test_augmentation_is_a_rotation_flip_and_scale_about_the_centre(load_example):
    import jax
    segmentation = load_example("segmentation")
    points = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32) * 10 + segmentation.CENTRE
    moved = np.asarray(segmentation.augment(points, jax.random.key(3)))
    radius = lambda p: np.linalg.norm((p - segmentation.CENTRE)[:, :2], axis=1)  # noqa: E731
    ratio = radius(moved) / radius(points)
    assert np.allclose(ratio, ratio[0], rtol=1e-4) and 0.95 <= ratio[0] <= 1.05
    assert np.allclose((moved - segmentation.CENTRE)[:, 2], (points - segmentation.CENTRE)[:, 2] * ratio[0],
                       rtol=1e-4, atol=1e-4)


def test_detection_backbone_on_a_kitti_scan(shared_data, tmp_path, load_example):
    shared_data("kitti/000000.bin")
    detection = load_example("detection_backbone")
    result = detection.main(["--scans", "000000", "--repeats", "1", "--out-dir", str(tmp_path)])
    assert result["bev"].shape == (1, 200, 176, 256)
    points = utils.load_kitti_points(shared_data("kitti/000000.bin"))
    coords, _, _ = utils.voxelize(points, detection.VOXEL_SIZE, utils.KITTI_RANGE)
    (label, batch, n_points, n_voxels, n_out, _, _), = result["rows"]
    assert (batch, n_points, n_voxels) == (1, len(points), len(coords))
    # The stride-8 sites lie above the voxels (padded convs reach less than one cell further):
    # each occupied BEV cell is next to a cell holding voxels, and most such cells are occupied.
    occupied = np.abs(np.asarray(result["bev"][0])).sum(axis=-1) > 0
    voxel_cells = np.zeros_like(occupied)
    voxel_cells[tuple((coords[:, 1:] // detection.STRIDE).T)] = True
    near = np.zeros_like(occupied)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            near |= np.roll(voxel_cells, (dy, dx), axis=(0, 1))
    assert not np.any(occupied & ~near)
    assert np.mean(occupied[voxel_cells]) > 0.9
    assert_png(result["picture"])


def test_box_outlines_are_rotated_rectangles(load_example):
    detection = load_example("detection_backbone")
    box = np.array([[10.0, 2.0, -1.0, 4.0, 2.0, 1.5, np.pi / 2]])  # 4 m long, heading along +y
    outline = detection.box_outlines(box)[0]
    assert np.allclose(outline[0], outline[-1])
    assert np.allclose(np.sort(outline[:4, 0]), [9, 9, 11, 11]) and np.allclose(np.sort(outline[:4, 1]), [0, 0, 4, 4])


def test_read_point_clouds(shared_data, tmp_path, load_example):
    shared_data("pcl/office1.pcd")
    readers = load_example("read_point_clouds")
    result = readers.main(["--out-dir", str(tmp_path)])
    sweep = np.fromfile(next((shared_data("nuscenes")).glob("*.pcd.bin")), np.float32).reshape(-1, 5)
    coords, _, _ = utils.voxelize(sweep[:, :4], 0.1, readers.NUSCENES_RANGE)
    assert int(result["sweep_voxels"].num_voxels) == len(coords)
    office = result["office_voxels"]
    assert int(office.num_invalid) == 307_200 - 254_456  # the data README's count of finite points
    assert np.all(np.asarray(office.features)[np.asarray(office.num_points) > 0, 3:] <= 1.0)
    assert_png(result["picture"])


@pytest.mark.parametrize("name", ["segmentation", "detection_backbone", "read_point_clouds", "quickstart",
                                  "data_parallel", "export"])
def test_example_documents_its_command(name):
    doc = (EXAMPLES / f"{name}.py").read_text().split('"""')[1]
    assert f"python examples/{name}.py" in doc
