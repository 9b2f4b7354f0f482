"""Benchmark: jax_sparseconv (ffi and xla backends) against spconv on real KITTI scans.

    python benchmarks/bench_cpu.py [--device cpu|gpu] [--repeats 7] [--batches 1 2] [--out results.json]

``--device gpu`` runs the same cases, printing the same tables, on JAX's first GPU (the ffi
backend then runs the CUDA handlers of ``jax_sparseconv._cuda``); spconv runs there too when
``torch.cuda.is_available()``, and is left out otherwise. ``--precision highest`` keeps float32
products exact there; by default the xla backend and the CUDA kernels use TF32, as XLA does, and
so does spconv (``spconv.constants.SPCONV_ALLOW_TF32``, False in spconv itself, is set to match).
On a GPU the peak-RSS columns of
the network table stay empty (host memory says little there); XLA's buffer count remains.

Inputs: KITTI scans from ../shared/data/kitti (or the folder ``JSC_KITTI_DIR`` names)
voxelized at 0.05 m over their whole extent (about 80-90k voxels each). Each case reports
the median of ``--repeats`` timed runs after a warm-up, its ratio to spconv measured in the
same run, the achieved GFLOP/s (2 x pairs x C_in x C_out / time), and the dense matmul rate
of XLA for the same ``[pairs, C_in] x [C_in, C_out]`` shape. spconv (``pip install spconv==2.3.8 torch==2.13.0``)
is optional; it runs forward only, since its CPU build has no backward. Each "fwd+bwd" case
(the gradient of a sum-of-squares loss in features and kernel) also reports its ratio to the
forward of the same loss, and the SubM cases time the two backward kernels on their own
("input grad kernel": the forward kernel along the transposed rulebook; "kernel grad kernel").

The network cases run a MinkUNet18-style U-Net (``jax_sparseconv.models.MinkUNet``; its
spconv twin in ``jax_sparseconv.spconv_reference``): forward in eval mode and a training
step (forward, backward, Adam update). Peak memory is measured for each network case in a
fresh subprocess, the same way for both libraries: the rise of the process's peak resident
set (``VmHWM``, reset through ``/proc/self/clear_refs`` once the model is built and, for
JAX, compiled ahead of time) during the first call. For JAX the table also gives XLA's own
count of the buffers of the compiled call (``memory_analysis``), and the compile time.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jax_sparseconv as jsc
from jax_sparseconv import models, spconv_reference
from jax_sparseconv.utils import kitti_tensor

DATA = Path(os.environ.get("JSC_KITTI_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kitti"))
FULL_RANGE = (-80.0, -80.0, -5.0, 80.0, 80.0, 3.0)  # covers every point of the scans
SCANS = ["000000.bin", "000001.bin"]

try:
    import spconv.pytorch as spconv
    import torch
except ImportError:
    spconv = torch = None

TORCH_DEVICE = "cpu"  # "cuda" for --device gpu; spconv is left out where torch has no GPU


def torch_timer(fn):
    """``fn`` followed by a wait for the GPU, so that timings cover the work."""
    def run():
        out = fn()
        if TORCH_DEVICE == "cuda":
            torch.cuda.synchronize()
        return out
    return run


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
        base = spconv_reference.to_spconv(x)
        self.indices, self.shape, self.batch = base.indices.to(TORCH_DEVICE), base.spatial_shape, base.batch_size

    def tensor(self, channels):
        feats = torch.randn(self.indices.shape[0], channels, device=TORCH_DEVICE)
        return spconv.SparseConvTensor(feats, self.indices, self.shape, self.batch)

    def rulebook(self):
        from spconv.core import ConvAlgo
        from spconv.pytorch import ops
        return torch_timer(lambda: ops.get_indice_pairs(self.indices, self.batch, self.shape, ConvAlgo.Native,
                                                         [3, 3, 3], [1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 0],
                                                         subm=True))

    def layer(self, layer, x):
        layer.to(TORCH_DEVICE).eval()
        with torch.no_grad():
            layer(x)  # builds and caches the rulebook under its indice_key
        def run():
            with torch.no_grad():
                return layer(x)
        return torch_timer(run)


def run_cases(x: jsc.SparseConvTensor, repeats: int) -> list[dict]:
    rows = []
    backends = ["ffi", "xla"]
    ref = Spconv(x) if spconv is not None else None
    key = jax.random.key(0)

    def record(case, impl, seconds, flops=None, dense=None, **extra):
        rows.append(dict(case=case, batch=x.batch_size, impl=impl, ms=seconds * 1e3,
                         gflops=None if flops is None else flops / seconds / 1e9, dense_gflops=dense, **extra))

    def record_fwd_bwd(case, impl, loss, features, kernel, flops, dense=None):
        """The gradient of ``loss`` in features and kernel, with its ratio to the forward
        (value) of the same ``loss``: both include the same feature replacement and loss."""
        forward = median_time(jax_timer(jax.jit(loss), features, kernel), repeats)
        both = median_time(jax_timer(jax.jit(jax.grad(loss, argnums=(0, 1))), features, kernel), repeats)
        record(f"{case} fwd+bwd", impl, both, 3 * flops, dense, over_forward=both / forward)

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
        rulebook, g = cached.indice_dict["subm"], jax.random.normal(key, (x.capacity, c))
        for backend in backends:
            fwd = jax.jit(lambda t, w, b=backend: jsc.sparse_conv(t, w, subm=True, indice_key="subm", backend=b).features)
            loss = lambda f, w, b=backend: jnp.sum(jsc.sparse_conv(  # noqa: E731
                t.replace_feature(f), w, subm=True, indice_key="subm", backend=b).features ** 2)
            record(f"SubMConv3d 3^3 C={c}", backend, median_time(jax_timer(fwd, t, w), repeats), flops, dense)
            record_fwd_bwd(f"SubMConv3d 3^3 C={c}", backend, loss, t.features, w, flops, dense)
            # The two backward kernels alone: the input gradient gathers along the transposed rulebook.
            impl, k = jsc.backends.get(backend), w.reshape(27, c, c)
            input_grad = jax.jit(lambda g, k, impl=impl: impl.gather_matmul(g, jnp.swapaxes(k, 1, 2), rulebook.in_nbr))
            kernel_grad = jax.jit(lambda f, g, impl=impl: impl.gather_matmul_grad(f, g, rulebook.out_nbr))
            record(f"SubMConv3d 3^3 C={c} input grad kernel", backend,
                   median_time(jax_timer(input_grad, g, k), repeats), flops, dense)
            record(f"SubMConv3d 3^3 C={c} kernel grad kernel", backend,
                   median_time(jax_timer(kernel_grad, t.features, g), repeats), flops, dense)
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
        record_fwd_bwd(f"SparseConv3d 3^3 s2 {cin}->{cout}", backend, down_loss, t.features, w_down,
                       2 * down_pairs * cin * cout)
        up = jax.jit(lambda y, w, b=backend: jsc.sparse_conv(y, w, inverse=True, indice_key="down", backend=b).features)
        record(f"SparseInverseConv3d 3^3 {cout}->{cin}", backend, median_time(jax_timer(up, y, w_up), repeats),
               2 * down_pairs * cin * cout)
        up_loss = lambda f, w, b=backend: jnp.sum(up(y.replace_feature(f), w) ** 2)  # noqa: E731
        record_fwd_bwd(f"SparseInverseConv3d 3^3 {cout}->{cin}", backend, up_loss, y.features, w_up,
                       2 * down_pairs * cin * cout)
    if ref:
        st = ref.tensor(cin)
        layer = spconv.SparseConv3d(cin, cout, 3, 2, 1, bias=False, indice_key="down")
        layer.to(TORCH_DEVICE).eval()

        def down_run():
            with torch.no_grad():
                return layer(spconv.SparseConvTensor(st.features, st.indices, st.spatial_shape, st.batch_size))
        record(f"SparseConv3d 3^3 s2 {cin}->{cout}", "spconv", median_time(torch_timer(down_run), repeats))
        with torch.no_grad():
            sy = down_run()
        inverse = spconv.SparseInverseConv3d(cout, cin, 3, indice_key="down", bias=False)
        record(f"SparseInverseConv3d 3^3 {cout}->{cin}", "spconv", median_time(ref.layer(inverse, sy), repeats))
    return rows


# ---- a whole network -----------------------------------------------------------------------

NUM_CLASSES = 20


def network_inputs(batch: int) -> tuple[jsc.SparseConvTensor, jax.Array]:
    x = kitti_tensor([DATA / name for name in SCANS[:batch]], 0.05, FULL_RANGE)
    labels = jax.random.randint(jax.random.key(1), (x.capacity,), 0, NUM_CLASSES)
    return x, labels


def jax_network_call(kind: str, backend: str, x, labels):
    """``(compiled call, its arguments)`` of the MinkUNet forward or training step."""
    model = models.MinkUNet(NUM_CLASSES, backend=backend)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    if kind == "forward":
        fn = jax.jit(lambda variables, x: model.apply(variables, x).features)
        return fn, (variables, x)
    optimizer = optax.adam(1e-3)

    def loss_fn(params, batch_stats, x, labels):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.features, labels)
        return jnp.sum(jnp.where(x.active, losses, 0)) / jnp.sum(x.active), updates["batch_stats"]

    def step(params, batch_stats, opt_state, x, labels):  # the scan is an argument, as in a training loop
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    params = variables["params"]
    return jax.jit(step), (params, variables["batch_stats"], optimizer.init(params), x, labels)


def spconv_network_call(x):
    torch.set_num_threads(2)
    model = spconv_reference.mink_unet(x.num_channels, NUM_CLASSES).to(TORCH_DEVICE).eval()
    t = spconv_reference.to_spconv(x)
    tensor = spconv.SparseConvTensor(t.features.to(TORCH_DEVICE), t.indices.to(TORCH_DEVICE), t.spatial_shape,
                                     t.batch_size)

    def forward():
        with torch.no_grad():
            return model(tensor).features
    return torch_timer(forward)


def _reset_peak_rss() -> int:
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_kib("VmRSS")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(impl: str, kind: str, batch: int) -> dict:
    """Peak RSS rise (MiB) of one call, measured in this (fresh) process."""
    x, labels = network_inputs(batch)
    if impl == "spconv":
        call = spconv_network_call(x)
        extra = {}
    else:
        fn, args = jax_network_call(kind, impl, x, labels)
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        analysis = compiled.memory_analysis()
        extra = dict(compile_s=time.perf_counter() - start,
                     xla_buffers_mib=(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
                                      + analysis.output_size_in_bytes) / 2**20)
        call = lambda: compiled(*args)  # noqa: E731
    baseline = _reset_peak_rss()
    jax.block_until_ready(call())
    return dict(peak_rss_rise_mib=(_rss_kib("VmHWM") - baseline) / 1024, **extra)


def run_network_cases(batch: int, repeats: int, with_xla: bool, device: str) -> list[dict]:
    rows = []
    x, labels = network_inputs(batch)
    impls = ["ffi"] + (["xla"] if with_xla else []) + (["spconv"] if spconv is not None else [])
    for kind in ("forward", "train step"):
        for impl in impls:
            if impl == "spconv" and kind != "forward":
                continue  # spconv's CPU build has no backward
            if impl == "spconv":
                call = spconv_network_call(x)
            else:
                fn, args = jax_network_call(kind, impl, x, labels)
                call = jax_timer(fn, *args)
            memory = {}
            if device == "cpu":
                probe = subprocess.run([sys.executable, __file__, "--memory-probe", impl, kind, str(batch)],
                                       capture_output=True, text=True, check=True)
                memory = json.loads(probe.stdout.strip().splitlines()[-1])
            rows.append(dict(case=f"MinkUNet18 {kind}", batch=batch, impl=impl,
                             ms=median_time(call, repeats) * 1e3, gflops=None, dense_gflops=None, **memory))
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
    lines = ["| case | B | ffi ms | xla ms | spconv ms | ffi / spconv | xla / ffi | ffi fwd+bwd / its fwd "
             "| ffi GFLOP/s | XLA dense matmul GFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for case, batch in cases:
        ffi, xla, ref = (by_impl.get((case, batch, impl)) for impl in ("ffi", "xla", "spconv"))
        lines.append(f"| {case} | {batch} | {num(ffi['ms'])} | {num(xla['ms'])} | {num(ref and ref['ms'])} | "
                     f"{num(ffi['vs_spconv'], 2)} | {num(xla['xla_over_ffi'])} | {num(ffi.get('over_forward'), 2)} | "
                     f"{num(ffi['gflops'])} | {num(ffi['dense_gflops'])} |")
    return "\n".join(lines)


def network_table(rows: list[dict]) -> str:
    by_impl = {(r["case"], r["batch"], r["impl"]): r for r in rows}
    cases = list(dict.fromkeys((r["case"], r["batch"]) for r in rows if r["case"].startswith("MinkUNet")))
    num = lambda v, digits=0: "" if v is None else f"{v:.{digits}f}"  # noqa: E731
    lines = ["| case | B | ffi ms | xla ms | spconv ms | ffi / spconv | peak RSS rise MiB: ffi / xla / spconv "
             "| XLA buffers MiB: ffi / xla | compile s: ffi / xla |", "|---|---|---|---|---|---|---|---|---|"]
    for case, batch in cases:
        ffi, xla, ref = (by_impl.get((case, batch, impl), {}) for impl in ("ffi", "xla", "spconv"))
        lines.append(
            f"| {case} | {batch} | {num(ffi.get('ms'))} | {num(xla.get('ms'))} | {num(ref.get('ms'))} | "
            f"{num(ffi.get('vs_spconv'), 2)} | {num(ffi.get('peak_rss_rise_mib'))} / "
            f"{num(xla.get('peak_rss_rise_mib'))} / {num(ref.get('peak_rss_rise_mib'))} | "
            f"{num(ffi.get('xla_buffers_mib'))} / {num(xla.get('xla_buffers_mib'))} | "
            f"{num(ffi.get('compile_s'), 1)} / {num(xla.get('compile_s'), 1)} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                        help="where JAX (and spconv, if torch sees a GPU) runs the cases")
    parser.add_argument("--precision", choices=["default", "highest"], default="default",
                        help="jax_default_matmul_precision for float32: on a GPU, 'default' lets the xla "
                             "backend and the CUDA kernels use TF32; no effect on the CPU kernels")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--network-repeats", type=int, default=3, help="timed runs of the network cases")
    parser.add_argument("--no-xla-network", action="store_true",
                        help="skip the xla backend in the network cases (minutes per call)")
    parser.add_argument("--cases", choices=["all", "ops", "networks"], default="all",
                        help="single ops, the MinkUNet network cases, or both")
    parser.add_argument("--memory-probe", nargs=3, metavar=("IMPL", "KIND", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        impl, kind, batch = args.memory_probe
        print(json.dumps(memory_probe(impl, kind, int(batch))))
        return

    global spconv, TORCH_DEVICE
    jax.config.update("jax_default_device", jax.devices(args.device)[0])
    jax.config.update("jax_default_matmul_precision", None if args.precision == "default" else "highest")
    if args.device == "gpu":
        TORCH_DEVICE = "cuda"
        if spconv is not None and not torch.cuda.is_available():
            print("spconv left out: torch sees no GPU (torch.cuda.is_available() is False)")
            spconv = None
        if spconv is not None:  # its float32 products as ours: TF32 unless --precision highest
            importlib.import_module("spconv.constants").SPCONV_ALLOW_TF32 = args.precision == "default"
    machine = dict(device=str(jax.devices(args.device)[0]), precision=args.precision, platform=platform.platform(),
                   processor=platform.processor(), cpus=os.cpu_count(),
                   jax=jax.__version__, spconv=None if spconv is None else importlib.metadata.version("spconv"),
                   torch=None if torch is None else torch.__version__, build=jsc.build_info())
    print(machine)
    rows = []
    for batch in args.batches:
        x = kitti_tensor([DATA / name for name in SCANS[:batch]], 0.05, FULL_RANGE)
        print(f"batch {batch}: {int(x.num_active)} voxels, capacity {x.capacity}, grid {x.spatial_shape}")
        if args.cases in ("all", "ops"):
            rows += run_cases(x, args.repeats)
        if args.cases in ("all", "networks"):
            rows += run_network_cases(batch, args.network_repeats, not args.no_xla_network, args.device)
    add_ratios(rows)
    print(markdown_table([r for r in rows if not r["case"].startswith("MinkUNet")]))
    print()
    print(network_table(rows))
    if args.out:
        args.out.write_text(json.dumps(dict(machine=machine, results=rows), indent=1))


if __name__ == "__main__":
    main()
