"""CPU benchmark: jax_sparseconv (ffi and xla backends) against spconv on real KITTI scans.

    python benchmarks/bench_cpu.py [--repeats 7] [--batches 1 2] [--out results.json]

Inputs: KITTI scans from ../shared/data/kitti voxelized at 0.05 m over their whole extent
(about 80-90k voxels each). Each case reports the median of ``--repeats`` timed runs after
a warm-up, its ratio to spconv measured in the same run, the achieved GFLOP/s
(2 x pairs x C_in x C_out / time), and the dense matmul rate of XLA for the same
``[pairs, C_in] x [C_in, C_out]`` shape. spconv (``pip install spconv==2.3.8 torch==2.13.0``)
is optional; it runs forward only, since its CPU build has no backward.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jax_sparseconv as jsc
from jax_sparseconv.utils import kitti_tensor

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kitti"
FULL_RANGE = (-80.0, -80.0, -5.0, 80.0, 80.0, 3.0)  # covers every point of the scans
SCANS = ["000000.bin", "000001.bin"]

try:
    import spconv.pytorch as spconv
    import torch
except ImportError:
    spconv = torch = None


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (compiles under jit)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_timer(fn, *args):
    return lambda: jax.block_until_ready(fn(*args))


def dense_matmul_rate(rows: int, cin: int, cout: int, repeats: int) -> float:
    a = jnp.ones((rows, cin), jnp.float32)
    b = jnp.ones((cin, cout), jnp.float32)
    t = median_time(jax_timer(jax.jit(jnp.matmul), a, b), repeats)
    return 2 * rows * cin * cout / t / 1e9


class Spconv:
    """The same cases in spconv (forward only)."""

    def __init__(self, x: jsc.SparseConvTensor):
        torch.set_num_threads(2)
        active = np.asarray(x.active)
        self.features = torch.from_numpy(np.asarray(x.features)[active].copy())
        self.indices = torch.from_numpy(np.asarray(x.indices)[active].copy())
        self.shape, self.batch = list(x.spatial_shape), x.batch_size

    def tensor(self, channels):
        feats = torch.randn(self.features.shape[0], channels)
        return spconv.SparseConvTensor(feats, self.indices, self.shape, self.batch)

    def rulebook(self):
        from spconv.core import ConvAlgo
        from spconv.pytorch import ops
        return lambda: ops.get_indice_pairs(self.indices, self.batch, self.shape, ConvAlgo.Native, [3, 3, 3],
                                            [1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 0], subm=True)

    def layer(self, layer, x):
        layer.eval()
        with torch.no_grad():
            layer(x)  # builds and caches the rulebook under its indice_key
        def run():
            with torch.no_grad():
                return layer(x)
        return run


def run_cases(x: jsc.SparseConvTensor, repeats: int) -> list[dict]:
    rows = []
    backends = ["ffi", "xla"]
    ref = Spconv(x) if spconv is not None else None
    key = jax.random.key(0)

    def record(case, impl, seconds, flops=None, dense=None, **extra):
        rows.append(dict(case=case, batch=x.batch_size, impl=impl, ms=seconds * 1e3,
                         gflops=None if flops is None else flops / seconds / 1e9, dense_gflops=dense, **extra))

    # Rulebook construction (3x3x3 submanifold).
    for backend in backends:
        build = jax.jit(lambda idx, b=backend: jsc.rulebook.build_rulebook(
            idx, jsc.make_geometry("subm", x.spatial_shape, 3), x.batch_size, x.capacity, jsc.backends.get(b)))
        record("rulebook subm 3^3", backend, median_time(jax_timer(build, x.indices), repeats))
    if ref:
        record("rulebook subm 3^3", "spconv", median_time(ref.rulebook(), repeats))

    cached = jsc.sparse_conv(x, jnp.zeros((3, 3, 3, x.num_channels, 1)), subm=True, indice_key="subm")
    pairs = int(jnp.sum(cached.indice_dict["subm"].out_nbr >= 0))

    # Submanifold 3x3x3 with a cached rulebook.
    for c in (16, 32, 64, 128):
        t = cached.replace_feature(jax.random.normal(key, (x.capacity, c)))
        w = jax.random.normal(key, (3, 3, 3, c, c)) / np.sqrt(27 * c)
        flops, dense = 2 * pairs * c * c, dense_matmul_rate(pairs, c, c, repeats)
        for backend in backends:
            fwd = jax.jit(lambda t, w, b=backend: jsc.sparse_conv(t, w, subm=True, indice_key="subm", backend=b).features)
            loss = lambda f, w, b=backend: jnp.sum(jsc.sparse_conv(  # noqa: E731
                t.replace_feature(f), w, subm=True, indice_key="subm", backend=b).features ** 2)
            step = jax.jit(jax.grad(loss, argnums=(0, 1)))
            record(f"SubMConv3d 3^3 C={c}", backend, median_time(jax_timer(fwd, t, w), repeats), flops, dense)
            record(f"SubMConv3d 3^3 C={c} fwd+bwd", backend, median_time(jax_timer(step, t.features, w), repeats),
                   3 * flops, dense)
        if ref:
            layer = spconv.SubMConv3d(c, c, 3, bias=False, indice_key="subm")
            record(f"SubMConv3d 3^3 C={c}", "spconv", median_time(ref.layer(layer, ref.tensor(c)), repeats),
                   flops, dense)

    # Strided 3x3x3 stride 2 (rulebook included), then the inverse conv back.
    cin, cout = 32, 64
    t = x.replace_feature(jax.random.normal(key, (x.capacity, cin)))
    w_down = jax.random.normal(key, (3, 3, 3, cin, cout)) / np.sqrt(27 * cin)
    w_up = jax.random.normal(key, (3, 3, 3, cout, cin)) / np.sqrt(27 * cout)
    for backend in backends:
        down = jax.jit(lambda t, w, b=backend: jsc.sparse_conv(t, w, strides=2, padding=1, indice_key="down",
                                                               out_capacity=2 * t.capacity, backend=b))
        y = down(t, w_down)
        jsc.check_overflow(y)
        down_pairs = int(jnp.sum(y.indice_dict["down"].out_nbr >= 0))
        record(f"SparseConv3d 3^3 s2 {cin}->{cout}", backend,
               median_time(jax_timer(lambda *a: down(*a).features, t, w_down), repeats), 2 * down_pairs * cin * cout)
        down_loss = lambda f, w, b=backend: jnp.sum(down(t.replace_feature(f), w).features ** 2)  # noqa: E731
        record(f"SparseConv3d 3^3 s2 {cin}->{cout} fwd+bwd", backend,
               median_time(jax_timer(jax.jit(jax.grad(down_loss, argnums=(0, 1))), t.features, w_down), repeats),
               6 * down_pairs * cin * cout)
        up = jax.jit(lambda y, w, b=backend: jsc.sparse_conv(y, w, inverse=True, indice_key="down", backend=b).features)
        record(f"SparseInverseConv3d 3^3 {cout}->{cin}", backend, median_time(jax_timer(up, y, w_up), repeats),
               2 * down_pairs * cin * cout)
        up_loss = lambda f, w, b=backend: jnp.sum(up(y.replace_feature(f), w) ** 2)  # noqa: E731
        record(f"SparseInverseConv3d 3^3 {cout}->{cin} fwd+bwd", backend,
               median_time(jax_timer(jax.jit(jax.grad(up_loss, argnums=(0, 1))), y.features, w_up), repeats),
               6 * down_pairs * cin * cout)
    if ref:
        st = ref.tensor(cin)
        layer = spconv.SparseConv3d(cin, cout, 3, 2, 1, bias=False, indice_key="down")
        layer.eval()

        def down_run():
            with torch.no_grad():
                return layer(spconv.SparseConvTensor(st.features, st.indices, st.spatial_shape, st.batch_size))
        record(f"SparseConv3d 3^3 s2 {cin}->{cout}", "spconv", median_time(down_run, repeats))
        with torch.no_grad():
            sy = down_run()
        inverse = spconv.SparseInverseConv3d(cout, cin, 3, indice_key="down", bias=False)
        record(f"SparseInverseConv3d 3^3 {cout}->{cin}", "spconv", median_time(ref.layer(inverse, sy), repeats))
    return rows


def add_ratios(rows: list[dict]) -> None:
    spconv_ms = {(r["case"], r["batch"]): r["ms"] for r in rows if r["impl"] == "spconv"}
    ffi_ms = {(r["case"], r["batch"]): r["ms"] for r in rows if r["impl"] == "ffi"}
    for r in rows:
        base = spconv_ms.get((r["case"], r["batch"]))
        r["vs_spconv"] = None if base is None else r["ms"] / base
        r["xla_over_ffi"] = r["ms"] / ffi_ms[(r["case"], r["batch"])] if r["impl"] == "xla" else None


def markdown_table(rows: list[dict]) -> str:
    """One line per case and batch: the three implementations side by side."""
    by_impl = {(r["case"], r["batch"], r["impl"]): r for r in rows}
    cases = list(dict.fromkeys((r["case"], r["batch"]) for r in rows))
    num = lambda v, digits=1: "" if v is None else f"{v:.{digits}f}"  # noqa: E731
    lines = ["| case | B | ffi ms | xla ms | spconv ms | ffi / spconv | xla / ffi | ffi GFLOP/s | XLA dense matmul GFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for case, batch in cases:
        ffi, xla, ref = (by_impl.get((case, batch, impl)) for impl in ("ffi", "xla", "spconv"))
        lines.append(f"| {case} | {batch} | {num(ffi['ms'])} | {num(xla['ms'])} | {num(ref and ref['ms'])} | "
                     f"{num(ffi['vs_spconv'], 2)} | {num(xla['xla_over_ffi'])} | {num(ffi['gflops'])} | "
                     f"{num(ffi['dense_gflops'])} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    machine = dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                   jax=jax.__version__, spconv=None if spconv is None else importlib.metadata.version("spconv"),
                   torch=None if torch is None else torch.__version__, build=jsc.build_info())
    print(machine)
    rows = []
    for batch in args.batches:
        x = kitti_tensor([DATA / name for name in SCANS[:batch]], 0.05, FULL_RANGE)
        print(f"batch {batch}: {int(x.num_active)} voxels, capacity {x.capacity}, grid {x.spatial_shape}")
        rows += run_cases(x, args.repeats)
    add_ratios(rows)
    print(markdown_table(rows))
    if args.out:
        args.out.write_text(json.dumps(dict(machine=machine, results=rows), indent=1))


if __name__ == "__main__":
    main()
