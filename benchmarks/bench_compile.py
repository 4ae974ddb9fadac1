"""First-call latency: tracing + lowering and XLA compilation, otlab against ott-jax.

The case of issue 10: ``jax.jit(jax.value_and_grad(sinkhorn_divergence))`` (loss w.r.t.
the source points) at 300 x 400 points in 2-D, float32, both libraries at the same
epsilon (0.05 x the mean cost of the ``x``-``y`` problem: otlab's default, ott-jax's
``relative_epsilon="mean"``), ``tol = 1e-4``, ``check_every = inner_iterations = 10``.
Also plain ``jax.jit(sinkhorn)`` (potentials) and ``jax.jit(jax.grad(reg_cost))``.

Every measurement is fresh: ``jax.clear_caches()`` first, then ``jax.jit(f).lower(x, y)``
(tracing and lowering, timed) and ``.compile()`` (XLA, timed), then the warm run of the
compiled executable (median of 7). Measurements are interleaved otlab / ott-jax and the
table gives medians; both wall and process CPU time are shown (XLA compiles on several
threads; on a loaded machine the CPU time is the steadier figure). ``XLA_FLAGS`` must
not lower the backend optimisation level (the unit tests do): the run refuses it.

Usage::

    python -m benchmarks.bench_compile [--quick]
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np

import otlab
from benchmarks import common

N, M, D = 300, 400, 2
TOL, CHECK_EVERY, MAX_ITER = 1e-4, 10, 2000


def _ott_solver():
    from ott.solvers.linear import sinkhorn

    return sinkhorn.Sinkhorn(
        threshold=TOL, inner_iterations=CHECK_EVERY, max_iterations=MAX_ITER
    )


def _ott_geom(x, y):
    from ott.geometry import pointcloud

    return pointcloud.PointCloud(x, y, epsilon=0.05, relative_epsilon="mean")


def _fg(sol):
    return sol.f, sol.g


def _cases():
    """``name -> (otlab fn, ott-jax fn)``, each ``fn(x, y)``."""
    from ott.geometry import pointcloud
    from ott.problems.linear import linear_problem
    from ott.tools import sinkhorn_divergence as ott_sd

    def ott_div(x, y):
        out = ott_sd.sinkhorn_divergence(
            pointcloud.PointCloud, x, y, epsilon=0.05, relative_epsilon="mean",
            solve_kwargs=dict(threshold=TOL, inner_iterations=CHECK_EVERY,
                              max_iterations=MAX_ITER),
        )  # fmt: skip
        return out[0]

    def ott_out(x, y):
        return _ott_solver()(linear_problem.LinearProblem(_ott_geom(x, y)))

    def otlab_sol(x, y):
        return otlab.sinkhorn(otlab.PointCloud(x, y), tol=TOL, check_every=CHECK_EVERY)

    def otlab_div(x, y):
        return otlab.sinkhorn_divergence(x, y, tol=TOL, check_every=CHECK_EVERY)

    return {
        "value_and_grad(sinkhorn_divergence)": (
            jax.value_and_grad(otlab_div), jax.value_and_grad(ott_div)
        ),
        "sinkhorn (potentials)": (
            lambda x, y: _fg(otlab_sol(x, y)),
            lambda x, y: _fg(ott_out(x, y)),
        ),
        "grad(reg_cost)": (
            jax.grad(lambda x, y: otlab_sol(x, y).reg_cost),
            jax.grad(lambda x, y: ott_out(x, y).reg_ot_cost),
        ),
    }  # fmt: skip


def measure(fn, x, y, warm_reps: int = 7) -> dict[str, float]:
    """Fresh lower and compile times (wall and CPU, s) and the warm run time (s)."""
    jax.clear_caches()
    c0, t0 = time.process_time(), time.perf_counter()
    lowered = jax.jit(fn).lower(x, y)
    t1 = time.perf_counter()
    exe = lowered.compile()
    c2, t2 = time.process_time(), time.perf_counter()
    common.block(exe(x, y))
    warm = []
    for _ in range(warm_reps):
        t3 = time.perf_counter()
        common.block(exe(x, y))
        warm.append(time.perf_counter() - t3)
    return dict(
        lower=t1 - t0, compile=t2 - t1, total=t2 - t0, cpu=c2 - c0, warm=float(np.median(warm))
    )


def run(quick: bool = False) -> str:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" in flags:
        raise RuntimeError(f"bench_compile: unset XLA_FLAGS ({flags!r}); it changes compile times.")
    reps = 1 if quick else 5
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.uniform(kx, (N, D))
    y = jax.random.uniform(ky, (M, D))
    rows = []
    for name, (ours, theirs) in _cases().items():
        res: dict[str, list[dict[str, float]]] = {"otlab": [], "ott": []}
        for _ in range(reps):  # interleaved: load changes hit both alike
            res["otlab"].append(measure(ours, x, y))
            res["ott"].append(measure(theirs, x, y))
        med = {k: {f: float(np.median([r[f] for r in v])) for f in v[0]} for k, v in res.items()}
        a, b = med["otlab"], med["ott"]
        print(f"{name}: otlab {a}, ott {b}", file=sys.stderr, flush=True)
        rows.append([
            name,
            f"{a['lower']:.2f} + {a['compile']:.2f} = {a['total']:.2f}",
            f"{b['lower']:.2f} + {b['compile']:.2f} = {b['total']:.2f}",
            f"**{a['total'] / b['total']:.2f}**",
            f"{a['cpu'] / b['cpu']:.2f}",
            f"{a['warm'] * 1e3:.1f} / {b['warm'] * 1e3:.1f}",
            f"{a['warm'] / b['warm']:.2f}",
        ])  # fmt: skip
    header = [
        "case (300 x 400, float32)",
        "otlab lower + compile (s)",
        "ott-jax lower + compile (s)",
        "ratio (wall)",
        "ratio (CPU)",
        "warm otlab / ott (ms)",
        "warm ratio",
    ]
    return (
        f"First-call latency, fresh compiles (`jax.clear_caches()` before each), median of "
        f"{reps} interleaved otlab / ott-jax measurements; wall times. Target for "
        "`value_and_grad(sinkhorn_divergence)`: ratio <= 1.5.\n\n" + common.table(header, rows)
    )


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
