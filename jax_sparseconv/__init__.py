"""jax_sparseconv: sparse convolutions for JAX and Flax, in the spirit of spconv.

Quick tour::

    import jax_sparseconv as jsc
    x = jsc.SparseConvTensor(features, indices, spatial_shape, batch_size)
    y = jsc.functional.sparse_conv(x, kernel, subm=True, indice_key="subm1")
    jsc.check_overflow(y)  # after a jitted step: raises if a capacity was too small
    blob = jsc.export(jax.jit(f), platforms=("cpu", "tpu"))(x).serialize()  # serve it elsewhere
"""

import importlib.metadata

from jax_sparseconv import convert, functional, pcd, utils, voxels
from jax_sparseconv._build import build_info
from jax_sparseconv.exporting import deserialize, export
from jax_sparseconv.functional import (global_avg_pool, global_max_pool, sparse_avg_pool, sparse_conv,
                                       sparse_max_pool)
from jax_sparseconv.geometry import ConvGeometry, make_geometry
from jax_sparseconv.rulebook import Rulebook
from jax_sparseconv.voxels import Voxels, voxelize
from jax_sparseconv.tensor import (CapacityOverflowError, SparseConvTensor, capacity_bucket, check_overflow,
                                   checkify_overflow, from_numpy, grown_capacity)

try:
    __version__ = importlib.metadata.version("jax_sparseconv")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+source"

__all__ = [
    "CapacityOverflowError", "ConvGeometry", "Rulebook", "SparseConvTensor", "Voxels", "build_info",
    "capacity_bucket", "check_overflow", "checkify_overflow", "convert", "deserialize", "export", "from_numpy",
    "functional", "global_avg_pool", "global_max_pool", "grown_capacity", "make_geometry", "pcd", "sparse_avg_pool",
    "sparse_conv", "sparse_max_pool", "utils", "voxelize", "voxels",
]
