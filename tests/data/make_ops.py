"""Writes ``ops_v<N>.jax`` and ``ops_v<N>.npz`` beside this file, N the newest version of our
targets (``_native.TARGETS``): a saved user's model, for tests/test_export.py to check that
every later version still runs it with the same results.

``ops_v<N>.jax`` is a serialized ``jax.export.Exported`` for ("cpu", "tpu") with the default
backend, so its cpu part calls every ``*_v<N>`` target (rulebooks, convolution, max and
average pooling, forward and backward). ``ops_v<N>.npz`` holds its inputs (``in_0 ...``) and
the outputs (``out_0 ...``) recorded when it was written.

Write it once per version of the targets, with the oldest JAX the project supports (older
JAX cannot read newer exports): ``python tests/data/make_ops.py``. It never rewrites an
existing artifact: a failing test on one is a user's saved model broken.
"""

import sys
from pathlib import Path

import jax
import numpy as np

import jax_sparseconv as jsc
from jax_sparseconv import _native

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: its helpers
import sparse_testing as testing  # noqa: E402

SPATIAL_SHAPE, BATCH_SIZE, CAPACITY, CHANNELS = (9, 8, 7), 2, 96, 3


def network(features, indices, subm_kernel, down_kernel, down_bias, up_kernel, backend=None):
    """Features and sites of a small encoder-decoder, and the gradients of half the squared sum
    of its features: our kernels and elementwise ops only (no reduction whose order a new XLA
    could change)."""
    x = jsc.SparseConvTensor(features, indices, SPATIAL_SHAPE, BATCH_SIZE)

    def forward(features, subm_kernel, down_kernel, down_bias, up_kernel):
        h = jsc.sparse_conv(x.replace_feature(features), subm_kernel, subm=True, backend=backend)
        h = h.replace_feature(jax.nn.relu(h.features))
        down = jsc.sparse_conv(h, down_kernel, down_bias, strides=2, padding=1, indice_key="down", backend=backend)
        peak = jsc.sparse_max_pool(down, 2, backend=backend)
        mean = jsc.sparse_avg_pool(h, 3, 2, 1, backend=backend)
        up = jsc.sparse_conv(down, up_kernel, inverse=True, indice_key="down", backend=backend)
        outputs = (down, peak, mean, up)
        return tuple(t.features for t in outputs), tuple(t.indices for t in outputs)

    out_features, vjp, out_indices = jax.vjp(forward, features, subm_kernel, down_kernel, down_bias, up_kernel,
                                             has_aux=True)
    return out_features, out_indices, vjp(out_features)


def inputs(rng: np.random.Generator):
    """Random sites (with padding rows) and weights, in the order ``network`` takes them."""
    x = testing.random_tensor(rng, BATCH_SIZE, SPATIAL_SHAPE, CHANNELS, density=0.08, padding_rows=0)
    active = int(x.num_active)
    assert active <= CAPACITY, active
    features = np.zeros((CAPACITY, CHANNELS), np.float32)
    indices = np.full((CAPACITY, 4), -1, np.int32)
    rows = rng.permutation(CAPACITY)[:active]
    features[rows], indices[rows] = np.asarray(x.features)[:active], np.asarray(x.indices)[:active]
    weights = [rng.normal(size=shape).astype(np.float32) / 3
               for shape in ((3, 3, 3, CHANNELS, 4), (3, 3, 3, 4, 5), (5,), (3, 3, 3, 5, CHANNELS))]
    return [features, indices, *weights]


def newest_version() -> int:
    return max(int(target.rsplit("_v", 1)[1]) for target in _native.TARGETS)


def main() -> None:
    version = newest_version()
    artifact, recorded = HERE / f"ops_v{version}.jax", HERE / f"ops_v{version}.npz"
    if artifact.exists() or recorded.exists():
        raise SystemExit(f"{artifact.name} exists: saved models are never rewritten")
    args = inputs(np.random.default_rng(20261203))
    exported = jsc.export(jax.jit(network), platforms=("cpu", "tpu"))(*args)
    outputs = jax.tree_util.tree_leaves(exported.call(*args))
    artifact.write_bytes(exported.serialize())
    np.savez_compressed(recorded, **{f"in_{i}": a for i, a in enumerate(args)},
                        **{f"out_{i}": np.asarray(a) for i, a in enumerate(outputs)})
    print(f"wrote {artifact} ({artifact.stat().st_size} bytes) with jax {jax.__version__}")


if __name__ == "__main__":
    main()
