"""Shared fixtures: fresh random seeds (printed on failure) and the two backends."""

import os

import numpy as np
import pytest

import jax_sparseconv as jsc

BACKENDS = ["xla", "ffi"]


def pytest_report_header(config):
    return f"jax_sparseconv build: {jsc.build_info()}"


@pytest.fixture
def rng(request):
    """A numpy Generator with a fresh seed each run; set JSC_TEST_SEED to replay one."""
    seed = int(os.environ.get("JSC_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    request.node.jsc_seed = seed
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "jsc_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"replay with JSC_TEST_SEED={seed}"))


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param
