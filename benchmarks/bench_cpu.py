"""Benchmark: jax_sparseconv against spconv on a real KITTI scan, each run the way its users run it.

    python benchmarks/bench_cpu.py --out results.json --plot docs/bench_cpu.png   # about 8 minutes on 2 cores
    python benchmarks/bench_cpu.py --threads 2 --channels 16 64 --no-network      # a quick look
    python benchmarks/bench_cpu.py --device gpu --out gpu.json                    # on JAX's first GPU

Input: one KITTI scan (``--scans``; ../shared/data/kitti or the folder ``JSC_KITTI_DIR`` names)
voxelized at 0.05 m over its whole extent, about 80k voxels for 000000.bin.

Threads: each ``--threads`` count runs in its own worker process, pinned to that many CPUs
before JAX and torch start (XLA's CPU thread pool, which our native kernels share, sizes
itself from the CPUs the process may use). Inside a worker both libraries are timed in turns
in that one process: the median of ``--repeats`` runs after a warm-up, and every ratio divides
by spconv's time measured in the same worker.

spconv (optional: ``pip install ".[compare]"``, spconv 2.3.8 with torch 2.13.0 CPU):
- runs on 1 thread, its correct configuration: its multi-threaded CPU kernels race. In a
  worker with more CPUs it also runs on all of them, and that row prints its error.
- reuses its rulebooks as in a network: the timed SubM layer gets a tensor that carries the
  rulebook under its ``indice_key`` (the output of an earlier layer with that key), and the
  inverse conv the strided conv's output. The benchmark counts spconv's rulebook builds during
  the timed calls and stops if one happens. The strided conv builds its rulebook in every call,
  in both libraries, as in a network's forward.
- is checked against ours in the same run: ``error`` is ``max |spconv - ours| / max |ours|``
  over the active rows (rows matched by site), on the same inputs and weights.
- has no CPU backward, so the training step is ours alone.

Open3D (optional: ``pip install open3d-cpu==0.20.0``, with Debian's ``libusb-1.0-0``; it works
with torch 2.13.0; keep it out of the environment that runs our tests, whose warning filters
turn its dependency dash's pytest plugin into an error): ``open3d.ml.torch.layers.SparseConv`` on the SubM cases, with voxel-centre
positions in voxel units and the output positions equal to the input's (a submanifold conv).
Called as Open3D-ML's networks call it, the layer searches the neighbours (a spatial hash table
and a fixed-radius search) in every call ("searched"); it has no public way to reuse them, so
the benchmark also times the convolution alone on the neighbour lists of an earlier call
(``ops.continuous_conv`` with the layer's own arguments: "reused", the counterpart of a reused
rulebook). It runs on the worker's CPUs and is checked against ours like spconv.

Ours: the ``ffi`` backend (native kernels) and the ``xla`` backend (pure JAX), jitted, on the
worker's threads. SubM rows also give the achieved GFLOP/s (2 x pairs x C^2 / time) and XLA's
dense float32 matmul rate for the same ``[pairs, C] x [C, C]`` shape, measured in the same run.
The network is MinkUNet18 (``jax_sparseconv.models.MinkUNet``, 20 classes; spconv's twin in
``tests/spconv_twins.py``): eval forward, and our training step (loss, gradients,
Adam update), rulebooks built inside each call.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKER_CPUS = "JSC_BENCH_CPUS"  # set by the parent: the worker pins itself before importing JAX
if os.environ.get(WORKER_CPUS):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:int(os.environ[WORKER_CPUS])])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jax_sparseconv as jsc  # noqa: E402
from jax_sparseconv import models  # noqa: E402
from jax_sparseconv.utils import kitti_tensor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the spconv twins of our models
import spconv_twins  # noqa: E402

FULL_RANGE = (-80.0, -80.0, -5.0, 80.0, 80.0, 3.0)  # covers every point of the scans
DATA = Path(os.environ.get("JSC_KITTI_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kitti"))
NUM_CLASSES = 20

try:
    import spconv.pytorch as spconv
    import torch
    from spconv.pytorch import ops as spconv_ops
except ImportError:
    spconv = torch = spconv_ops = None
try:
    import open3d.ml.torch as open3d_ml
except ImportError:
    open3d_ml = None


# ---- timing -------------------------------------------------------------------------------

def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (compiles under jit)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_call(fn, *args):
    return lambda: jax.block_until_ready(fn(*args))


def dense_matmul_rate(rows: int, channels: int, repeats: int) -> float:
    a = jnp.ones((rows, channels), jnp.float32)
    b = jnp.ones((channels, channels), jnp.float32)
    return 2 * rows * channels**2 / median_time(jax_call(jax.jit(jnp.matmul), a, b), repeats) / 1e9


# ---- spconv, as its users run it -----------------------------------------------------------

class RulebookBuilds:
    """Counts spconv's rulebook constructions (``ops.get_indice_pairs*``) while active."""

    NAMES = ("get_indice_pairs", "get_indice_pairs_implicit_gemm")

    def __init__(self):
        self.count = 0
        for name in self.NAMES:
            original = getattr(spconv_ops, name)

            def counted(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)
            setattr(spconv_ops, name, counted)


