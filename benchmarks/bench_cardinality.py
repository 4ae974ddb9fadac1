"""Cardinality-constrained OT: otlab (optax L-BFGS, and the semismooth Newton of
``method="newton"``; jitted) vs POT's
``smooth_ot_dual(reg_type="sparsity_constrained")`` (SciPy L-BFGS-B on NumPy), same
problem (float64, uniform weights, squared-Euclidean costs of 2-D Gaussian clouds,
``gamma = 0.1 * mean(C)``), warm timings, medians; and ``vmap`` over a batch of
problems vs a Python loop of jitted calls.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common


def _problem(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    y = rng.normal(size=(n, 2)) + 1.0
    c = ((x[:, None] - y[None]) ** 2).sum(-1)
    a = np.full(n, 1.0 / n)
    return c, a


def run(quick: bool = False) -> str:
    import ot.smooth

    import otlab

    jax.config.update("jax_enable_x64", True)
    sizes = (200,) if quick else (200, 1000)
    ks = (2, 5)
    methods = ("lbfgs", "newton")
    solvers = {
        (k, mth): jax.jit(
            lambda c, a, k=k, mth=mth: otlab.cardinality_constrained(
                c, a, a, k=k, gamma=0.1 * c.mean(), method=mth
            )
        )
        for k in (2, 5)
        for mth in methods
    }
    rows = []
    for n in sizes:
        c, a = _problem(n)
        gamma = 0.1 * c.mean()
        for k in ks:
            cj, aj = jnp.asarray(c), jnp.asarray(a)
            fns = {mth: common.compiled(solvers[k, mth], cj, aj) for mth in methods}
            times, outs = common.time_interleaved(
                {
                    **{mth: lambda fn=fn: common.block(fn()) for mth, fn in fns.items()},
                    "pot": lambda c=c, a=a, k=k, gamma=gamma: ot.smooth.smooth_ot_dual(
                        a, a, c, reg=gamma, reg_type="sparsity_constrained", max_nz=k, log=True
                    ),
                },
                reps=1 if n >= 1000 else 15,
            )
            _, log = outs["pot"]
            reg = ot.smooth.SparsityConstrained(max_nz=k, gamma=gamma)
            ref = ot.smooth.dual_obj_grad(log["alpha"], log["beta"], a, a, c, reg)[0]
            for mth in methods:
                sol = outs[mth]
                rows.append(
                    [n, k, mth, common.fmt(times[mth] * 1e3), common.fmt(times["pot"] * 1e3),
                     f"{times['pot'] / times[mth]:.1f}x",
                     f"{(float(sol.dual_value) - ref) / abs(ref):+.1e}",
                     f"{float(sol.marginal_error):.1e}", otlab.Status.name(sol.status),
                     int(sol.n_iter)]
                )
                print("cardinality:", rows[-1], file=sys.stderr, flush=True)
    out = [
        __doc__.strip(),
        "",
        common.table(
            ["n = m", "k", "method", "otlab ms", "POT ms", "speed-up",
             "dual rel. diff (otlab - POT)", "otlab marg. err", "status", "iterations"],
            rows,
        ),
    ]
    # vmap over a batch vs a loop, per method
    batch, n, k = (16 if quick else 64), 100, 5
    cs = np.stack([_problem(n, s)[0] for s in range(batch)])
    a = jnp.full((n,), 1.0 / n)
    cs_j = jnp.asarray(cs)
    for mth in methods:
        vsolve = jax.jit(jax.vmap(
            lambda c, mth=mth: otlab.cardinality_constrained(
                c, a, a, k=k, gamma=0.1 * c.mean(), method=mth
            )
        ))
        vfn = common.compiled(vsolve, cs_j)
        exe = solvers[k, mth].lower(cs_j[0], a).compile()  # compiled once, called per problem

        def loop(exe=exe):
            return [common.block(exe(cs_j[i], a)) for i in range(batch)]

        times, outs = common.time_interleaved(
            {"vmap": lambda vfn=vfn: common.block(vfn()), "loop": loop}, reps=3
        )
        ok = int(jnp.sum(outs["vmap"].status == otlab.Status.SUCCESS))
        out += [
            "",
            f"`vmap` over {batch} problems (n = m = {n}, k = {k}, method={mth}) vs a Python "
            f"loop of the jitted solver: vmap {times['vmap'] * 1e3:.0f} ms, loop "
            f"{times['loop'] * 1e3:.0f} ms ({times['loop'] / times['vmap']:.2f}x); "
            f"{ok}/{batch} SUCCESS.",
        ]
        print("cardinality:", out[-1], file=sys.stderr, flush=True)
    out += ["", *_assignments(quick)]
    out += [
        "",
        f"_Measured {time.strftime('%Y-%m-%d')}._",
    ]
    return "\n".join(out)


def _optimal_assignment(c, cap):
    """The cheapest assignment of the rows of ``c`` (lines x others), point ``j`` taking
    ``cap[j]`` rows: SciPy's Hungarian method on the columns repeated."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(np.repeat(c, cap, axis=1))
    return c[rows, np.repeat(np.arange(c.shape[1]), cap)[cols]].sum()


