"""Compile time and XLA memory of every op and of MinkUNet, for TPU (deviceless) and CPU.

    pip install ".[examples]" "jax[tpu]==<installed jax version>"   # matplotlib; libtpu compiles for TPU
    python benchmarks/tpu_compile.py                  # 16k and 131k, writes the JSON and the plot
    python benchmarks/tpu_compile.py --capacities 16384 --only subm strided
    python benchmarks/tpu_compile.py --model-capacities 16384   # MinkUNet at 16k only
    python benchmarks/tpu_compile.py --primitives --only lax jnp xla --json /tmp/p.json --plot /tmp/p.png
    python benchmarks/tpu_compile.py --capacities 16384 --only "MinkUNet train" \
        --tpu-option xla_tpu_scoped_vmem_limit_kib=8192

Each case is one jitted function of ``ShapeDtypeStruct`` arguments, compiled for a device
of a TPU v5e:2x2 topology (``jax.experimental.topologies``: a real TPU executable that
cannot run here) and for this machine's CPU, both with ``backend='xla'``, so the two
compile the same program; its rulebooks are built inside it, as in a training step.
Reported: compile seconds (``lower`` + ``compile``, one compile per case and platform in a
fresh cache) and ``memory_analysis()``'s temp, argument and output bytes.
``cost_analysis()`` is not reported: it does not count loop iterations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # libtpu: no TPU host to look for

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_sparseconv as jsc  # noqa: E402
from jax_sparseconv import models  # noqa: E402
from jax_sparseconv.functional import sparse_add  # noqa: E402
from jax_sparseconv.geometry import make_geometry  # noqa: E402
from jax_sparseconv.normalization import batch_norm_act  # noqa: E402
from jax_sparseconv.rulebook import build_rulebook  # noqa: E402
from jax_sparseconv.backends import xla  # noqa: E402

SPATIAL_SHAPE = (41, 1600, 1408)  # KITTI at 0.05 m, (z, y, x)
CHANNELS = 32
OUT = Path(__file__).resolve().parent / "results"


def _tensor(features, indices):
    return jsc.SparseConvTensor(features, indices, SPATIAL_SHAPE, 1, validate=False)


def _kernel(size, c_in=CHANNELS, c_out=CHANNELS):
    return jax.ShapeDtypeStruct((size,) * 3 + (c_in, c_out), jnp.float32)


def _train(op):
    """``value_and_grad`` of a scalar loss of ``op``'s output features, w.r.t. features and kernel."""
    def loss(features, kernel, indices):
        return jnp.sum(op(_tensor(features, indices), kernel).features ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1))


def op_cases(n: int) -> dict:
    """name: (function, argument specs). Features [n, 32] float32, sites [n, 4] int32."""
    features = jax.ShapeDtypeStruct((n, CHANNELS), jnp.float32)
    indices = jax.ShapeDtypeStruct((n, 4), jnp.int32)
    subm = lambda x, k: jsc.sparse_conv(x, k, subm=True, backend="xla")  # noqa: E731
    regular = lambda x, k: jsc.sparse_conv(x, k, strides=2, padding=1, backend="xla")  # noqa: E731
    transposed = lambda x, k: jsc.sparse_conv(x, k, strides=2, transposed=True, out_capacity=n,  # noqa: E731
                                              backend="xla")

    def inverse(x, k):
        down = jsc.sparse_conv(x, k, strides=2, indice_key="down", backend="xla")
        return jsc.sparse_conv(down, k, inverse=True, indice_key="down", backend="xla")

    def rulebook(indices, mode):
        geometry = make_geometry(mode, SPATIAL_SHAPE, 3, strides=2 if mode == "regular" else 1, padding=1)
        book = build_rulebook(indices, geometry, 1, n, xla)
        return book.out_indices, book.out_nbr, book.in_nbr, book.needed

    def pool(kind):
        op = jsc.sparse_max_pool if kind == "max" else jsc.sparse_avg_pool
        return lambda features, indices: op(_tensor(features, indices), 2, backend="xla").features

    def voxelize(points):
        v = jsc.voxelize(points, 0.05, (0.0, -40.0, -3.0, 70.4, 40.0, 1.0), n)
        return v.features, v.coords, v.num_points

    def add(features, indices, other):
        return sparse_add(_tensor(features, indices), _tensor(features, other)).features

    cases = {
        "rulebook subm 3^3": (lambda i: rulebook(i, "subm"), (indices,)),
        "rulebook strided 3^3": (lambda i: rulebook(i, "regular"), (indices,)),
        "voxelize (4 points/voxel)": (voxelize, (jax.ShapeDtypeStruct((4 * n, 4), jnp.float32),)),
        "sparse_add (union)": (add, (features, indices, indices)),
        "max pool 2^3/2": (pool("max"), (features, indices)),
        "avg pool 2^3/2": (pool("avg"), (features, indices)),
    }
    for name, op, size in (("subm conv 3^3", subm, 3), ("strided conv 3^3/2", regular, 3),
                           ("transposed conv 2^3/2", transposed, 2), ("strided + inverse 2^3", inverse, 2)):
        forward = lambda f, k, i, op=op: op(_tensor(f, i), k).features  # noqa: E731
        cases[name] = (forward, (features, _kernel(size), indices))
        cases[name + " fwd+bwd"] = (_train(op), (features, _kernel(size), indices))
    return cases


