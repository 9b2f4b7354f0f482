"""python -m jax_sparseconv.capacity: per-layer active sites of a MinkUNet on sample scans,
checked against the sites counted with numpy (voxels, then halving the coordinates per level),
and capacity buckets that hold the fractions of scans they claim."""

import numpy as np
import pytest

from jax_sparseconv import capacity, capacity_bucket


def _random_scan(rng, n):
    return rng.uniform([0, 0, 0], [12.0, 8.0, 4.0], size=(n, 3)).astype(np.float32)


def test_plan_counts_every_levels_sites(tmp_path, capsys):
    rng = np.random.default_rng()
    scans = [_random_scan(rng, n) for n in (300, 1500, 4000)]
    voxel_size, box = 0.25, (0.0, 0.0, 0.0, 12.0, 8.0, 4.0)  # 48 x 32 x 16 cells: 4 halvings lose none
    files = []
    for i, scan in enumerate(scans):
        files.append(tmp_path / f"scan{i}.npy")
        np.save(files[-1], scan)
    plan = capacity.main([*map(str, files), "--voxel-size", str(voxel_size), "--range", *map(str, box)])

    voxels, levels = [], []
    for scan in scans:  # independent count: unique cells, then unique halved cells per level
        cells = np.unique(np.floor(scan / voxel_size).astype(np.int64), axis=0)
        voxels.append(len(cells))
        per_level = []
        for _ in range(4):
            cells = np.unique(cells // 2, axis=0)
            per_level.append(len(cells))
        levels.append(per_level)
    levels = np.asarray(levels)
    assert plan.voxels.tolist() == voxels
    assert plan.strided == ("down1_conv", "down2_conv", "down3_conv", "down4_conv")
    by_name = {layer.name: layer for layer in plan.layers}
    for level, name in enumerate(plan.strided):
        assert by_name[name].max == levels[:, level].max()
        assert by_name[name].p99 == pytest.approx(np.percentile(levels[:, level], 99))
        above = np.asarray(voxels) if level == 0 else levels[:, level - 1]
        assert by_name[name].max_ratio == pytest.approx(np.max(levels[:, level] / above))
        assert by_name[f"up{4 - level}_conv"].max == (max(voxels) if level == 0 else levels[:, level - 1].max())
    assert plan.buckets == tuple(sorted({capacity_bucket(n) for n in voxels}))
    assert plan.fits == tuple(np.mean(np.asarray(voxels)[:, None] <= np.asarray(plan.buckets), axis=0))
    assert plan.fits[-1] == 1.0
    suggested = plan.suggested_out_capacities()
    assert all(by_name[name].max_ratio <= value <= 1.0 for name, value in suggested.items())
    printed = capsys.readouterr().out
    assert "down4_conv" in printed and f"{plan.buckets[-1]} (holds 100% of the scans)" in printed


def test_plan_reads_the_shared_kitti_scans(shared_data):
    plan = capacity.plan_capacities([capacity.load_points(shared_data("kitti/000000.bin"))], voxel_size=0.4)
    assert plan.voxels[0] > 1000 and plan.fits == (1.0,)


def test_unknown_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown scan format"):
        capacity.load_points(tmp_path / "scan.xyz")
    with pytest.raises(ValueError, match="unknown model 'pointnet'"):
        capacity.plan_capacities([np.zeros((4, 3), np.float32)], 0.1, model="pointnet")


def test_voxelbackbone8x_counts_the_sites_its_first_strided_conv_creates():
    rng = np.random.default_rng()
    scan = rng.uniform([0, 0, 0], [3.2, 3.2, 4.1], size=(2000, 3)).astype(np.float32)
    box = (0.0, 0.0, 0.0, 3.2, 3.2, 4.1)  # a (41, 32, 32) grid, as deep as KITTI's
    plan = capacity.plan_capacities([scan], 0.1, box, model="voxelbackbone8x")
    cells = np.unique(np.floor(scan / 0.1).astype(np.int64)[:, ::-1], axis=0)  # (z, y, x)
    grid = np.array([41, 32, 32])
    out_shape = (grid + 2 - 3) // 2 + 1  # kernel 3, stride 2, padding 1
    # Output o takes input i when i = 2 o - 1 + k, k in 0..2.
    reached = set()
    for k in np.ndindex(3, 3, 3):
        o2 = cells + 1 - np.asarray(k)
        ok = np.all((o2 % 2 == 0) & (o2 >= 0) & (o2 // 2 < out_shape), axis=1)
        reached.update(map(tuple, o2[ok] // 2))
    first = plan.layers[0]
    assert first.name == plan.strided[0] == "conv2/layers_0/layers_0"
    assert plan.voxels.tolist() == [len(cells)]
    assert first.max == len(reached) and first.max_ratio == pytest.approx(len(reached) / len(cells))
    assert len(plan.strided) == 4
