"""Command line: ``python -m otlab {demo,solve,bench}``.

``demo``
    builds small synthetic 2-D problems (no downloads), solves each with every
    otlab solver and ott-jax's Sinkhorn as a reference, prints a results table and
    writes figures (plan, matching, transported points, error history) to ``--out``.
``solve``
    solves one random problem and prints its diagnostics.
``bench``
    runs the benchmarks of the source checkout (``python -m benchmarks.run``).

Example:
    ``python -m otlab demo --out out --n 1000``
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from collections.abc import Callable

import numpy as np

__all__ = ["main"]

# ------------------------------------------------------------------------ problems


@dataclasses.dataclass(frozen=True)
class DemoProblem:
    """A 2-D problem: points (ordered so that the plan image shows structure) and taus."""

    key: str
    title: str
    x: np.ndarray
    y: np.ndarray
    tau_a: float = 1.0
    tau_b: float = 1.0


def _blobs(rng: np.random.Generator, n: int) -> np.ndarray:
    centers = np.array([[-1.5, 1.6], [-2.2, -0.6], [-0.6, -1.8]])
    k = np.arange(n) * len(centers) // n  # contiguous blocks: blob 0, 1, 2
    return centers[k] + 0.35 * rng.standard_normal((n, 2))


def _moons(rng: np.random.Generator, n: int) -> np.ndarray:
    n1 = n // 2
    t1 = np.sort(rng.uniform(0.0, np.pi, n1))
    t2 = np.sort(rng.uniform(0.0, np.pi, n - n1))
    upper = np.stack([np.cos(t1), np.sin(t1)], 1)
    lower = np.stack([1.0 - np.cos(t2), 0.5 - np.sin(t2)], 1)
    pts = np.concatenate([upper, lower]) * 1.3 + np.array([2.0, -0.3])
    return pts + 0.06 * rng.standard_normal((n, 2))


def _gaussian_by_angle(rng: np.random.Generator, n: int) -> np.ndarray:
    x = 0.5 * rng.standard_normal((n, 2))
    return x[np.argsort(np.arctan2(x[:, 1], x[:, 0]))]


def _ring(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.sort(rng.uniform(-np.pi, np.pi, n))
    r = 2.0 + 0.1 * rng.standard_normal(n)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def demo_problems(n: int, seed: int = 0) -> list[DemoProblem]:
    """The demo's problems: all ``n x n``, float32."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    blobs, moons = _blobs(rng, n), _moons(rng, n)
    # Unbalanced: 10% of the target mass is a far-away cluster that a relaxed
    # marginal may leave (partly) untransported.
    k = max(n // 10, 1)
    outliers = np.array([4.5, 3.5]) + 0.25 * rng.standard_normal((k, 2))
    moons_out = np.concatenate([_moons(rng, n - k), outliers])
    return [
        DemoProblem("blobs_moons", "3 blobs → 2 moons", blobs.astype(f32), moons.astype(f32)),
        DemoProblem(
            "gauss_ring",
            "Gaussian → ring",
            _gaussian_by_angle(rng, n).astype(f32),
            _ring(rng, n).astype(f32),
        ),
        DemoProblem(
            "unbalanced",
            "3 blobs → moons + outliers (τ = 0.95)",
            blobs.astype(f32),
            moons_out.astype(f32),
            tau_a=0.95,
            tau_b=0.95,
        ),
    ]


# ------------------------------------------------------------------------- solvers


@dataclasses.dataclass
class Row:
    """One line of the demo table."""

    problem: str
    solver: str
    epsilon: float
    reg_cost: float
    n_iter: int
    wall_ms: float
    marginal_error: float
    status: str
    errors: np.ndarray
    every: int
    solution: object = None  # an otlab OTSolution (None for the reference rows)


#: The SNS row: its ``iters`` are Newton steps (after its Sinkhorn warm-up, not counted).
SNS_LABEL = "otlab sns (Newton steps)"
#: The ProgOT row (balanced problems): ``iters`` sums its steps; its ``reg cost`` column
#: shows ``<C(x, y), P>`` of its coupling (a different quantity: see the footnote).
PROGOT_LABEL = "otlab progot (K = 4) †"
PROGOT_STEPS = 4


def _otlab_solvers(tol: float, max_iter: int, check_every: int, block_size: int) -> dict:
    """Jitted otlab solvers ``(x, y, eps, tau_a, tau_b) -> OTSolution`` (all traced)."""
    import jax

    import otlab

    def make(mode: str, online: bool = False, anneal: bool = False, init=None) -> Callable:
        @jax.jit
        def solve(x, y, eps, tau_a, tau_b):
            geom = otlab.PointCloud(x, y, block_size=block_size if online else None)
            return otlab.sinkhorn(
                geom, epsilon=eps, tau_a=tau_a, tau_b=tau_b, tol=tol, max_iter=max_iter,
                check_every=check_every, mode=mode, init=init,
                epsilon_init=20.0 * eps if anneal else None, epsilon_decay=0.7,
            )  # fmt: skip

        return solve

    @jax.jit
    def sns(x, y, eps, tau_a, tau_b):
        return otlab.sns(
            otlab.PointCloud(x, y), epsilon=eps, tau_a=tau_a, tau_b=tau_b, tol=tol
        )

    return {
        "otlab kernel": make("kernel"),
        "otlab log": make("log"),
        f"otlab online (block {block_size})": make("log", online=True),
        "otlab annealed ε (kernel)": make("kernel", anneal=True),
        "otlab kernel, init=auto": make("kernel", init=otlab.initializers.auto),
        SNS_LABEL: sns,
    }


def _ott_solver(tol: float, max_iter: int, check_every: int, tau_a: float, tau_b: float):
    """ott-jax's (log-domain) Sinkhorn, jitted; taus are static for ott-jax."""
    import jax
    from ott.geometry import pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn

    solver = sinkhorn.Sinkhorn(threshold=tol, max_iterations=max_iter, inner_iterations=check_every)

    @jax.jit
    def solve(x, y, eps):
        geom = pointcloud.PointCloud(x, y, epsilon=eps)
        out = solver(linear_problem.LinearProblem(geom, tau_a=tau_a, tau_b=tau_b))
        return out.f, out.g, out.n_iters, out.errors, out.converged, out.reg_ot_cost

    return solve


_COMPILED: dict = {}


def _timed(fn: Callable, *args):
    """``(warm wall time in ms, output)`` of one call of ``fn`` compiled ahead of time.

    Compiling with ``lower(...).compile()`` (cached per function and argument
    shapes) makes the first call warm, so each solve runs once.
    """
    import jax

    key = (fn, tuple((a.shape, a.dtype) for a in args))
    if key not in _COMPILED:
        _COMPILED[key] = fn.lower(*args).compile()
    compiled = _COMPILED[key]
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return 1e3 * (time.perf_counter() - t0), out


def _balanced_error(x, y, f, g, eps) -> float:
    """``|P1 - a|_1 + |P^T 1 - b|_1`` at given potentials (uniform weights): otlab's
    marginal error, evaluated the same way for ott-jax's potentials."""
    import jax.numpy as jnp

    import otlab

    geom = otlab.PointCloud(x, y)
    row = jnp.exp(geom.lse(f, g, eps, axis=1))
    col = jnp.exp(geom.lse(f, g, eps, axis=0))
    return float(jnp.sum(jnp.abs(row - 1.0 / len(x))) + jnp.sum(jnp.abs(col - 1.0 / len(y))))


def _progot_solver(tol: float, max_iter: int):
    """Jitted ``otlab.progot`` ``(x, y, eps) -> ProgOTSolution``: ``K`` linear steps, epsilon
    geometric from otlab's default (``0.05 * mean C``) down to the demo's ``eps``."""
    import jax
    import jax.numpy as jnp

    import otlab

    @jax.jit
    def solve(x, y, eps):
        start = jnp.maximum(0.05 * otlab.PointCloud(x, y).mean_cost(), eps)
        t = jnp.linspace(0.0, 1.0, PROGOT_STEPS, dtype=x.dtype)
        eps_k = start ** (1.0 - t) * eps**t
        return otlab.progot(x, y, num_steps=PROGOT_STEPS, epsilons=eps_k, tol=tol,
                            max_iter=max_iter)

    return solve


def _progot_row(p: DemoProblem, x, y, eps, opts: dict) -> Row:
    import otlab

    ms, sol = _timed(_progot_solver(opts["tol"], opts["max_iter"]), x, y, eps)
    last = sol.last
    return Row(p.key, PROGOT_LABEL, float(eps), float(sol.cost), int(sol.n_iter.sum()), ms,
               float(last.marginal_error), otlab.Status.name(sol.status),
               np.asarray(last.errors), opts["check_every"])  # fmt: skip


def _solve_problem(p: DemoProblem, eps_rel: float, opts: dict, solvers: dict, use_ott: bool):
    import jax.numpy as jnp

    import otlab

    x, y = jnp.asarray(p.x), jnp.asarray(p.y)
    eps = jnp.asarray(eps_rel * float(otlab.PointCloud(x, y).mean_cost()), x.dtype)
    tau_a, tau_b = jnp.asarray(p.tau_a, x.dtype), jnp.asarray(p.tau_b, x.dtype)
    rows = []
    for name, fn in solvers.items():
        ms, sol = _timed(fn, x, y, eps, tau_a, tau_b)
        rows.append(
            Row(p.key, name, float(eps), float(sol.reg_cost), int(sol.n_iter), ms,
                float(sol.marginal_error), otlab.Status.name(sol.status),
                np.asarray(sol.errors), 1 if name == SNS_LABEL else opts["check_every"], sol)
        )  # fmt: skip
    if p.tau_a == p.tau_b == 1.0:  # ProgOT is balanced
        rows.append(_progot_row(p, x, y, eps, opts))
    if use_ott:
        fn = _ott_solver(opts["tol"], opts["max_iter"], opts["check_every"], p.tau_a, p.tau_b)
        ms, (f, g, n_iter, errors, converged, cost) = _timed(fn, x, y, eps)
        if p.tau_a == p.tau_b == 1.0:
            err = _balanced_error(x, y, f, g, eps)
        else:  # a different problem (see the footnote): ott-jax's own last residual
            errors_np = np.asarray(errors)
            err = float(errors_np[errors_np != -1][-1])
        finite = bool(jnp.all(jnp.isfinite(f)) & jnp.all(jnp.isfinite(g)))
        status = "SUCCESS" if bool(converged) else ("MAX_ITER" if finite else "NONFINITE")
        label = "ott-jax Sinkhorn (ref)" + ("" if p.tau_a == p.tau_b == 1.0 else " *")
        rows.append(
            Row(p.key, label, float(eps), float(cost), int(n_iter), ms, err,
                status, np.asarray(errors), opts["check_every"])
        )  # fmt: skip
    return rows


def _format_table(rows: list[Row]) -> str:
    header = [
        "problem",
        "solver",
        "epsilon",
        "reg cost",
        "iters",
        "warm ms",
        "marg. error",
        "status",
    ]
    body = [
        [r.problem, r.solver, f"{r.epsilon:.4g}", f"{r.reg_cost:.6f}", str(r.n_iter),
         f"{r.wall_ms:.1f}", f"{r.marginal_error:.2e}", r.status]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    left = {0, 1, 7}

    def line(cells):
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def _figures(p: DemoProblem, rows: list[Row], out: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from otlab import plot

    main = next(r for r in rows if r.solution is not None)  # the kernel-mode solution
    sol = main.solution
    paths = []

    def save(fig, name):
        path = out / f"{p.key}_{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    plot.plot_plan(sol, ax=ax, log=True)
    ax.set_title(f"{p.title}: plan ({main.solver})", fontsize="medium")
    save(fig, "plan")

    fig, ax = plt.subplots(figsize=(6, 5))
    plot.plot_matching(p.x, p.y, sol.plan(), ax=ax, top=400)
    ax.set_title(f"{p.title}: 400 largest plan entries", fontsize="medium")
    save(fig, "matching")

    fig, ax = plt.subplots(figsize=(6, 5))
    plot.plot_transport(p.x, p.y, np.asarray(sol.transport(p.x)), ax=ax)
    ax.set_title(f"{p.title}: entropic map T(x)", fontsize="medium")
    save(fig, "transport")

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r.solver in (SNS_LABEL, PROGOT_LABEL):  # Newton steps / K problems: other axes
            continue
        plot.plot_errors(r.errors, ax=ax, label=r.solver, every=r.every)
    ax.set_title(f"{p.title}: marginal error, ε = {main.epsilon:.3g}", fontsize="medium")
    save(fig, "errors")
    return paths


def _w2_entropic(a, b) -> float:
    """``sqrt(<C, P>)`` of a sharp entropic plan (ε = 0.005 × mean cost): W2 up to ε."""
    import jax.numpy as jnp

    import otlab

    geom = otlab.PointCloud(jnp.asarray(a), jnp.asarray(b))
    sol = otlab.sinkhorn(geom, epsilon=0.005 * geom.mean_cost(), tol=1e-4, max_iter=5000)
    return float(jnp.sqrt(sol.cost))


def metric_demo(out: pathlib.Path | None, seed: int = 0, epochs: int = 40) -> dict[str, float]:
    """Learn a metric from 3 snapshots of a rotating arc (times 0, 2, 4), predict the
    held-out snapshot at time 1 by geodesic interpolation, compare with McCann's; print
    a two-row table and (``out`` given) draw the metric, geodesics and predictions."""
    import jax
    import jax.numpy as jnp

    from otlab import geodesic, metric
    from otlab.metric import synthetic

    t0 = time.perf_counter()
    snaps, times = synthetic.rotating_arc(num_times=5, n=60, speed=np.pi / 6, seed=seed)
    res = metric.fit(snaps[::2], times[::2], seed=seed, epochs=epochs, hidden=(16,), progress=False)
    eye = metric.Constant(jnp.eye(2))
    pred = {
        "learned metric (geodesic)": geodesic.interpolate(res.metric, snaps[0], snaps[2], 0.5),
        "Euclidean (McCann)": geodesic.interpolate(eye, snaps[0], snaps[2], 0.5),
    }
    w2 = {k: _w2_entropic(v, snaps[1]) for k, v in pred.items()}
    print("\nmetric learning: rotating arc, snapshots at t = 0, 2, 4 (60 points each); "
          "t = 1 held out and predicted")  # fmt: skip
    for k, v in w2.items():
        print(f"  {k:28s} W2 to the held-out snapshot = {v:.4f}")
    if out is not None:
        import matplotlib

        if "matplotlib.pyplot" not in sys.modules:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from otlab import plot

        fig, ax = plt.subplots(figsize=(6, 5.5))
        for i, s in enumerate(snaps):
            ax.scatter(*np.asarray(s).T, s=6, color=f"C{i}", alpha=0.35 if i % 2 else 0.8,
                       label=f"t = {i:g}" + (" (held out)" if i % 2 else ""))  # fmt: skip
        grid = np.concatenate([np.asarray(s)[::6] for s in snaps[::2]])
        plot.plot_metric(res.metric, grid, ax=ax, size=0.18, color="k", linewidths=0.6)
        paths = jax.jit(jax.vmap(lambda g, a, b: geodesic.shortest_path(g, a, b, 16),
                                 in_axes=(None, 0, 0)))(res.metric, snaps[0][:6], snaps[2][:6])  # fmt: skip
        for path in np.asarray(paths):
            ax.plot(*path.T, color="k", lw=0.8)
        ax.scatter(*np.asarray(pred["learned metric (geodesic)"]).T, s=10, marker="x",
                   color="C1", label="predicted t = 1 (learned)")  # fmt: skip
        ax.legend(fontsize="x-small", loc="lower left")
        ax.set_title("learned metric (unit balls), geodesics, prediction", fontsize="medium")
        fig.tight_layout()
        fig.savefig(out / "metric_learning.png", dpi=110)
        plt.close(fig)
        print(f"  wrote {out / 'metric_learning.png'}")
    print(f"  ({time.perf_counter() - t0:.1f} s)")
    return w2


def demo(
    out: str = "out",
    n: int = 1000,
    eps_rel: float = 1e-2,
    tol: float = 1e-4,
    seed: int = 0,
    plots: bool = True,
    use_ott: bool = True,
    quick: bool = False,
) -> list[Row]:
    """Run the demo; print the table; write figures to ``out``. Returns the table rows.

    ``quick``: fewer training steps in the routing and metric-learning lines (for tests)."""
    t0 = time.perf_counter()
    opts = dict(tol=tol, max_iter=5000, check_every=10)
    solvers = _otlab_solvers(**opts, block_size=256)
    problems = demo_problems(n, seed)
    print(
        f"otlab demo: {len(problems)} problems, n = m = {n}, d = 2, float32, "
        f"epsilon = {eps_rel:g} x mean cost, tol = {tol:g} (L1 marginal error); "
        "warm ms = one call of the solver compiled ahead of time (jit .lower().compile()).",
        flush=True,
    )
    rows, paths = [], []
    outdir = pathlib.Path(out)
    if plots:
        outdir.mkdir(parents=True, exist_ok=True)
    for p in problems:
        prow = _solve_problem(p, eps_rel, opts, solvers, use_ott)
        rows += prow
        if plots:
            paths += _figures(p, prow, outdir)
    print()
    print(_format_table(rows))
    print(
        "\nmarg. error: L1 optimality residual (|P1 - a| + |P^T1 - b| when balanced), recomputed\n"
        "by otlab for the balanced ott-jax rows; reg cost: ott-jax's own reg_ot_cost for its rows.\n"
        "* ott-jax 0.6.0's unbalanced Sinkhorn regularises with -eps H(P) (its plan satisfies\n"
        "  P1 = a exp(-f / rho)), otlab (like POT) with eps KL(P | a b^T): for tau < 1 these are\n"
        "  different problems, so that row shows ott-jax's own residual and objective.\n"
        f"† ProgOT ({PROGOT_STEPS} linear steps, epsilon from 0.05 x mean cost down to epsilon): "
        "iters sums its steps,\n  marg. error is its last step's, and reg cost shows <C(x, y), P> "
        "of its coupling (not regularised)."
    )
    if plots:
        print(f"\nwrote {len(paths)} figures to {outdir}/: " + ", ".join(q.name for q in paths))
    print(routing_line(8 if quick else 20))
    print(assignment_line(60 if quick else 200))
    print(scale_line(8 * n))
    print(ragged_line(*((5, 20, 60) if quick else (12, 40, 400))))
    metric_demo(outdir if plots else None, seed, epochs=10 if quick else 40)
    print(f"demo took {time.perf_counter() - t0:.1f} s")
    return rows


def scale_line(n: int) -> str:
    """One line: an online solve (fused factored passes) from zeros vs from a
    multiscale start (`otlab.initializers.Multiscale`), n = m = ``n``, d = 3, float32,
    epsilon = 1e-2 x mean cost, tol 1e-3; warm (compiled) times."""
    import jax

    import otlab
    from otlab.initializers import Multiscale

    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (n, 3))
    y = 0.7 * jax.random.normal(ky, (n, 3)) + 1.0
    eps = 1e-2 * float(otlab.PointCloud(x[:512], y[:512]).mean_cost())
    sizes = (min(64, n), min(512, n))
    out = {}
    for name, init in (("zeros", None), ("multiscale", Multiscale(sizes=sizes))):

        def solve(x, y, init=init):
            geom = otlab.PointCloud(x, y, block_size=256)
            s = otlab.sinkhorn(geom, epsilon=eps, tol=1e-3, max_iter=5000, init=init)
            return s.status, s.n_iter

        fn = jax.jit(solve).lower(x, y).compile()
        t0 = time.perf_counter()
        status, it = jax.block_until_ready(fn(x, y))
        out[name] = (otlab.Status.name(int(status)), int(it), time.perf_counter() - t0)
    (s0, i0, t0_), (s1, i1, t1) = out["zeros"], out["multiscale"]
    return (
        f"\nlarge online solve (n = m = {n}, d = 3, fused factored passes, eps = 1e-2 x mean "
        f"cost, tol 1e-3): from zeros {s0} in {i0} iterations, {t0_:.2f} s; from "
        f"Multiscale{sizes} {s1} in {i1} iterations, {t1:.2f} s"
    )


def ragged_line(count: int, lo: int, hi: int) -> str:
    """One line: ``count`` problems with n, m uniform in ``[lo, hi]`` solved by one
    `otlab.solve_ragged` (size buckets) vs a loop of `otlab.sinkhorn` (one compilation
    per shape); warm times (both compiled), the batch's cold time, the largest
    difference of the potentials."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import otlab

    rng = np.random.default_rng(0)
    ns, ms = rng.integers(lo, hi + 1, count), rng.integers(lo, hi + 1, count)
    xs = [jnp.asarray(rng.normal(size=(k, 2)), jnp.float32) for k in ns]
    ys = [jnp.asarray(rng.normal(size=(k, 2)) * 0.7 + 1.0, jnp.float32) for k in ms]

    def batched():
        return otlab.solve_ragged(xs, ys)

    def loop():
        return [otlab.sinkhorn(otlab.PointCloud(x, y)) for x, y in zip(xs, ys, strict=True)]

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        jax.block_until_ready(jax.tree.leaves(out))
        return out, time.perf_counter() - t0

    res, cold = timed(batched)
    alone, _ = timed(loop)
    warm_b = min(timed(batched)[1] for _ in range(3))
    warm_l = min(timed(loop)[1] for _ in range(3))
    diff = max(float(jnp.max(jnp.abs(res[k].f - s.f))) for k, s in enumerate(alone))
    same = all(int(res.status[k]) == int(s.status) for k, s in enumerate(alone))
    return (
        f"\nragged batch ({count} problems, n, m in [{lo}, {hi}], default eps): one solve_ragged "
        f"call in {len(res.solutions)} size buckets, warm {1e3 * warm_b:.0f} ms (cold "
        f"{cold:.1f} s) vs a loop of sinkhorn {1e3 * warm_l:.0f} ms warm; max |f - f alone| "
        f"{diff:.1e}, statuses equal: {same}"
    )


def assignment_line(n: int) -> str:
    """One line: cardinality-constrained OT at ``k = 1`` with uniform weights, an
    assignment problem (n = m = ``n``, float32): status, the plan's cost against SciPy's
    optimal assignment, and warm time."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    import otlab

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, 2)), rng.normal(size=(n, 2)) + 1.0
    c = ((x[:, None] - y[None]) ** 2).sum(-1)
    solve = jax.jit(lambda c: otlab.cardinality_constrained(c, k=1, gamma=0.1 * c.mean()))
    fn = solve.lower(jnp.asarray(c, jnp.float32)).compile()
    t0 = time.perf_counter()
    sol = jax.block_until_ready(fn(jnp.asarray(c, jnp.float32)))
    ms = 1e3 * (time.perf_counter() - t0)
    rows, cols = linear_sum_assignment(c)
    best = c[rows, cols].sum() / n
    plan = np.asarray(sol.plan())
    perm = bool(((plan > 0).sum(0) == 1).all() and ((plan > 0).sum(1) == 1).all())
    return (
        f"\nassignment (k = 1, n = m = {n}, uniform weights, float32): "
        f"{otlab.Status.name(int(sol.status))}, a permutation: {perm}, transport cost "
        f"{float(sol.cost):.5f} vs SciPy's optimal assignment {best:.5f}, {ms:.0f} ms warm"
    )