def _assignments(quick: bool) -> list[str]:
    """k = 1 with whole units (an assignment problem): otlab against SciPy's optimal
    assignment and POT, and how many problems reach SUCCESS."""
    import ot.smooth

    import otlab

    solve = jax.jit(
        lambda c, a, b: otlab.cardinality_constrained(c, a, b, k=1, gamma=0.1 * c.mean())
    )
    rows = []
    for n in (200,) if quick else (200, 1000):
        c, a = _problem(n)
        gamma = 0.1 * c.mean()
        opt = _optimal_assignment(c.T, np.ones(n, int)) / n + 0.5 * gamma / n
        cj, aj = jnp.asarray(c), jnp.asarray(a)
        fn = common.compiled(solve, cj, aj, aj)
        times, outs = common.time_interleaved(
            {
                "otlab": lambda fn=fn: common.block(fn()),
                "pot": lambda c=c, a=a, gamma=gamma: ot.smooth.smooth_ot_dual(
                    a, a, c, reg=gamma, reg_type="sparsity_constrained", max_nz=1, log=True
                ),
            },
            reps=1 if n >= 1000 else 15,
        )
        plan, log = outs["pot"]
        reg = ot.smooth.SparsityConstrained(max_nz=1, gamma=gamma)
        ref = ot.smooth.dual_obj_grad(log["alpha"], log["beta"], a, a, c, reg)[0]
        sol = outs["otlab"]
        pot_err = np.abs(plan.sum(1) - a).sum() + np.abs(plan.sum(0) - a).sum()
        rows.append([
            n, common.fmt(times["otlab"] * 1e3), common.fmt(times["pot"] * 1e3),
            f"{times['pot'] / times['otlab']:.1f}x",
            f"{(float(sol.dual_value) - opt) / opt:+.1e}", f"{(ref - opt) / opt:+.1e}",
            f"{(float(sol.reg_cost) - opt) / opt:+.1e}",
            f"{float(sol.marginal_error):.1e}", f"{pot_err:.1e}",
            otlab.Status.name(sol.status),
        ])
        print("cardinality:", rows[-1], file=sys.stderr, flush=True)
    out = [
        "**k = 1, uniform weights (an assignment problem).** The optimum is SciPy's",
        "`linear_sum_assignment`; otlab's plan is the auction's assignment.",
        "",
        common.table(
            ["n = m", "otlab ms", "POT ms", "speed-up", "otlab dual - opt (rel.)",
             "POT dual - opt (rel.)", "otlab plan - opt (rel.)", "otlab marg. err",
             "POT marg. err", "status"],
            rows,
        ),
    ]
    # statuses over many problems: square uniform, and capacity-limited routing
    sizes = (50, 100) if quick else (50, 100, 200, 500)
    ok = total = 0
    worst = 0.0
    for n in sizes:
        for seed in range(6):
            c, a = _problem(n, seed)
            sol = solve(jnp.asarray(c), jnp.asarray(a), jnp.asarray(a))
            opt = _optimal_assignment(c.T, np.ones(n, int)) / n + 0.5 * 0.1 * c.mean() / n
            ok += int(sol.status) == otlab.Status.SUCCESS
            total += 1
            worst = max(worst, abs(float(sol.dual_value) - opt) / opt,
                        abs(float(sol.reg_cost) - opt) / opt)
    route = jax.jit(
        lambda c, cap: otlab.cardinality_constrained(
            c, jnp.ones(c.shape[0]), jnp.full(c.shape[1], cap), k=1, axis=1, gamma=1.0
        )
    )
    r_ok = r_total = 0
    r_worst = 0.0
    for tokens, experts in ((40, 8), (60, 6)):
        cap = tokens // experts
        for seed in range(20):
            c = np.random.default_rng(seed).normal(size=(tokens, experts))
            sol = route(jnp.asarray(c), float(cap))
            opt = _optimal_assignment(c, np.full(experts, cap)) + 0.5 * tokens
            r_ok += int(sol.status) == otlab.Status.SUCCESS
            r_total += 1
            r_worst = max(r_worst, abs(float(sol.dual_value) - opt) / abs(opt),
                          abs(float(sol.reg_cost) - opt) / abs(opt))
    out += [
        "",
        f"Square uniform problems (n = m in {', '.join(map(str, sizes))}, six seeds each): "
        f"{ok}/{total} SUCCESS, dual value and plan cost within {worst:.1e} (relative) of the "
        f"optimal assignment. Routing (costs N(0, 1), 40 tokens to 8 experts of capacity 5 and "
        f"60 to 6 of capacity 10, at most one expert per token, `gamma = 1`, 20 seeds each): "
        f"{r_ok}/{r_total} SUCCESS, within {r_worst:.1e}.",
    ]
    print("cardinality:", out[-1], file=sys.stderr, flush=True)
    return out


