"""Shared fixtures: both precisions, each test inside its own x64 context.

``dtype`` runs a test twice. The float64 run executes the whole test body inside
``jax.enable_x64(True)`` so that arrays created by the test (and by otlab) are
float64; the float32 run executes inside ``jax.enable_x64(False)``. ``x64`` is the
float64-only variant for tests that need the precision (gradients vs finite
differences, comparisons with reference solvers).
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles a few hundred small XLA programs and compilation dominates its run
# time. LLVM at -O0 compiles them about twice as fast, and the CPU backend's legacy
# (elemental) fusion emitters halve that again (jax 0.10.2: a Sinkhorn solve 2.8 ->
# 1.7 s, SNS 8.9 -> 6.3 s, a Sinkhorn gradient 5.2 -> 2.5 s, under load); the HLO
# passes (fusion, algebraic simplification) still run. The numerics are the same to
# float32 rounding, with one exception found: together, -O0 and the legacy emitters
# leave a 1e-2 error floor in an online factored Sinkhorn on float32 clouds offset by
# 1e4 (each alone, and XLA's defaults, do not), so that test runs in a child process
# under XLA's default flags (`tests/test_reliability.py`). Export XLA_FLAGS to
# override. (Subprocesses that measure performance or memory must drop these flags.)
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# Child processes (notebook kernels, the multi-device, multi-process subprocesses)
# inherit the same flags (XLA reads XLA_FLAGS once per process, when its backend
# starts); `run_as_users` runs one without them.
# (unset, or inherited from the pytest-xdist controller: this process sets its own)
_DEFAULT_FLAGS = os.environ.get("XLA_FLAGS", TEST_XLA_FLAGS) == TEST_XLA_FLAGS
if _DEFAULT_FLAGS:
    os.environ["XLA_FLAGS"] = TEST_XLA_FLAGS
# LAPACK calls (the Cholesky rung of otlab.sns) go to OpenBLAS, whose threads spin:
# with two pytest workers on two cores, a multithreaded factorisation runs ~100x
# slower. One BLAS thread per worker.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402


def run_as_users(code: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -c code *args`` in a child process as users run the library: without
    the suite's compile flags (`TEST_XLA_FLAGS`; flags exported by the caller are
    kept). For measurements, and for float32 checks at the rounding floor, where those
    flags change the numerics."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if env.get("XLA_FLAGS") == TEST_XLA_FLAGS:
        del env["XLA_FLAGS"]
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


settings.register_profile("otlab", max_examples=15, deadline=None, derandomize=True)
settings.load_profile("otlab")


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """The floating dtype of the test, with x64 enabled exactly when it is float64."""
    dt = jnp.float64 if request.param == "float64" else jnp.float32
    with jax.enable_x64(dt == jnp.float64):
        assert jnp.zeros(1, dt).dtype == dt  # the context really gives this dtype
        yield dt


@pytest.fixture
def x64():
    """Run the test in float64; yields the dtype."""
    with jax.enable_x64(True):
        assert jnp.asarray(1.0).dtype == jnp.float64
        yield jnp.float64



# One XLA compilation cache per test run, shared by the pytest-xdist workers: a
# program that both workers need (the same solver on the same problem) is compiled
# once. It lives in a temporary directory that is removed at the end of the run, so
# every run starts cold. Set OTLAB_TEST_SHARED_CACHE=0 to turn it off.
_CACHE_ENV = "OTLAB_TEST_JAX_CACHE_DIR"


def pytest_configure(config):
    if os.environ.get("OTLAB_TEST_SHARED_CACHE", "1") == "0":
        return
    if not hasattr(config, "workerinput") and _CACHE_ENV not in os.environ:
        # the controller (or a run without xdist): make the directory; workers inherit it
        config._otlab_cache_dir = tempfile.mkdtemp(prefix="otlab-jax-cache-")
        os.environ[_CACHE_ENV] = config._otlab_cache_dir
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    cache_dir = getattr(config, "_otlab_cache_dir", None)
    if cache_dir is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)
        os.environ.pop(_CACHE_ENV, None)



@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """``--dist loadgroup``: tag each node id with its ``xdist_group`` on the workers.

    pytest-xdist 3.8 writes the tag to ``item._nodeid``, which pytest 9 no longer reads
    (the id lives in ``item._id``), so its groups were silently ignored: the eight-device
    sharding subprocess ran on both workers (2 x 65 s). Done here as xdist means it."""
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        names = sorted(
            {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
             for m in item.iter_markers("xdist_group")}
        )  # fmt: skip
        if names and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")


# Every compiled XLA CPU program stays loaded while JAX's caches hold it, with some
# 20-30 memory mappings each; a worker that runs half the suite compiles a few
# thousand programs and reached the kernel's vm.max_map_count (65530), where XLA
# segfaults or aborts. When a worker holds more than _MAX_MAPPINGS mappings after
# a test, the caches are released; the shared persistent cache above makes a
# program needed again a cache read, not a compilation.
_MAX_MAPPINGS = 25_000


def _mappings() -> int:
    try:
        with open("/proc/self/maps") as fh:
            return sum(1 for _ in fh)
    except OSError:  # not Linux: no such limit to watch
        return 0


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    yield
    if _mappings() > _MAX_MAPPINGS:
        jax.clear_caches()
        gc.collect()
