"""The compiled modules (``_cpu``, ``_cuda``) and whether the running jaxlib can take them.

Each module holds XLA FFI handlers compiled against the FFI headers of one jaxlib
(``ffi_api_version``, ``jaxlib_version``). A jaxlib accepts handlers of its own FFI API
version or an older minor one, and refuses newer ones; a refused registration makes
every later JAX operation of the process fail, not only ours. So the handlers are
registered only where the running jaxlib accepts them; otherwise a warning says why,
``backend=None`` serves everything from the ``xla`` backend and ``backend='ffi'``
raises (``disabled_reason``).
"""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path

import jax
import jaxlib


# The XLA FFI targets every compiled module registers, with their version suffix: exported
# programs name them, so they are kept as they are (README, "Export and serve"). The _v2
# targets take the rulebook's offset-leading neighbour maps [K, M], the _v1 ones [M, K];
# programs exported before 2026-12-06 call the _v1 ones.
TARGETS = tuple(f"jsc_{name}_v{version}" for version in (1, 2)
                for name in ("build_rulebook", "gather_matmul", "gather_matmul_grad", "gather_sum", "gather_max",
                             "gather_max_grad"))


def _import(name: str):
    try:
        return importlib.import_module(f"jax_sparseconv.{name}")
    except ImportError:  # a source checkout without the compiled extension, or built without CUDA
        return None


def running_ffi_api_version() -> tuple[int, int] | None:
    """``(major, minor)`` XLA FFI API version of the running jaxlib, read from the headers
    it ships (None where they are missing)."""
    try:
        header = (Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / "c_api.h").read_text()
    except OSError:
        return None
    found = dict(re.findall(r"#define XLA_FFI_API_(MAJOR|MINOR) (\d+)", header))
    return (int(found["MAJOR"]), int(found["MINOR"])) if len(found) == 2 else None


def _release(version: str) -> tuple[int, ...]:
    """``"0.12.0.1"`` -> ``(0, 12, 0, 1)``: the leading numeric release of a version string."""
    return tuple(int(part) for part in re.match(r"\d+(?:\.\d+)*", version).group().split("."))


def incompatibility(built_api: tuple[int, int], built_jaxlib: str, running_api: tuple[int, int] | None,
                    running_jaxlib: str) -> str | None:
    """Why handlers built with FFI API ``built_api`` (the headers of jaxlib ``built_jaxlib``)
    cannot be registered with the running jaxlib, or None where they can. Without the
    running API version (no headers), a jaxlib at least as new as the one built with counts
    as accepting."""
    if running_api is None:
        accepted = _release(running_jaxlib) >= _release(built_jaxlib)
        running = f"jaxlib {running_jaxlib}"
    else:
        accepted = running_api[0] == built_api[0] and running_api[1] >= built_api[1]
        running = f"jaxlib {running_jaxlib} (XLA FFI API {running_api[0]}.{running_api[1]})"
    if accepted:
        return None
    return (f"jax_sparseconv's native kernels were compiled against the XLA FFI headers of jaxlib "
            f"{built_jaxlib} (XLA FFI API {built_api[0]}.{built_api[1]}), which the running {running} "
            f"cannot load. Install jaxlib >= {built_jaxlib}, or rebuild jax_sparseconv against this jaxlib "
            "(`pip install --no-build-isolation --no-deps --force-reinstall <jax_sparseconv source>`, "
            "see BUILD.md). Until then every op runs on the xla backend.")


def _check(modules) -> str | None:
    running_api = running_ffi_api_version()
    for module in modules:
        if module is not None:
            reason = incompatibility(tuple(module.ffi_api_version), module.jaxlib_version, running_api,
                                     jaxlib.__version__)
            if reason is not None:
                return reason
    return None


def register(module, platform: str, prefix: str = "") -> None:
    """Registers ``module``'s handlers for ``platform`` under their names, each after ``prefix``."""
    for name, capsule in module.registrations().items():
        jax.ffi.register_ffi_target(prefix + name, capsule, platform=platform)


compiled_cpu, compiled_cuda = _import("_cpu"), _import("_cuda")
disabled_reason = _check((compiled_cpu, compiled_cuda))
if disabled_reason is not None:
    warnings.warn(disabled_reason, RuntimeWarning, stacklevel=2)
# The modules in use: None where missing or refused.
cpu, cuda = (None, None) if disabled_reason else (compiled_cpu, compiled_cuda)
for _module, _platform in ((cpu, "cpu"), (cuda, "CUDA")):
    if _module is not None:  # registering for "CUDA" is harmless where no GPU exists
        register(_module, _platform)
