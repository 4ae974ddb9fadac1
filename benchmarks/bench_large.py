"""Large n: n = m = 1e5 (quick: 1e4), d = 3, float32, online (`block_size="auto"`: 512 rows at 1e5),
epsilon = 1e-2 x the mean cost, tol 1e-3, from a multiscale start
(`otlab.initializers.Multiscale`): wall time (compilation included, and the solve
alone), fine-level iterations and passes over the ``n m`` entries, peak memory of the
process. Also ott-jax's online mode (``PointCloud(batch_size=...)``), which raises on
jax 0.10 (the error is reported).

Usage::

    python -m benchmarks.run --only large [--quick]
"""

from __future__ import annotations

import resource
import sys
import time

import jax
import jax.numpy as jnp

import otlab
from otlab.initializers import Multiscale

BLOCK = "auto"  # otlab.geometry.auto_block_size: 512 rows at n = 1e5 (200 MB of logits)


def _clouds(n: int):
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, 3))
    y = jax.random.normal(ky, (n, 3)) @ jnp.array([[1.5, 0.2, 0.0], [0.0, 0.7, 0.3], [0.0, 0.0, 1.0]])
    return x, y + jnp.array([1.0, -0.5, 0.25])


def _mean_cost(x, y):
    # E|x - y|^2 of independent draws, exact from the moments (no n x m pass)
    return jnp.sum(jnp.var(x, 0) + jnp.var(y, 0) + (jnp.mean(x, 0) - jnp.mean(y, 0)) ** 2)


def _ott_online(x, y, eps) -> str:
    try:
        from ott.geometry import pointcloud
        from ott.problems.linear import linear_problem
        from ott.solvers.linear import sinkhorn

        geom = pointcloud.PointCloud(x[:2048], y[:2048], epsilon=eps, batch_size=256)
        out = sinkhorn.Sinkhorn(max_iterations=10)(linear_problem.LinearProblem(geom))
        jax.block_until_ready(out.f)
        return "ran (10 iterations at n = 2048)"
    except Exception as err:  # report what ott-jax does on this jax
        return f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"


def run(quick: bool = False) -> str:
    n = 10_000 if quick else 100_000
    sizes = (256, 1024) if quick else (256, 2048)
    x, y = _clouds(n)
    eps = float(1e-2 * _mean_cost(x, y))
    init = Multiscale(sizes=sizes)

    @jax.jit
    def solve(x, y):
        geom = otlab.PointCloud(x, y, block_size=BLOCK)
        sol = otlab.sinkhorn(geom, epsilon=eps, tol=1e-3, max_iter=2000, init=init)
        return sol.f, sol.g, sol.status, sol.n_iter, sol.marginal_error

    t0 = time.perf_counter()
    compiled = solve.lower(x, y).compile()
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    f, g, status, n_iter, err = jax.block_until_ready(compiled(x, y))
    t_solve = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    it = int(n_iter)
    # passes over the n x m entries: 2 per iteration, 2 for the start's extension
    # (+ one pass per check and the final log-domain check: a few more)
    passes = 2 * it + 2
    rate = passes * n * n / t_solve / 1e9
    rows = [
        f"| n = m | {n} |",
        f"| epsilon (1e-2 x mean cost) | {eps:.4g} |",
        f"| multiscale levels (clusters) | {sizes} |",
        f"| status | {otlab.Status.name(int(status))} (marginal error {float(err):.2e}, tol 1e-3) |",
        f"| fine-level iterations | {it} (about {passes} passes over the n m entries) |",
        f"| solve time (compiled) | {t_solve:.1f} s ({rate:.2f} G entries/s over those passes) |",
        f"| compile time | {t_compile:.1f} s |",
        f"| peak memory of the process | {peak_mb:.0f} MB |",
        f"| ott-jax online (`batch_size`) | {_ott_online(x, y, eps)} |",
    ]
    return "| | |\n| :--- | :--- |\n" + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
