"""The backend chosen when a program is lowered, for each platform it is lowered for.

``per_platform`` (``backend=None``) puts both implementations of an op in the traced
program, ``jax.lax.platform_dependent`` keeps one per lowering platform: the ffi kernels
on the platforms where a native module serves (``native_platforms()``: "cpu", and "cuda"
with ``jax_sparseconv._cuda``), the xla backend everywhere else. So one traced function
lowers right for a TPU from a CPU host, in a process with a CPU and an accelerator, and in
``jax.export`` for several platforms at once. Both implementations give the same shapes,
dtypes and (for rulebooks) values; each is deterministic.

``native_only`` (``backend='ffi'``) is the ffi backend with a check that the program is
lowered for native platforms only: lowering it for another platform raises a ValueError
that says so, instead of a program that fails to compile there or an export that cannot run.
"""

from __future__ import annotations

import jax
from jax.extend import core
from jax.interpreters import batching, mlir

from jax_sparseconv.backends import ffi, xla

# Backend functions and how many leading arguments are arrays (the rest are static).
ARRAY_ARGUMENTS = {"build_rulebook": 1, "gather_matmul": 3, "conv_backward": 4, "gather_sum": 2,
                   "gather_max": 2, "gather_max_grad": 3}


def native_platforms() -> tuple[str, ...]:
    """The platforms (JAX's lowering names) whose ops the native kernels serve here."""
    return (("cpu",) if ffi.available() else ()) + (("cuda",) if ffi.cuda_available() else ())


# The functions of ffi and xla are looked up at each call (tests replace them).

def _per_platform_function(name: str, num_arrays: int):
    def run(*args):
        native, portable = getattr(ffi, name), getattr(xla, name)
        arrays, static = args[:num_arrays], args[num_arrays:]
        if not native_platforms():
            return portable(*args)
        native_branch = lambda *a: native(*a, *static)  # noqa: E731  (one object for all native platforms)
        return jax.lax.platform_dependent(*arrays, default=lambda *a: portable(*a, *static),
                                          **dict.fromkeys(native_platforms(), native_branch))

    run.__name__ = run.__qualname__ = name
    return run


# ---- backend='ffi': an identity whose lowering refuses platforms without native kernels --------

_native_platform_check = core.Primitive("jsc_native_platform_check")
_native_platform_check.def_impl(lambda x: x)
_native_platform_check.def_abstract_eval(lambda aval: aval)
batching.primitive_batchers[_native_platform_check] = lambda args, dims: (_native_platform_check.bind(*args), dims[0])


def _lower_identity(ctx, x):
    return [x]


def _refuse_platform(ctx, x):
    platforms = ctx.platforms or ctx.module_context.platforms
    raise ValueError(
        f"backend='ffi' has native kernels for {', '.join(native_platforms()) or 'no platform'} only, but this "
        f"program is lowered for {', '.join(p for p in platforms if p not in native_platforms())}: use "
        "backend=None (the native kernels where they serve, the xla backend elsewhere) or backend='xla'")


for _platform in native_platforms():
    mlir.register_lowering(_native_platform_check, _lower_identity, platform=_platform)
mlir.register_lowering(_native_platform_check, _refuse_platform)


def _native_only_function(name: str, num_arrays: int):
    def run(*args):
        # The last array argument is an index array (sites or a neighbour map) in every function.
        checked = _native_platform_check.bind(args[num_arrays - 1])
        return getattr(ffi, name)(*args[:num_arrays - 1], checked, *args[num_arrays:])

    run.__name__ = run.__qualname__ = name
    return run


class _Backend:
    """A backend made of functions; hashed by identity, so ``jit`` takes it as a static argument."""

    def __init__(self, name: str, make_function):
        self.__name__ = name
        for function, num_arrays in ARRAY_ARGUMENTS.items():
            setattr(self, function, make_function(function, num_arrays))

    def __repr__(self) -> str:
        return f"<backend {self.__name__}>"


per_platform = _Backend("per_platform", _per_platform_function)
native_only = _Backend("ffi", _native_only_function)