SWEEP_SHAPES = ((20, 20), (20, 50), (50, 20), (45, 60), (60, 45), (100, 100), (80, 120),
                (120, 80), (200, 300), (300, 200))


def _sweep_problem(n, m, uniform, seed):
    """The support sweep's problem: 2-D Gaussian clouds, squared-Euclidean costs, weights
    uniform or drawn from U(0.5, 1.5)."""
    rng = np.random.default_rng(1000 * seed + n + 7 * m)
    x, y = rng.normal(size=(n, 2)), rng.normal(size=(m, 2)) + 0.5
    a = np.ones(n) if uniform else rng.uniform(0.5, 1.5, n)
    b = np.ones(m) if uniform else rng.uniform(0.5, 1.5, m)
    return ((x[:, None] - y[None]) ** 2).sum(-1), a / a.sum(), b / b.sum()


def _milp_feasible(a, b, k, seconds):
    """Whether some plan with at most ``k`` nonzeros per column meets the marginals
    exactly: a mixed-integer feasibility problem for SciPy's HiGHS (entries continuous,
    one binary per entry). True, False, or None where HiGHS decides nothing in time."""
    import scipy.sparse as sp
    from scipy.optimize import Bounds, LinearConstraint, milp

    n, m = len(a), len(b)
    size = n * m  # entries (row-major), then their binaries
    rows, cols = sp.kron(sp.identity(n), np.ones((1, m))), sp.kron(np.ones((1, n)), sp.identity(m))
    none_n, none_m = sp.csr_matrix((n, size)), sp.csr_matrix((m, size))
    matrix = sp.vstack([
        sp.hstack([rows, none_n]), sp.hstack([cols, none_m]),  # marginals
        sp.hstack([none_m, cols]),  # at most k entries per column
        sp.hstack([sp.identity(size), -sp.diags(np.tile(b, n))]),  # an entry needs its binary
    ])
    lo = np.r_[a, b, np.zeros(m), np.full(size, -np.inf)]
    hi = np.r_[a, b, np.full(m, k), np.zeros(size)]
    res = milp(np.zeros(2 * size), constraints=LinearConstraint(matrix, lo, hi),
               integrality=np.r_[np.zeros(size), np.ones(size)],
               bounds=Bounds(0, np.r_[np.full(size, np.inf), np.ones(size)]),
               options=dict(time_limit=seconds))
    return {0: True, 2: False}.get(res.status)


