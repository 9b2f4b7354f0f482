"""PCD and nuScenes readers: hand-made files and the real ones in ../shared/data."""

import numpy as np
import pytest

from jax_sparseconv import pcd

HEADER = ("# .PCD v0.7\nVERSION 0.7\nFIELDS x y z rgb\nSIZE 4 4 4 4\nTYPE F F F F\nCOUNT 1 1 1 1\n"
          "WIDTH 3\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS 3\nDATA {}\n")
XYZ = np.array([[1.0, 2.0, 3.0], [-1.5, 0.25, 8.0], [np.nan, np.nan, np.nan]], np.float32)
RGB = np.array([0x00FF8001, 0x00010203, 0], np.uint32).view(np.float32)


def test_lzf_literals_and_overlapping_back_references():
    # "abc" as a literal run, then a back reference of length 7 reaching 3 bytes back (overlapping).
    data = bytes([2]) + b"abc" + bytes([(5 << 5) | 0, 2])
    assert pcd.lzf_decompress(data, 10) == b"abcabcabca"
    with pytest.raises(ValueError, match="header says"):
        pcd.lzf_decompress(data, 11)
    with pytest.raises(ValueError, match="before the start"):
        pcd.lzf_decompress(bytes([(1 << 5), 9]), 3)


@pytest.mark.parametrize("kind", ["ascii", "binary"])
def test_read_small_pcd(kind, tmp_path):
    path = tmp_path / f"{kind}.pcd"
    if kind == "ascii":
        rows = "\n".join(" ".join(f"{v:.9g}" for v in (*xyz, rgb)) for xyz, rgb in zip(XYZ, RGB))
        path.write_bytes(HEADER.format(kind).encode() + rows.encode() + b"\n")
    else:
        record = np.zeros(3, [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<f4")])
        record["x"], record["y"], record["z"], record["rgb"] = XYZ.T[0], XYZ.T[1], XYZ.T[2], RGB
        path.write_bytes(HEADER.format(kind).encode() + record.tobytes())
    fields = pcd.read_pcd(path)
    np.testing.assert_array_equal(np.stack([fields["x"], fields["y"], fields["z"]], 1), XYZ)
    np.testing.assert_array_equal(pcd.unpack_rgb(fields["rgb"]), [[255, 128, 1], [1, 2, 3], [0, 0, 0]])


def test_real_files(shared_data):
    header = pcd.read_pcd_header(shared_data("pcl/office1.pcd"))
    assert (header["WIDTH"], header["HEIGHT"], header["DATA"]) == (["640"], ["480"], ["binary_compressed"])
    fields = pcd.read_pcd(shared_data("pcl/office1.pcd"))
    xyz = np.stack([fields["x"], fields["y"], fields["z"]], 1)
    assert xyz.shape == (307200, 3)
    assert int(np.isfinite(xyz).all(axis=1).sum()) == 254456  # as ../shared/data/README.md says
    assert pcd.unpack_rgb(fields["rgb"]).shape == (307200, 3)
    sweep_file = "nuscenes/n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin"
    sweep = pcd.load_nuscenes_points(shared_data(sweep_file))
    assert sweep.shape == (34688, 5)