class Spconv:
    """spconv runs of the benchmark's cases on the tensor ``x``'s active rows."""

    def __init__(self, x: jsc.SparseConvTensor, device: str, builds: RulebookBuilds):
        base = spconv_twins.to_spconv(x)
        self.x, self.device, self.builds = x, device, builds
        self.indices, self.shape, self.batch = base.indices.to(device), base.spatial_shape, base.batch_size

    def tensor(self, features: np.ndarray, like=None):
        """A spconv tensor of the active rows' ``features``; with ``like``, one that carries its rulebooks."""
        f = torch.from_numpy(np.asarray(features)[np.asarray(self.x.active)]).to(self.device)
        if like is not None:
            return like.replace_feature(f)
        return spconv.SparseConvTensor(f, self.indices, self.shape, self.batch)

    def timed(self, call, repeats: int, threads: int, *, reuses_rulebook: bool):
        """``(median seconds, last output)`` of ``call()`` on ``threads`` threads, without autograd."""
        torch.set_num_threads(threads)
        outputs = []

        def run():
            with torch.no_grad():
                out = call()
            if self.device == "cuda":
                torch.cuda.synchronize()
            outputs[:] = [out]

        before = self.builds.count
        seconds = median_time(run, repeats)
        if reuses_rulebook and self.builds.count != before:
            raise RuntimeError(f"spconv rebuilt its rulebook {self.builds.count - before} times in a timed call "
                               "that should reuse it")
        return seconds, outputs[0]

    def rulebook_call(self):
        from spconv.core import ConvAlgo
        return lambda: spconv_ops.get_indice_pairs(self.indices, self.batch, self.shape, ConvAlgo.Native,
                                                   [3, 3, 3], [1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 0], subm=True)

    def load(self, layer, kernel):
        """``layer`` with our ``[*k, C_in, C_out]`` kernel as its ``[C_out, *k, C_in]`` weight."""
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(np.moveaxis(np.asarray(kernel), -1, 0).copy()))
        return layer.to(self.device).eval()


def open3d_subm_calls(x: jsc.SparseConvTensor, features, kernel):
    """``(searching, reusing)``: Open3D's SparseConv over ``x``'s active sites (one scan) with
    our ``[3, 3, 3, C, C]`` kernel (it indexes offsets as Open3D's does: z, y, x for positions
    given x, y, z), and its convolution alone on the neighbours the first call found."""
    active = np.asarray(x.active)
    zyx = np.asarray(x.indices)[active][:, 1:]
    positions = torch.from_numpy(zyx[:, ::-1].astype(np.float32) + 0.5)
    rows = torch.from_numpy(np.asarray(features)[active])
    layer = open3d_ml.layers.SparseConv(in_channels=kernel.shape[-2], filters=kernel.shape[-1], kernel_size=[3, 3, 3],
                                        use_bias=False)
    with torch.no_grad():
        layer.kernel.copy_(torch.from_numpy(np.asarray(kernel)))

    def searching():
        with torch.no_grad():
            return layer(rows, positions, positions, voxel_size=1.0)

    searching()  # leaves the neighbour lists and the other arguments in layer._conv_values

    def reusing():
        with torch.no_grad():
            return open3d_ml.ops.continuous_conv(**{**layer._conv_values, "inp_features": rows})
    return searching, reusing