def primitive_cases(n: int) -> dict:
    """The primitives that bound the ops' TPU compile (``--primitives``): a bare sort of ``n``
    and of ``8 n`` int32 keys (a 3^3/2 rulebook's reached sites), a running count of ``8 n``
    flags as one scan (``jnp.cumsum``) and in rows (``xla.cumsum``), and the gradient of six
    dense layers with batch norm and ReLU on ``[n, 64]`` (no sparse op: how a TPU compile
    grows with the rows of arrays that fit its VMEM)."""
    keys, reached = jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((8 * n,), jnp.int32)
    flags = jax.ShapeDtypeStruct((8 * n,), jnp.bool_)

    def dense_bn_layers(kernels, x, active):
        for kernel in kernels:
            x, _, _ = batch_norm_act(x @ kernel, active, None, None, 1e-3, relu=True)
        return jnp.sum(x ** 2)

    layers = ([jax.ShapeDtypeStruct((64, 64), jnp.float32)] * 6, jax.ShapeDtypeStruct((n, 64), jnp.float32),
              jax.ShapeDtypeStruct((n,), jnp.bool_))
    return {"lax.sort of n keys": (jax.lax.sort, (keys,)),
            "lax.sort of 8n keys": (jax.lax.sort, (reached,)),
            "jnp.cumsum of 8n flags": (lambda f: jnp.cumsum(f, dtype=jnp.int32), (flags,)),
            "xla.cumsum of 8n flags": (xla.cumsum, (flags,)),
            "6 dense+BN layers, grad": (jax.grad(dense_bn_layers), layers)}


def minkunet_cases(n: int) -> dict:
    """MinkUNet18 (20 classes, 4 input channels) eval forward and training step (loss, grads)."""
    model = models.MinkUNet(20, backend="xla")
    features = jax.ShapeDtypeStruct((n, 4), jnp.float32)
    indices = jax.ShapeDtypeStruct((n, 4), jnp.int32)
    example = _tensor(jnp.zeros((n, 4)), jnp.full((n, 4), -1, jnp.int32))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), example))

    def forward(variables, f, i):
        return model.apply(variables, _tensor(f, i)).features

    def train_step(variables, f, i, labels):
        def loss(params):
            out, updates = model.apply({**variables, "params": params}, _tensor(f, i), train=True,
                                       mutable=["batch_stats"])
            logits = out.features
            picked = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[:, None], axis=1)[:, 0]
            nll = jnp.where(labels >= 0, jax.nn.logsumexp(logits, axis=1) - picked, 0)
            return jnp.sum(nll) / jnp.maximum(jnp.sum(labels >= 0), 1), updates
        return jax.value_and_grad(loss, has_aux=True)(variables["params"])

    labels = jax.ShapeDtypeStruct((n,), jnp.int32)
    return {"MinkUNet forward": (forward, (variables, features, indices)),
            "MinkUNet train step": (train_step, (variables, features, indices, labels))}


def _on(device, spec):
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh([device], ("x",)), jax.sharding.PartitionSpec())
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), spec)