def routing_line(steps: int = 20) -> str:
    """One line: MoE expert load with OT capacity routing vs top-1 softmax routing
    (`otlab.nn.train_routing_demo`, no auxiliary loss)."""
    from otlab.nn import train_routing_demo

    ot = train_routing_demo("ot", steps=steps)
    top = train_routing_demo("topk", steps=steps)

    def loads(r):
        return "/".join(f"{v:.2f}" for v in r["load"])

    return (
        f"\nMoE routing ({steps} steps, 64 tokens, 4 experts, no auxiliary loss): expert load "
        f"OT capacity-20 {loads(ot)} (max {ot['max_tokens']} tokens/expert, loss "
        f"{ot['losses'][0]:.0f} -> {ot['losses'][-1]:.1f}) vs top-1 softmax {loads(top)} "
        f"(max {top['max_tokens']}, loss {top['losses'][0]:.0f} -> {top['losses'][-1]:.1f})"
    )


# --------------------------------------------------------------------------- solve


def solve(
    n: int = 1000,
    m: int | None = None,
    d: int = 2,
    eps: float | None = None,
    tol: float = 1e-4,
    max_iter: int = 2000,
    mode: str = "auto",
    block_size: int | None = None,
    tau: float = 1.0,
    seed: int = 0,
) -> None:
    """Solve ``x ~ N(0, I_d)`` to ``y ~ N(1, I_d)`` and print the solution's diagnostics."""
    import jax

    import otlab

    m = n if m is None else m
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, d))
    y = jax.random.normal(ky, (m, d)) + 1.0
    geom = otlab.PointCloud(x, y, block_size=block_size)
    solver = jax.jit(
        lambda geom, eps: otlab.sinkhorn(
            geom, epsilon=eps, tau_a=tau, tau_b=tau, tol=tol, max_iter=max_iter, mode=mode
        )
    )
    t0 = time.perf_counter()
    sol = jax.block_until_ready(solver(geom, eps))
    t1 = time.perf_counter()
    sol = jax.block_until_ready(solver(geom, eps))
    t2 = time.perf_counter()
    print(f"problem     : n={n} m={m} d={d}, N(0, I) -> N(1, I), tau={tau:g}, {x.dtype}")
    print(
        f"epsilon     : {float(sol.epsilon):.6g}"
        + (" (default 0.05 x mean cost)" if eps is None else "")
    )
    print(f"status      : {otlab.Status.name(sol.status)} after {int(sol.n_iter)} iterations")
    print(f"marg. error : {float(sol.marginal_error):.3e} (tol {tol:g})")
    print(f"reg cost    : {float(sol.reg_cost):.6f}")
    print(f"cost <C,P>  : {float(sol.cost):.6f}")
    print(
        f"time        : {1e3 * (t1 - t0):.1f} ms first call (compile), {1e3 * (t2 - t1):.1f} ms warm"
    )


