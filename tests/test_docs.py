"""Every public module, class, function and method of the package has a docstring (the API
reference, ``pdoc jax_sparseconv``, is generated from them)."""

import importlib
import inspect
import pkgutil

import pytest

import jax_sparseconv

PROTOCOL = {"setup", "tree_flatten", "tree_unflatten"}  # Flax's and JAX's hooks, documented by them
MODULES = ["jax_sparseconv"] + [m.name for m in pkgutil.walk_packages(jax_sparseconv.__path__, "jax_sparseconv.")
                                if not m.name.rsplit(".", 1)[-1].startswith("_")]


def _undocumented(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    missing = [] if module.__doc__ else [module_name]
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if not inspect.getdoc(obj):
            missing.append(f"{module_name}.{name}")
        if inspect.isclass(obj):
            for member_name, member in vars(obj).items():
                if member_name.startswith("_") or member_name in PROTOCOL:
                    continue
                function = getattr(member, "__func__", member)
                if (inspect.isfunction(function) or isinstance(member, property)) and not function.__doc__:
                    missing.append(f"{module_name}.{name}.{member_name}")
    return missing


@pytest.mark.parametrize("module_name", MODULES)
def test_public_names_have_docstrings(module_name):
    assert _undocumented(module_name) == []