def measure(function, specs, device, options: dict | None = None) -> dict:
    """Compile seconds and memory_analysis() bytes of ``function`` for ``device``, compiled
    with ``options`` (``jax.jit``'s ``compiler_options``)."""
    jax.clear_caches()
    start = time.perf_counter()
    compiled = jax.jit(function, compiler_options=options).lower(*_on(device, specs)).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return {"compile_s": seconds, "temp_bytes": int(memory.temp_size_in_bytes),
            "argument_bytes": int(memory.argument_size_in_bytes), "output_bytes": int(memory.output_size_in_bytes)}


def tpu_device(topology: str):
    from jax.experimental import topologies
    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]


def table(rows: list[dict]) -> str:
    header = ("| case | capacity | TPU compile s | CPU compile s | ratio | TPU temp MiB | CPU temp MiB | ratio |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [header]
    for r in rows:
        t, c = r["tpu"], r["cpu"]
        lines.append(f"| {r['case']} | {r['capacity']:,} | {t['compile_s']:.1f} | {c['compile_s']:.1f} | "
                     f"{t['compile_s'] / c['compile_s']:.1f}x | {t['temp_bytes'] / 2**20:.0f} | "
                     f"{c['temp_bytes'] / 2**20:.0f} | {t['temp_bytes'] / max(c['temp_bytes'], 1):.2f}x |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    capacities = sorted({r["capacity"] for r in rows})
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.42 * len(cases) + 1.5), sharey=True)
    y = np.arange(len(cases))
    height = 0.8 / (2 * len(capacities))
    for ax, (key, scale, label) in zip(axes, (("compile_s", 1, "compile time (s)"),
                                              ("temp_bytes", 2**-20, "XLA temp memory (MiB)"))):
        for j, capacity in enumerate(capacities):
            by_case = {r["case"]: r for r in rows if r["capacity"] == capacity}
            for p, (platform_name, color) in enumerate((("tpu", "tab:orange"), ("cpu", "tab:blue"))):
                values = [by_case[c][platform_name][key] * scale if c in by_case else 0 for c in cases]
                offset = (2 * j + p) * height - 0.4 + height / 2
                ax.barh(y + offset, values, height, color=color, alpha=1.0 if j else 0.55,
                        label=f"{platform_name.upper()} v5e, {capacity:,}" if platform_name == "tpu"
                        else f"CPU, {capacity:,}")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, cases)
    axes[0].invert_yaxis()
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("backend='xla' compiled for TPU v5e (deviceless) and for the CPU, same program")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacities", type=int, nargs="+", default=[16384, 131072])
    parser.add_argument("--model-capacities", type=int, nargs="+", help="MinkUNet's (default: --capacities)")
    parser.add_argument("--only", nargs="+", help="cases whose name starts with one of these")
    parser.add_argument("--primitives", action="store_true", help="also bare sorts and running counts")
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--tpu-option", nargs="+", default=[], metavar="NAME=VALUE",
                        help="compiler options of the TPU compiles (jax.jit's compiler_options), e.g. "
                             "xla_tpu_scoped_vmem_limit_kib=8192")
    parser.add_argument("--json", type=Path, default=OUT / "tpu_compile.json")
    parser.add_argument("--plot", type=Path, default=OUT / "tpu_compile.png")
    args = parser.parse_args(argv)

    tpu, cpu = tpu_device(args.topology), jax.devices("cpu")[0]
    tpu_options = dict(option.split("=", 1) for option in args.tpu_option) or None
    print(f"# jax {jax.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"TPU topology {args.topology} (deviceless), TPU compiler options {tpu_options}", flush=True)
    rows = []
    for n in args.capacities:
        models_here = n in (args.model_capacities or args.capacities)
        cases = {**(primitive_cases(n) if args.primitives else {}), **op_cases(n),
                 **(minkunet_cases(n) if models_here else {})}
        for name, (function, specs) in cases.items():
            if args.only and not any(name.startswith(prefix) for prefix in args.only):
                continue
            row = {"case": name, "capacity": n, "tpu": measure(function, specs, tpu, tpu_options),
                   "cpu": measure(function, specs, cpu)}
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"jax": jax.__version__, "python": sys.version.split()[0],
                                     "cores": os.cpu_count(), "tpu_options": tpu_options, "rows": rows}, indent=1))
    print(table(rows))
    plot(rows, args.plot)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