def site_order(indices: np.ndarray) -> np.ndarray:
    """The permutation that sorts rows by their site (batch, then coordinates)."""
    return np.lexsort(indices.T[::-1])


def by_site(indices: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Rows ordered by their site, so that two libraries' outputs compare row by row."""
    return features[site_order(indices)]


def error(spconv_out, ours: jsc.SparseConvTensor) -> float:
    """``max |spconv - ours| / max |ours|`` over the active rows, matched by site."""
    active = np.asarray(ours.active)
    reference = by_site(np.asarray(ours.indices)[active], np.asarray(ours.features)[active])
    theirs = by_site(spconv_out.indices.cpu().numpy(), spconv_out.features.cpu().numpy())
    if theirs.shape != reference.shape:
        return float("inf")
    return float(np.max(np.abs(theirs - reference)) / np.max(np.abs(reference)))


# ---- the cases ----------------------------------------------------------------------------

def op_cases(x: jsc.SparseConvTensor, args, ref: Spconv | None, spconv_threads: list[int], record) -> None:
    key = jax.random.key(0)

    def ours(case, fn, *inputs, flops=None, dense=None):
        """Times ``fn`` on each backend; returns the ffi output. Where that is a tensor, the
        timed call returns its features only, as a layer inside a network makes them:
        returning the whole tensor from ``jit`` would also copy the rulebooks its input carries."""
        def made(out):
            return out.features if isinstance(out, jsc.SparseConvTensor) else out

        out = None
        for backend in args.backends:
            call = jax.jit(lambda *a, b=backend: fn(*a, backend=b))
            timed = jax.jit(lambda *a, b=backend: made(fn(*a, backend=b)))
            record(case, backend, median_time(jax_call(timed, *inputs), args.repeats), flops=flops, dense=dense)
            out = call(*inputs) if backend == "ffi" or out is None else out
        return out

    def theirs(case, call, ours_out, reuses_rulebook, flops=None):
        for threads in spconv_threads:
            seconds, out = ref.timed(call, args.repeats, threads, reuses_rulebook=reuses_rulebook)
            record(case, "spconv", seconds, threads=threads, flops=flops,
                   error=None if ours_out is None else error(out, ours_out))

    case = "rulebook SubM 3^3"
    geometry = jsc.make_geometry("subm", x.spatial_shape, 3)
    ours(case, lambda idx, backend: jsc.rulebook.build_rulebook(idx, geometry, x.batch_size, x.capacity,
                                                                 jsc.backends.get(backend)), x.indices)
    if ref:
        theirs(case, ref.rulebook_call(), None, reuses_rulebook=False)

    seed = jsc.sparse_conv(x, jnp.zeros((3, 3, 3, x.num_channels, 1)), subm=True, indice_key="subm")
    pairs = int(jnp.sum(seed.indice_dict["subm"].out_nbr >= 0))
    spconv_seed = None
    if ref:  # an earlier SubM layer's output: it carries the rulebook under "subm"
        first = spconv.SubMConv3d(x.num_channels, 1, 3, bias=False, indice_key="subm").to(ref.device)
        with torch.no_grad():
            spconv_seed = first(ref.tensor(x.features))
    for c in args.channels:
        case = f"SubMConv3d 3^3 C={c}"
        t = seed.replace_feature(jax.random.normal(key, (x.capacity, c)))
        w = jax.random.normal(key, (3, 3, 3, c, c)) / np.sqrt(27 * c)
        flops = 2 * pairs * c * c
        out = ours(case, lambda t, w, backend: jsc.sparse_conv(t, w, subm=True, indice_key="subm", backend=backend),
                   t, w, flops=flops, dense=dense_matmul_rate(pairs, c, args.repeats))
        if ref:
            layer = ref.load(spconv.SubMConv3d(c, c, 3, bias=False, indice_key="subm"), w)
            st = ref.tensor(t.features, like=spconv_seed)
            theirs(case, lambda: layer(st), out, reuses_rulebook=True, flops=flops)
        if open3d_ml is not None and args.device == "cpu" and x.batch_size == 1:
            reference = np.asarray(out.features)[np.asarray(out.active)]
            for impl, call in zip(("open3d searched", "open3d"), open3d_subm_calls(x, t.features, w)):
                record(case, impl, median_time(call, args.repeats), flops=flops,
                       error=float(np.max(np.abs(call().numpy() - reference)) / np.max(np.abs(reference))))

    cin, cout = 32, 64
    t = x.replace_feature(jax.random.normal(key, (x.capacity, cin)))
    w_down = jax.random.normal(key, (3, 3, 3, cin, cout)) / np.sqrt(27 * cin)
    w_up = jax.random.normal(key, (3, 3, 3, cout, cin)) / np.sqrt(27 * cout)

    def down(t, w, backend):
        return jsc.sparse_conv(t, w, strides=2, padding=1, indice_key="down", out_capacity=2 * t.capacity,
                               backend=backend)
    case = f"SparseConv3d 3^3 s2 {cin}->{cout}"
    y = ours(case, down, t, w_down)
    jsc.check_overflow(y)
    case_up = f"SparseInverseConv3d 3^3 {cout}->{cin}"
    up_out = ours(case_up, lambda y, w, backend: jsc.sparse_conv(y, w, inverse=True, indice_key="down",
                                                                 backend=backend), y, w_up)
    if ref:
        down_layer = ref.load(spconv.SparseConv3d(cin, cout, 3, 2, 1, bias=False, indice_key="down"), w_down)
        st = ref.tensor(t.features)
        theirs(case, lambda: down_layer(st), y, reuses_rulebook=False)  # st's rulebooks stay empty: it builds
        torch.set_num_threads(1)
        with torch.no_grad():
            sy = down_layer(st)  # carries the "down" rulebook
        # Our strided output's features in spconv's row order (its rows are in first-seen order).
        active = np.asarray(y.active)
        ours_sites, ours_rows = np.asarray(y.indices)[active], np.asarray(y.features)[active]
        aligned = np.empty_like(ours_rows)
        aligned[site_order(sy.indices.cpu().numpy())] = by_site(ours_sites, ours_rows)
        sy = sy.replace_feature(torch.from_numpy(aligned).to(ref.device))
        up_layer = ref.load(spconv.SparseInverseConv3d(cout, cin, 3, bias=False, indice_key="down"), w_up)
        theirs(case_up, lambda: up_layer(sy), up_out, reuses_rulebook=True)


def network_cases(x: jsc.SparseConvTensor, args, ref: Spconv | None, spconv_threads: list[int], record) -> None:
    labels = jax.random.randint(jax.random.key(1), (x.capacity,), 0, NUM_CLASSES)
    torch_model = ours_out = None
    if ref:  # random weights and statistics, ours converted from them, so the outputs compare
        torch_model = spconv_twins.randomize(spconv_twins.mink_unet(x.num_channels, NUM_CLASSES), seed=0)
    for backend in args.network_backends:
        model = models.MinkUNet(NUM_CLASSES, backend=backend)
        variables = jax.jit(model.init)(jax.random.key(0), x)
        if torch_model is not None:
            variables = jsc.convert.from_spconv(torch_model.state_dict(), variables)
        forward = jax.jit(lambda variables, x: model.apply(variables, x))
        record("MinkUNet18 forward", backend, median_time(jax_call(forward, variables, x), args.network_repeats))
        if backend == "ffi" or ours_out is None:  # the output spconv's is checked against
            ours_out = forward(variables, x)
        step = training_step(model)
        params = variables["params"]
        inputs = (params, variables["batch_stats"], optax.adam(1e-3).init(params), x, labels)
        record("MinkUNet18 train step", backend, median_time(jax_call(step, *inputs), args.network_repeats))
    if ref:
        torch_model.to(ref.device).eval()
        st = ref.tensor(x.features)
        for threads in spconv_threads:
            seconds, out = ref.timed(lambda: torch_model(st), args.network_repeats, threads, reuses_rulebook=False)
            record("MinkUNet18 forward", "spconv", seconds, threads=threads, error=error(out, ours_out))


def segmentation_loss(logits, x, labels):
    """Mean softmax cross-entropy over the active sites."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.features, labels)
    return jnp.sum(jnp.where(x.active, losses, 0)) / jnp.sum(x.active)


def training_step(model, loss=segmentation_loss):
    """Jitted ``(params, batch_stats, opt_state, x, targets) -> (params, batch_stats, opt_state,
    loss)``: ``loss(model output, x, targets)``, its gradients and an Adam update."""
    optimizer = optax.adam(1e-3)

    def loss_fn(params, batch_stats, x, targets):
        out, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                   mutable=["batch_stats"])
        return loss(out, x, targets), updates["batch_stats"]

    def step(params, batch_stats, opt_state, x, targets):
        (value, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, value

    return jax.jit(step)


def worker(args) -> list[dict]:
    """The cases on this process's threads (all its CPUs), as JSON-ready rows."""
    device = jax.devices(args.device)[0]
    jax.config.update("jax_default_device", device)
    threads = len(os.sched_getaffinity(0)) if args.device == "cpu" else None
    x = kitti_tensor([DATA / name for name in args.scans], 0.05, FULL_RANGE)
    voxels = int(x.num_active)
    print(f"worker: {threads or 'GPU'} threads, {voxels} voxels, capacity {x.capacity}", file=sys.stderr)
    rows = []

    def record(case, impl, seconds, threads=threads, flops=None, dense=None, error=None):
        rows.append(dict(case=case, impl=impl, threads=threads, voxels=voxels, ms=seconds * 1e3,
                         gflops=None if flops is None else flops / seconds / 1e9, dense_gflops=dense, error=error))
        print(f"  {case:32s} {impl:7s} {str(threads):>4s} threads {seconds * 1e3:9.1f} ms"
              + ("" if error is None else f"   error {error:.1e}"), file=sys.stderr)

    ref, spconv_threads = None, []
    if spconv is not None and (args.device == "cpu" or torch.cuda.is_available()):
        ref = Spconv(x, "cpu" if args.device == "cpu" else "cuda", RulebookBuilds())
        spconv_threads = sorted({1, threads}) if threads else [1]
    op_cases(x, args, ref, spconv_threads, record)
    if args.network:
        network_cases(x, args, ref, spconv_threads, record)
    return rows


# ---- the report ---------------------------------------------------------------------------

def add_ratios(rows: list[dict]) -> None:
    """``vs_spconv_1t``: time over spconv's 1-thread time for the case in the same worker."""
    base = {(r["worker"], r["case"]): r["ms"] for r in rows if r["impl"] == "spconv" and r["threads"] in (1, None)}
    for r in rows:
        b = base.get((r["worker"], r["case"]))
        r["vs_spconv_1t"] = None if b is None else r["ms"] / b


def markdown_table(rows: list[dict]) -> str:
    """One line per case; per worker (thread count): our backends, spconv on 1 thread and our
    ffi time over it, spconv on the worker's threads with its error, Open3D (where it ran) with
    its error; GFLOP/s of the last worker."""
    num = lambda v, digits=1: "" if v is None else f"{v:.{digits}f}"  # noqa: E731
    workers = list(dict.fromkeys(r["worker"] for r in rows))
    last = workers[-1]
    by = {(r["case"], r["worker"], r["impl"], r["threads"]): r for r in rows}
    backends = [impl for impl in ("ffi", "xla") if any(r["impl"] == impl for r in rows)]
    with_open3d = any(r["impl"] == "open3d" for r in rows)
    header = ["case"]
    for w in workers:
        t = w or "GPU"
        header += [f"{impl} {t}t ms" for impl in backends] + [f"spconv 1t ms ({t}t run)", f"ffi {t}t / spconv 1t"]
        if w not in (1, None):
            header.append(f"spconv {t}t ms (error)")
        if with_open3d:
            header.append(f"Open3D {t}t ms: reused / searched (error)")
    header += [f"ffi {last or 'GPU'}t GFLOP/s (dense matmul)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in dict.fromkeys(r["case"] for r in rows):
        cells = [case]
        for w in workers:
            ours = {impl: by.get((case, w, impl, w)) for impl in backends}
            ref = by.get((case, w, "spconv", 1))
            cells += [num(o and o["ms"]) for o in ours.values()] + [num(ref and ref["ms"])]
            cells.append(num(ours["ffi"] and ours["ffi"]["vs_spconv_1t"], 2) if "ffi" in ours else "")
            if w not in (1, None):
                many = by.get((case, w, "spconv", w))
                cells.append("" if many is None else f"{many['ms']:.1f} ({many['error']:.2f})"
                             if many["error"] is not None else f"{many['ms']:.1f}")
            if with_open3d:
                peer, searched = by.get((case, w, "open3d", w)), by.get((case, w, "open3d searched", w))
                cells.append("" if peer is None else f"{peer['ms']:.1f} / {searched['ms']:.0f} "
                                                     f"({max(peer['error'], searched['error']):.0e})")
        ffi = by.get((case, last, "ffi", last))
        cells.append("" if ffi is None or ffi["gflops"] is None else
                     f"{ffi['gflops']:.0f} ({ffi['dense_gflops']:.0f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


STYLE = {"ffi": ("C0", "ours (ffi)"), "xla": ("C2", "ours (xla)"), "spconv": ("C1", "spconv 2.3.8"),
         "open3d": ("C3", "Open3D 0.20, neighbours reused"), "open3d searched": ("C4", "Open3D 0.20, neighbours searched")}


def plot(rows: list[dict], machine: dict, path: Path) -> None:
    """SubM time against channels (left) and the other cases (right), per library and thread count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last_worker = max(r["worker"] or 0 for r in rows)
    # spconv on 1 thread ran in every worker: show the run beside our largest thread count; Open3D
    # only on the most threads.
    shown = [r for r in rows if not (r["impl"] == "spconv" and r["threads"] == 1 and (r["worker"] or 0) != last_worker)
             and not (r["impl"].startswith("open3d") and (r["worker"] or 0) != last_worker)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw=dict(width_ratios=[1, 1.4]))
    series: dict[tuple, list] = {}
    for r in shown:
        if r["case"].startswith("SubMConv3d"):
            series.setdefault((r["impl"], r["threads"]), []).append((int(r["case"].split("C=")[1]), r["ms"], r["error"]))
    for (impl, threads), points in sorted(series.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        color, name = STYLE[impl]
        label = f"{name}, {threads or 'GPU'} thread{'s' * (threads != 1)}"
        errors = [e for _, _, e in points if e is not None]
        if impl == "spconv" and threads not in (1, None) and errors:
            label += f" (wrong: error up to {max(errors):.2f})"
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=color,
                  **_line_style(impl, threads, last_worker), label=label)
    left.set(xscale="log", yscale="log", xlabel="channels C (C -> C)", ylabel="ms (median)",
             title="SubMConv3d 3x3x3 forward, rulebook reused")
    left.set_xticks(sorted({p[0] for pts in series.values() for p in pts}))
    left.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.legend(fontsize=8)
    left.grid(alpha=0.3)

    cases = list(dict.fromkeys(r["case"] for r in shown if not r["case"].startswith("SubMConv3d")))
    bars = list(dict.fromkeys((r["impl"], r["threads"]) for r in shown if r["case"] in cases))
    bars.sort(key=lambda b: (list(STYLE).index(b[0]), b[1] or 0))
    ms = {(r["case"], r["impl"], r["threads"]): r["ms"] for r in shown}
    height = 0.8 / len(bars)
    for j, (impl, threads) in enumerate(bars):
        color, name = STYLE[impl]
        ys = [i + j * height for i, case in enumerate(cases) if (case, impl, threads) in ms]
        values = [ms[case, impl, threads] for case in cases if (case, impl, threads) in ms]
        style = _line_style(impl, threads, last_worker)
        right.barh(ys, values, height, color=color, alpha=style["alpha"],
                   hatch="//" if style["linestyle"] == ":" else None,
                   label=f"{name}, {threads or 'GPU'} thread{'s' * (threads != 1)}")
        for yy, v in zip(ys, values):
            right.text(v, yy, f" {v:.0f}", va="center", fontsize=7)
    right.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))], cases, fontsize=8)
    right.invert_yaxis()
    right.set(xscale="log", xlabel="ms (median)", title="rulebook, strided and inverse convs, MinkUNet18")
    right.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    right.set_xlim(right=3 * max(ms.values()))  # room for the labels
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
    voxels = rows[0]["voxels"]
    fig.suptitle(f"KITTI scan, {voxels} voxels at 0.05 m; {machine['cpu_model']} ({machine['isa']}), "
                 f"{machine['cpus']} CPUs; jax {machine['jax']}, spconv {machine['spconv']} (torch {machine['torch']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _line_style(impl: str, threads, last_worker) -> dict:
    """Solid: the configurations compared (ours on the most threads, spconv on 1); dashed: ours on
    fewer threads; dotted and faded: spconv on several threads (its results are wrong)."""
    if impl == "spconv":
        return dict(linestyle="-", alpha=1.0) if threads in (1, None) else dict(linestyle=":", alpha=0.5)
    return dict(linestyle="-", alpha=1.0) if threads in (last_worker, None) else dict(linestyle="--", alpha=0.6)


def cpu_description() -> tuple[str, str]:
    """``(model name, widest x86 vector ISA)`` from /proc/cpuinfo (empty strings elsewhere)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = next((name for name, flag in (("AVX-512", "avx512f"), ("AVX2", "avx2"), ("AVX", "avx")) if flag in flags),
               "")
    return model, isa


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                        help="where JAX (and spconv, if torch sees a GPU) runs the cases")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="CPU thread counts, one worker process each (ignored with --device gpu)")
    parser.add_argument("--scans", nargs="+", default=["000000.bin"], help="KITTI scans, one batch item each")
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128], help="SubM widths")
    parser.add_argument("--backends", nargs="+", choices=["ffi", "xla"], default=["ffi", "xla"],
                        help="our backends in the single-op cases")
    parser.add_argument("--network-backends", nargs="+", choices=["ffi", "xla"], default=["ffi"],
                        help="our backends in the MinkUNet cases (xla: minutes per case)")
    parser.add_argument("--no-network", dest="network", action="store_false", help="skip the MinkUNet cases")
    parser.add_argument("--precision", choices=["default", "highest"], default="default",
                        help="jax_default_matmul_precision for float32: on a GPU, 'default' lets the xla "
                             "backend and the CUDA kernels use TF32 (spconv then too); no effect on the CPU kernels")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--network-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write the picture (PNG) here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", None if args.precision == "default" else "highest")
    if spconv is not None and args.device == "gpu":  # its float32 products as ours
        importlib.import_module("spconv.constants").SPCONV_ALLOW_TF32 = args.precision == "default"
    if args.worker:
        print(json.dumps(worker(args)))
        return

    available = len(os.sched_getaffinity(0))
    if args.device == "cpu" and max(args.threads) > available:
        parser.error(f"--threads {max(args.threads)}: this process may use only {available} CPUs")
    rows = []
    for threads in args.threads if args.device == "cpu" else [None]:
        env = dict(os.environ)
        if threads:
            env.update({WORKER_CPUS: str(threads), "JAX_PLATFORMS": "cpu"})
        done = subprocess.run([sys.executable, __file__, "--worker", *sys.argv[1:]], env=env, check=True,
                              stdout=subprocess.PIPE, text=True)
        worker_rows = json.loads(done.stdout.strip().splitlines()[-1])
        for r in worker_rows:
            r["worker"] = threads
        rows += worker_rows
    add_ratios(rows)
    cpu_model, isa = cpu_description()
    machine = dict(device=args.device, precision=args.precision, platform=platform.platform(),
                   cpu_model=cpu_model, isa=isa, cpus=available, python=platform.python_version(),
                   jax=jax.__version__, spconv=None if spconv is None else spconv_version(),
                   torch=None if torch is None else torch.__version__, build=jsc.build_info())
    print(machine)
    print(markdown_table(rows))
    if args.out:
        args.out.write_text(json.dumps(dict(machine=machine, command=sys.argv[1:], results=rows), indent=1))
    if args.plot:
        plot(rows, machine, args.plot)


def spconv_version() -> str:
    return importlib.metadata.version("spconv")


if __name__ == "__main__":
    main()