# ---------------------------------------------------------------------------- main


def _bench(argv: list[str]) -> int:
    try:
        from benchmarks import run as bench_run
    except ImportError:
        print(
            "error: the `benchmarks` package is not importable; it lives in the otlab source "
            "checkout: run `python -m otlab bench` from the repository root.",
            file=sys.stderr,
        )
        return 2
    return bench_run.main(argv)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m otlab``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m otlab", description="otlab command line.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="solve built-in 2-D problems with every solver; write figures")
    p.add_argument("--out", default="out", help="folder for PNG figures (default: out)")
    p.add_argument(
        "--n", type=_positive_int, default=1000, help="points per measure (default: 1000)"
    )
    p.add_argument("--eps", type=float, default=1e-2, help="epsilon / mean cost (default: 0.01)")
    p.add_argument("--tol", type=float, default=1e-4, help="L1 marginal-error tolerance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true", help="print the table only")
    p.add_argument("--no-ott", action="store_true", help="skip the ott-jax reference rows")

    p = sub.add_parser("solve", help="solve one random problem N(0, I) -> N(1, I)")
    p.add_argument("--n", type=_positive_int, default=1000, help="source points (default: 1000)")
    p.add_argument("--m", type=_positive_int, default=None, help="target points (default: n)")
    p.add_argument("--d", type=_positive_int, default=2, help="dimension (default: 2)")
    p.add_argument("--eps", type=float, default=None, help="epsilon (default: 0.05 x mean cost)")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--max-iter", type=_positive_int, default=2000)
    p.add_argument("--mode", choices=("auto", "kernel", "log"), default="auto")
    p.add_argument("--block-size", type=_positive_int, default=None, help="online mode block size")
    p.add_argument("--tau", type=float, default=1.0, help="tau_a = tau_b (1: balanced)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("bench", help="run the benchmarks (python -m benchmarks.run)")
    p.add_argument("--quick", action="store_true", help="small sizes")
    p.add_argument("--only", action="append", metavar="NAME", help="run only this benchmark")

    args = parser.parse_args(argv)
    if args.command == "demo":
        for name, v in (("--eps", args.eps), ("--tol", args.tol)):
            if not v > 0:
                parser.error(f"{name} must be positive; got {v}")
        demo(args.out, args.n, args.eps, args.tol, args.seed, not args.no_plots, not args.no_ott)
        return 0
    if args.command == "solve":
        # The solver runs under jit, where bad values become status codes: check them here.
        if args.eps is not None and not args.eps > 0:
            parser.error(f"--eps must be positive; got {args.eps}")
        if not 0.0 < args.tau <= 1.0:
            parser.error(f"--tau must be in (0, 1]; got {args.tau}")
        try:
            solve(args.n, args.m, args.d, args.eps, args.tol, args.max_iter, args.mode,
                  args.block_size, args.tau, args.seed)  # fmt: skip
        except ValueError as e:
            parser.error(str(e))
        return 0
    bench_argv = (["--quick"] if args.quick else []) + [
        a for o in args.only or [] for a in ("--only", o)
    ]
    return _bench(bench_argv)
