"""otlab.sharding: sharded solves equal single-device ones, memory per device, and
the collectives of the compiled program.

The checks that need several devices run in subprocesses with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (tests/sharding_check.py,
once for the module) and, for several processes, examples/multihost_sinkhorn.py under
``jax.distributed`` (two processes of four CPU devices). The rest runs here.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import otlab
from otlab import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]

# One xdist worker runs this module (``make test`` uses ``--dist loadgroup``): the
# eight-device subprocess of the module fixture then runs once, not once per worker.
pytestmark = pytest.mark.xdist_group("sharding")


def _env(devices: int) -> dict:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("OTLAB_TEST_JAX_CACHE_DIR", None)
    return env


@pytest.fixture(scope="module")
def eight_devices():
    return _eight_devices()


@functools.lru_cache(maxsize=1)
def _eight_devices():
    # cached per worker process: pytest re-creates a module fixture when a worker's
    # tests of this module are interleaved with other modules (measured: twice, 60 s each)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sharding_check.py"), "equality", "memory"],
        env=_env(8), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # XLA's partitioner warns when it must replicate a tensor to reshard it
    out["remat_warnings"] = [
        line[:400] for line in proc.stderr.splitlines() if "Involuntary full rematerialization" in line
    ]
    return out


SOLVES = ["sinkhorn_kernel", "sinkhorn_kernel_unbalanced", "sinkhorn_log_online", "sns", "sns_online"]


@pytest.mark.parametrize("name", SOLVES)
def test_sharded_solve_equals_single_device(eight_devices, name):
    r = eight_devices["equality"][name]
    for key in ("f", "g", "reg_cost", "cost", "transport", "apply_T"):
        assert r[key] <= 1e-6, (key, r)
    assert r["n_iter"][0] == r["n_iter"][1] and r["status"] == [0, 0], r
    assert r["f_split"], "the potential f should come back split over the 8 devices"


def test_sharded_progot_equals_single_device(eight_devices):
    # every step's problem split over the devices (``progot(mesh=...)``): iterates,
    # potentials, the coupling's cost and the map of new points as on one device
    r = eight_devices["equality"]["progot_online"]
    for key in ("xs", "f", "g", "cost", "transport"):
        assert r[key] <= 1e-6, (key, r)
    assert r["n_iter"][0] == r["n_iter"][1] and r["status"] == [0, 0], r
    assert r["f_split"], "the steps' potentials f should come back split over the 8 devices"
    assert "multiple of the mesh's 8 devices" in eight_devices["equality"]["progot_bad_rows"]


def test_no_involuntary_rematerialization(eight_devices):
    # every sharded pass is a shard_map or runs replicated: the partitioner never has to
    # gather a tensor to reshard it (ProgOT's map of new points through the centering
    # self problem did, with y split like the iterate)
    assert eight_devices["remat_warnings"] == []


def test_mesh_from_jax_make_mesh_on_eight_devices(eight_devices):
    # Explicit axes (jax.make_mesh): inputs split on that mesh, or replicated and traced
    assert eight_devices["equality"]["make_mesh"] <= 1e-10


@pytest.mark.parametrize("name", ["cardinality_dense", "cardinality_online"])
def test_sharded_cardinality_equals_single_device(eight_devices, name):
    # dense: at most k per column over rows split on the devices; online: per row
    r = eight_devices["equality"][name]
    for key in ("f", "g", "cost", "plan"):
        assert r[key] <= 1e-6, (key, r)
    assert r["n_iter"][0] == r["n_iter"][1] and r["status"] == [0, 0], r
    assert r["f_split"], "the potential f should come back split over the 8 devices"


def test_sharded_cardinality_memory_and_collectives(eight_devices):
    mem = eight_devices["memory"]
    r, n, m = mem["cardinality"], mem["n"], mem["m"]
    assert r["sharded"] <= 1.5 * r["single"] / 8, r
    ops = r["collectives"]
    assert ops and {op for op, _ in ops} <= {"all-reduce", "all-gather"}, ops
    # at most the devices' candidates: 8 devices x (4k + 1 + 4) per column (the first
    # pass's wider support, plus the Newton loop's 4 spare candidates), far below the
    # n x m cost or plan
    largest = max(size for _, size in ops)
    assert largest <= 8 * (4 * r["k"] + 5) * max(n, m) < n * m // 8, ops


@pytest.mark.parametrize("name", ["topk_dense", "topk_online"])
def test_sharded_topk_and_cost_at_equal_single_device(eight_devices, name):
    r = eight_devices["equality"][name]
    # top-k: axis 0 and 1, k = 1 and 10; counts of scores >= t: axis 0 and 1
    assert all(r["same"]) and len(r["same"]) == 6, r
    assert r["cost_at"] <= 1e-12 and r["max_score"] <= 1e-12, r


@pytest.mark.parametrize("name", ["grad_dense", "grad_log_online"])
def test_sharded_gradients_equal_single_device(eight_devices, name):
    r = eight_devices["equality"]
    assert r[name + "_scale"] > 1e-2  # a real gradient, not zeros
    assert r[name] <= 1e-6 * r[name + "_scale"], r


@pytest.mark.parametrize("name", ["kernel", "log"])
def test_dense_memory_per_device(eight_devices, name):
    r = eight_devices["memory"][name]
    assert r["sharded"] <= 1.5 * r["single"] / 8, r


def test_online_memory_per_device_is_bounded_by_the_block(eight_devices):
    # An online geometry keeps its block size on every device: per-device memory is
    # that of one block (O(block_size * m)), as on a single device, whatever n.
    mem = eight_devices["memory"]
    r, m = mem["online"], mem["m"]
    assert r["sharded"] <= 4 * 128 * m * 8, r  # a few (128, m) float64 blocks
    assert r["sharded"] <= 2.5 * r["single"], r


@pytest.mark.parametrize("name", ["kernel", "log", "online"])
def test_solver_communicates_only_vectors(eight_devices, name):
    mem = eight_devices["memory"]
    ops = mem[name]["collectives"]
    assert ops, "a sharded solve must combine partial reductions across devices"
    # only all-reduces (psum / pmax) of at most max(n, m) entries: no all-gather of
    # the points, the cost or the plan.
    assert {op for op, _ in ops} == {"all-reduce"}, ops
    assert max(size for _, size in ops) <= max(mem["n"], mem["m"]), ops


def test_gradient_communicates_vectors_and_one_cotangent(eight_devices):
    mem = eight_devices["memory"]
    ops = mem["grad"]["collectives"]
    assert {op for op, _ in ops} <= {"all-reduce", "all-gather"}, ops
    # all-gathers only of vectors (length n): the solution's reg_cost is evaluated once,
    # outside the solver's shard_map, by XLA's partitioner; never points, costs or plans
    assert all(size <= max(mem["n"], mem["m"]) for op, size in ops if op == "all-gather"), ops
    big = [size for _, size in ops if size > max(mem["n"], mem["m"])]
    # only the cotangent of the replicated y (m x d) is summed across devices: once for
    # the implicit solve, and by the one evaluation of reg_cost (a fixed count, not per pass)
    assert big and set(big) == {mem["m"] * mem["d"]} and len(big) <= 3, ops


def test_multihost_example_two_processes():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, str(ROOT / "examples" / "multihost_sinkhorn.py"),
        "--coordinator", f"localhost:{port}", "--num-processes", "2", "--n", "64",
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            [*cmd, "--process-id", str(i)], env=_env(4), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    line = [ln for ln in outs[0][0].splitlines() if ln.startswith("processes=")][0]
    fields = dict(kv.split("=") for kv in line.split())
    assert fields["processes"] == "2" and fields["devices"] == "8", line
    assert float(fields["diff"]) <= 1e-9, line


# ------------------------------------------------------------- single device, here


def test_one_device_mesh_equals_plain_geometry():
    x = jax.random.normal(jax.random.key(0), (24, 2))
    pc = otlab.PointCloud(x, x[:16] + 1.0)
    geom = sharding.shard(pc)
    assert geom.shape == (24, 16) and geom.n_shards == len(jax.devices())
    f, g = jnp.linspace(-1, 1, 24), jnp.linspace(0, 1, 16)
    for axis in (0, 1):
        np.testing.assert_allclose(geom.lse(f, g, 0.3, axis), pc.lse(f, g, 0.3, axis), rtol=1e-5)
    np.testing.assert_allclose(geom.mean_cost(), pc.mean_cost(), rtol=1e-6)
    # a cost matrix is split by rows the same way
    dense = sharding.shard(otlab.Geometry(pc.cost_matrix))
    assert dense.materialize() is dense and not dense.is_online
    np.testing.assert_allclose(dense.lse(f, g, 0.3, 0), pc.lse(f, g, 0.3, 0), rtol=1e-5)
    r1, c1 = dense.plan_operator(f, g, 0.3).rmatvec(f), pc.plan_operator(f, g, 0.3).rmatvec(f)
    np.testing.assert_allclose(r1, c1, rtol=1e-5, atol=1e-6)


def test_mesh_from_jax_make_mesh():
    # jax.make_mesh gives Explicit axes (jax >= 0.7), under which shard_map wants inputs
    # already split as its in_specs say; otlab runs its passes with the axes Auto
    mesh = jax.make_mesh((len(jax.devices()),), ("i",))
    assert any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types)
    x = jax.random.normal(jax.random.key(0), (8 * len(jax.devices()), 2))
    y = x[:6] + 0.5
    ref = otlab.sinkhorn(otlab.PointCloud(x, y), epsilon=0.1)

    @jax.jit
    def solve(x, y):  # replicated, traced inputs
        sol = otlab.sinkhorn(sharding.shard(otlab.PointCloud(x, y), mesh), epsilon=0.1)
        return sol.f, sol.apply(x, axis=0)

    f, moved = solve(x, y)
    np.testing.assert_allclose(f, ref.f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(moved, ref.apply(x, axis=0), rtol=1e-5, atol=1e-6)
    prog = jax.jit(lambda x, y: otlab.progot(x, y, num_steps=2, epsilons=jnp.asarray([0.5, 0.1]),
                                             mesh=mesh).xs)(x, y)  # fmt: skip
    ref_prog = otlab.progot(x, y, num_steps=2, epsilons=jnp.asarray([0.5, 0.1])).xs
    np.testing.assert_allclose(prog, ref_prog, rtol=1e-4, atol=1e-5)
    # under a context mesh with Explicit axes: a clear error, not shard_map's
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="Explicit"):
        otlab.sinkhorn(sharding.shard(otlab.PointCloud(x, y), mesh), epsilon=0.1)


def test_bad_inputs():
    x = jnp.zeros((8, 2))
    mesh = sharding.default_mesh()
    with pytest.raises(ValueError, match="`mesh`"):
        sharding.shard(otlab.PointCloud(x), mesh="points")
    with pytest.raises(ValueError, match="`axis`"):
        sharding.shard(otlab.PointCloud(x), mesh, axis="rows")
    with pytest.raises(ValueError, match="already sharded"):
        sharding.shard(sharding.shard(otlab.PointCloud(x), mesh), mesh)
    two = Mesh(np.asarray(jax.devices() * 2), ("points",)) if len(jax.devices()) == 1 else None
    if two is not None:  # a mesh of 2 "devices" is enough to check the divisibility error
        with pytest.raises(ValueError, match="multiple of the number of devices"):
            sharding.ShardedGeometry(otlab.PointCloud(jnp.zeros((7, 2))), two, "points")