def sweep(milp_seconds: float = 0.0, shapes=SWEEP_SHAPES, seeds=(0, 1)) -> str:
    """The support sweep of docs/cardinality.md ("Support search"): every shape, k in
    {1, 2, 3, 5, m}, uniform and generic weights, two seeds (float64, default method,
    ``gamma = 0.1 * mean(C)``). Prints one line per problem; returns the summary table.
    With ``milp_seconds``, each problem where a plan can exist by the counting bound
    (``k m >= n + m - g``) and none was found is checked by `_milp_feasible`."""
    import otlab

    jax.config.update("jax_enable_x64", True)
    table, misses = {}, []
    for n, m in shapes:
        for k in (1, 2, 3, 5, m):
            for uniform in (True, False):
                for seed in seeds:
                    c, a, b = _sweep_problem(n, m, uniform, seed)
                    sol = otlab.cardinality_constrained(jnp.asarray(c), a, b, k=min(k, n),
                                                        gamma=0.1 * c.mean())
                    plan = np.asarray(sol.plan())
                    err = np.abs(plan.sum(1) - a).sum() + np.abs(plan.sum(0) - b).sum()
                    possible = k * m >= n + m - (np.gcd(n, m) if uniform else 1)
                    ok = int(sol.status) == otlab.Status.SUCCESS
                    assert not ok or (err <= 1e-6 and (plan > 0).sum(0).max() <= k)
                    gap = float(sol.duality_gap) / abs(float(sol.dual_value))
                    row = table.setdefault(("uniform" if uniform else "generic",
                                            "m" if k == m else str(k)), [0, 0, 0, 0.0, 0.0])
                    row[0] += 1
                    row[1] += int(possible)
                    row[2] += int(ok)
                    if ok:
                        row[3], row[4] = max(row[3], err), max(row[4], gap)
                    line = (f"{n} x {m}, k = {k}, {'uniform' if uniform else 'generic'}, seed "
                            f"{seed}: {otlab.Status.name(sol.status)}, marginal error "
                            f"{err:.1e}, gap {gap:.1e}")
                    if possible and not ok:
                        feasible = _milp_feasible(a, b, min(k, n), milp_seconds) if milp_seconds else None
                        misses.append((n, m, k, uniform, seed, feasible))
                        line += f", MILP: {feasible}" if milp_seconds else ""
                    print(line, file=sys.stderr, flush=True)
            jax.clear_caches()  # (dozens of large programs in one process exhaust LLVM's maps)
    out = ["| weights | k | problems | a plan can exist | `SUCCESS` | max marg. error | "
           "largest duality gap (rel.) |", "| :--- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (weights, k), (total, possible, ok, err, gap) in sorted(table.items()):
        out.append(f"| {weights} | {k} | {total} | {possible} | {ok} | {err:.0e} | {gap:.1e} |")
    out += ["", f"Possible but not found: {len(misses)}"]
    if milp_seconds:
        counts = {v: sum(f is v for *_, f in misses) for v in (True, False, None)}
        out[-1] += (f"; a MILP (HiGHS, {milp_seconds:.0f} s each) finds a feasible support for "
                    f"{counts[True]}, proves none for {counts[False]}, decides nothing for "
                    f"{counts[None]}")
    return "\n".join(out)


if __name__ == "__main__":
    if "--sweep" in sys.argv:  # --sweep [MILP_SECONDS]: the support sweep (tens of minutes)
        rest = sys.argv[sys.argv.index("--sweep") + 1:]
        print(common.machine() + "\n\n" + sweep(float(rest[0]) if rest else 0.0))
    else:
        print(run(quick=True))
