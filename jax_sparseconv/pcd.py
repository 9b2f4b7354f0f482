"""Point cloud file readers: PCD (ascii, binary, binary_compressed with LZF) and nuScenes.

PCD is the Point Cloud Library's format; ``binary_compressed`` stores each field's values
together (all x, then all y, ...) and compresses the whole block with LZF, which
``lzf_decompress`` undoes in plain Python.
"""

from __future__ import annotations

import os

import numpy as np

_TYPES = {("F", 4): np.float32, ("F", 8): np.float64, ("U", 1): np.uint8, ("U", 2): np.uint16,
          ("U", 4): np.uint32, ("I", 1): np.int8, ("I", 2): np.int16, ("I", 4): np.int32}


def lzf_decompress(data: bytes, size: int) -> bytes:
    """LZF-decompresses ``data`` into exactly ``size`` bytes (raises ``ValueError`` otherwise)."""
    out = bytearray()
    i = 0
    while i < len(data):
        ctrl = data[i]
        i += 1
        if ctrl < 32:  # a literal run of ctrl + 1 bytes
            out += data[i:i + ctrl + 1]
            i += ctrl + 1
            continue
        length = ctrl >> 5  # a back reference: copy `length + 2` bytes from `offset + 1` bytes back
        if length == 7:
            length += data[i]
            i += 1
        offset = ((ctrl & 0x1F) << 8) + data[i] + 1
        i += 1
        start, length = len(out) - offset, length + 2
        if start < 0:
            raise ValueError("corrupt LZF data: a back reference before the start")
        if start + length <= len(out):
            out += out[start:start + length]
        else:  # the copy overlaps what it writes: byte by byte
            for k in range(length):
                out.append(out[start + k])
    if len(out) != size:
        raise ValueError(f"corrupt LZF data: {len(out)} bytes decompressed, the header says {size}")
    return bytes(out)


def _read_header(f, path) -> dict[str, list[str]]:
    header = {}
    while True:
        line = f.readline()
        if not line:
            raise ValueError(f"{path}: no DATA line in the PCD header")
        text = line.decode("ascii", "replace").strip()
        if not text or text.startswith("#"):
            continue
        key, _, value = text.partition(" ")
        header[key.upper()] = value.split()
        if key.upper() == "DATA":
            return header


def read_pcd_header(path: str | os.PathLike) -> dict[str, list[str]]:
    """The header of a PCD file: ``{"FIELDS": ["x", "y", ...], "WIDTH": ["640"], "HEIGHT":
    ["480"], "DATA": ["binary_compressed"], ...}`` (keys upper-case, values as strings).
    An organized cloud has ``HEIGHT > 1``: its points are ``HEIGHT`` rows of ``WIDTH``."""
    with open(path, "rb") as f:
        return _read_header(f, path)


def read_pcd(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The fields of a PCD file as ``{name: [points] or [points, count] array}``.

    Organized clouds (``HEIGHT > 1``, see ``read_pcd_header``) come flattened row by row;
    invalid points keep their NaNs. ``rgb`` stays the packed float32 of PCL:
    ``unpack_rgb`` turns it into ``[N, 3]`` uint8.
    """
    with open(path, "rb") as f:
        header = _read_header(f, path)
        body = f.read()
    names = header["FIELDS"]
    sizes = [int(s) for s in header["SIZE"]]
    types = header["TYPE"]
    counts = [int(c) for c in header.get("COUNT", ["1"] * len(names))]
    points = int(header["POINTS"][0])
    dtypes = [np.dtype(_TYPES[(t, s)]) for t, s in zip(types, sizes)]
    kind = header["DATA"][0]
    if kind == "ascii":
        table = np.loadtxt(body.decode().splitlines(), dtype=np.float64, ndmin=2)[:points]
        columns, at = {}, 0
        for name, dtype, count in zip(names, dtypes, counts):
            columns[name] = table[:, at:at + count].astype(dtype).squeeze(1) if count == 1 else \
                table[:, at:at + count].astype(dtype)
            at += count
        return columns
    if kind == "binary":
        record = np.dtype([(name, dtype, (count,) if count > 1 else ()) for name, dtype, count
                           in zip(names, dtypes, counts)])
        array = np.frombuffer(body, record, count=points)
        return {name: np.array(array[name]) for name in names}
    if kind == "binary_compressed":
        compressed, size = np.frombuffer(body[:8], np.uint32)
        raw = lzf_decompress(body[8:8 + int(compressed)], int(size))
        columns, at = {}, 0
        for name, dtype, count in zip(names, dtypes, counts):
            nbytes = dtype.itemsize * count * points
            values = np.frombuffer(raw[at:at + nbytes], dtype).reshape(points, count)
            columns[name] = values[:, 0].copy() if count == 1 else values.copy()
            at += nbytes
        return columns
    raise ValueError(f"{path}: unknown PCD DATA kind {kind!r}")


def unpack_rgb(rgb: np.ndarray) -> np.ndarray:
    """PCL's packed float32 ``rgb`` as ``[N, 3]`` uint8."""
    packed = np.ascontiguousarray(rgb, np.float32).view(np.uint32)
    return np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255], axis=1).astype(np.uint8)


def load_nuscenes_points(path: str | os.PathLike) -> np.ndarray:
    """A nuScenes lidar sweep (``.pcd.bin``) as ``[N, 5]`` float32: x, y, z, intensity, ring."""
    return np.fromfile(path, dtype=np.float32).reshape(-1, 5)
