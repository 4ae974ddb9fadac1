"""Scale: throughput per pass (dense and online), ragged batch vs loop, sharded vs single.

* **Passes**: float32, d = 3, n = m = 4096 (quick: 1024), ε = 0.05 × mean cost. One
  pass reads every one of the ``n m`` entries once. Timed: a log-sum-exp pass of
  ``PointCloud(block_size=256).lse`` along each axis (online, the cost recomputed;
  also with a shift guess, and for an unfactored ``FunctionCost``), the same on a precomputed cost matrix (dense), a product with the materialised
  plan (the kernel engine's pass), and whole Sinkhorn iterations (2 passes each,
  fixed iteration count) for otlab kernel / dense, otlab log / online (block 256, and
  ``block_size="auto"``: 2048 rows here) and ott-jax's log-domain Sinkhorn on a dense
  geometry. Reported in G entries/s and as fractions
  of the ceilings of docs/PERFORMANCE (a C log-sum-exp with the cost recomputed,
  6.4 G/s; memory bandwidth, 8.3 G/s).
* **Ragged**: 32 problems with n, m drawn in [50, 500] (quick: 8 in [20, 100]), 2-D
  Gaussian clouds, default ε, ``otlab.sinkhorn`` to tol 1e-4: one `otlab.solve_ragged`
  call (``batch_size=1``, a ``lax.map``: the CPU default; ``batch_size=None``, one
  ``vmap``) against a Python loop of per-problem solves; warm (every shape compiled
  first) and cold (compilation included, in that order) times.
* **vmap vs loop**: 32 equal-shape problems (2-D Gaussian clouds, the targets scaled by
  U(0.5, 2) and shifted, float32, default ε, tol 1e-4), ``jax.vmap`` of `otlab.sinkhorn`
  and of `otlab.sns` against a Python loop of the jitted solver and an explicit
  ``jax.lax.map``, at n = m = 100 and 1000 (quick: 100 only); warm. On CPU the vmapped
  solvers run their iterations one problem at a time (`otlab.implicit`).
* **Sharded**: the online Sinkhorn iteration on one device against
  `otlab.sharding.shard` over 2 host devices (a child process with
  ``--xla_force_host_platform_device_count=2``: the machine's 2 cores).

Usage::

    python -m benchmarks.run --only scale [--quick]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import otlab
from benchmarks import common

C_CEILING = 6.4  # G entries/s, hand-written C log-sum-exp with the cost recomputed (d = 3)
BANDWIDTH = 8.3  # G entries/s, float32 pass at the memory bandwidth
BLOCK = 256


def _passes(n: int, iters: int) -> tuple[list, str]:
    d = 3
    x = jax.random.normal(jax.random.key(0), (n, d))
    y = jax.random.normal(jax.random.key(1), (n, d)) + 0.5
    c = otlab.PointCloud(x, y).cost_matrix
    eps = 0.05 * jnp.mean(c)
    f, g = jnp.zeros(n), jnp.zeros(n)
    p = otlab.Geometry(c).plan(f, g, eps)
    v = jnp.ones(n)

    generic = otlab.costs.FunctionCost(lambda u, w: jnp.sum((u - w) ** 2))  # no factored form

    def lse(kind, axis):
        def fn(x, y, c, f, g):
            if kind == "dense":
                geom = otlab.Geometry(c)
            else:
                cost = generic if kind == "generic" else None
                geom = otlab.PointCloud(x, y, cost, block_size=BLOCK)
            return geom.lse(f, g, eps, axis)

        return jax.jit(fn)

    # the guess is computed outside the timed pass: time the shifted pass alone
    def shifted_lse(axis):
        guess = otlab.Geometry(c).lse(f, g, eps, axis) + 0.5

        def fn(x, y, f, g, s):
            return otlab.PointCloud(x, y, block_size=BLOCK).lse(f, g, eps, axis, shift=s)

        return jax.jit(fn), guess

    def solve(kind, mode, block=BLOCK):
        def fn(x, y, c):
            geom = otlab.PointCloud(x, y, block_size=block) if kind == "online" else otlab.Geometry(c)
            return otlab.sinkhorn(
                geom, epsilon=eps, tol=1e-30, max_iter=iters, check_every=iters, mode=mode
            ).f

        return jax.jit(fn)

    ott = common.ott_sinkhorn(tol=1e-30, max_iter=iters, check_every=iters, fixed=True)
    from ott.geometry import geometry as ott_geometry
    from ott.problems.linear import linear_problem

    ott_solve = jax.jit(lambda c: ott(linear_problem.LinearProblem(ott_geometry.Geometry(c, epsilon=eps))).f)
    args = (x, y, c, f, g)
    (shifted_1, guess_1), (shifted_0, guess_0) = shifted_lse(1), shifted_lse(0)
    fns = {
        "online lse pass, axis 1 (rows)": common.compiled(lse("online", 1), *args),
        "online lse pass, axis 0 (columns)": common.compiled(lse("online", 0), *args),
        "online lse pass with a shift guess, axis 1": common.compiled(shifted_1, x, y, f, g, guess_1),
        "online lse pass with a shift guess, axis 0": common.compiled(shifted_0, x, y, f, g, guess_0),
        "online lse pass, unfactored cost (FunctionCost), axis 1": common.compiled(
            lse("generic", 1), *args
        ),
        "dense lse pass (cost precomputed), axis 1": common.compiled(lse("dense", 1), *args),
        "kernel pass P v (plan materialised)": common.compiled(jax.jit(lambda p, v: p @ v), p, v),
        "kernel pass u P": common.compiled(jax.jit(lambda p, u: u @ p), p, v),
    }
    per_pass = {k: 1 for k in fns}
    solves = {
        "otlab.sinkhorn kernel, dense (per pass)": common.compiled(solve("dense", "kernel"), x, y, c),
        "otlab.sinkhorn log, online (per pass)": common.compiled(solve("online", "log"), x, y, c),
        "otlab.sinkhorn log, online, block_size='auto' (per pass)": common.compiled(
            solve("online", "log", "auto"), x, y, c
        ),
        "ott-jax Sinkhorn lse, dense (per pass)": common.compiled(ott_solve, c),
    }
    fns.update(solves)
    per_pass.update({k: 2 * iters for k in solves})
    times, _ = common.time_interleaved(fns, reps=3)
    rows, rates = [], {}
    for name, t in times.items():
        rate = per_pass[name] * n * n / t / 1e9
        rates[name] = rate
        rows.append([name, common.fmt(1e3 * t / per_pass[name]), common.fmt(rate),
                     f"{rate / C_CEILING:.0%}", f"{rate / BANDWIDTH:.0%}"])  # fmt: skip
    text = common.table(
        ["operation", "ms / pass", "G entries/s", "of C lse ceiling", "of bandwidth"], rows
    )
    ott_rate = rates["ott-jax Sinkhorn lse, dense (per pass)"]
    dense_rate = rates["otlab.sinkhorn kernel, dense (per pass)"]
    auto = rates["otlab.sinkhorn log, online, block_size='auto' (per pass)"]
    fixed = rates["otlab.sinkhorn log, online (per pass)"]
    text += (
        f"\n\nOnline Sinkhorn pass with `block_size=\"auto\"` "
        f"({otlab.geometry.auto_block_size(n, n)} rows): **{auto:.2f} G entries/s, "
        f"{auto / C_CEILING:.0%} of the C ceiling, {auto / ott_rate:.2f}x** ott-jax's dense "
        f"pass and **{auto / dense_rate:.2f}x** otlab's dense (kernel) pass; with block "
        f"{BLOCK}: {fixed / ott_rate:.2f}x ott-jax dense, {fixed / dense_rate:.2f}x otlab dense. "
        f"n = m = {n}, d = 3, float32, {iters} iterations per timed solve, median of 3.\n"
    )
    return rows, text


def _ragged(count: int, lo: int, hi: int) -> str:
    rng = np.random.default_rng(0)
    ns, ms = rng.integers(lo, hi + 1, count), rng.integers(lo, hi + 1, count)
    xs = [jnp.asarray(rng.normal(size=(n, 2)), jnp.float32) for n in ns]
    ys = [jnp.asarray(rng.normal(size=(m, 2)) * 0.7 + 1.0, jnp.float32) for m in ms]

    def batched(batch_size, buckets):
        def run():
            res = otlab.solve_ragged(xs, ys, batch_size=batch_size, buckets=buckets)
            return [sol.f for sol in res.solutions], res.status, res.n_iter

        return run

    def loop():
        return [otlab.sinkhorn(otlab.PointCloud(x, y)) for x, y in zip(xs, ys, strict=True)]

    fns = {
        "bucketed": batched("auto", "auto"), "mapped": batched(1, 1), "vmapped": batched(None, 1), "loop": loop,
    }  # fmt: skip
    # one-time costs (imports, small helper programs) on other shapes, before the cold runs
    for batch_size in (1, None):
        otlab.solve_ragged(xs[:2], [y[:7] for y in ys[:2]], batch_size=batch_size).reg_cost.block_until_ready()
    otlab.sinkhorn(otlab.PointCloud(xs[0][:5], ys[0][:6])).f.block_until_ready()
    cold = {}
    for name, fn in fns.items():  # first calls: compilation included
        t0 = time.perf_counter()
        out = common.block(fn())
        cold[name] = time.perf_counter() - t0
    out_l = out
    times, _ = common.time_interleaved(fns, reps=3)
    err, same_status = 0.0, True
    for batch_size, buckets in ((1, 1), (None, 1), ("auto", "auto")):
        res = otlab.solve_ragged(xs, ys, batch_size=batch_size, buckets=buckets)
        err = max(err, *(float(jnp.max(jnp.abs(res[k].f - s.f))) for k, s in enumerate(out_l)))
        same_status &= all(int(res.status[k]) == int(s.status) for k, s in enumerate(out_l))
    n_buckets = len(res.solutions)
    bucket_pad = sum(
        len(sol.f) * sol.f.shape[1] * sol.g.shape[1] for sol in res.solutions
    ) / float(np.sum(ns * ms))

    def row(label, name):
        return [label, common.fmt(times[name]), common.fmt(cold[name]),
                f"{times['loop'] / times[name]:.2f}x", f"{cold['loop'] / cold[name]:.2f}x"]  # fmt: skip

    rows = [
        row(f"`otlab.solve_ragged`, `buckets=\"auto\"` ({n_buckets} size buckets; lax.map)", "bucketed"),
        row("`otlab.solve_ragged` defaults (`buckets=1`, `batch_size=1` here: one padded shape, lax.map)", "mapped"),
        row("`otlab.solve_ragged`, `buckets=1, batch_size=None` (one padded shape, one vmap)", "vmapped"),
        row("Python loop of `otlab.sinkhorn`", "loop"),
    ]
    pad = count * max(ns) * max(ms) / float(np.sum(ns * ms))
    return (
        common.table(["method", "warm s", "cold s (with compilation)", "speed-up warm", "speed-up cold"], rows)
        + f"\n\n{count} problems, n, m in [{lo}, {hi}], float32, default ε, tol 1e-4; padding "
        f"to the largest problem makes {pad:.1f}x the entries of the real problems, the "
        f"{n_buckets} buckets {bucket_pad:.2f}x. Iterations per problem: "
        f"{int(jnp.min(res.n_iter))}–{int(jnp.max(res.n_iter))}; max |f_batched - f_alone| = {err:.1e}; statuses equal: "
        f"{same_status}.\n"
    )


_CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp
import otlab
from benchmarks import common
n, iters = int(sys.argv[1]), int(sys.argv[2])
x = jax.random.normal(jax.random.key(0), (n, 3))
y = jax.random.normal(jax.random.key(1), (n, 3)) + 0.5
eps = 0.05 * otlab.PointCloud(x[:512], y[:512]).mean_cost()
mesh = otlab.sharding.default_mesh()
def solver(shard):
    def fn(x, y):
        geom = otlab.PointCloud(x, y, block_size=256)
        geom = otlab.sharding.shard(geom, mesh) if shard else geom
        return otlab.sinkhorn(geom, epsilon=eps, tol=1e-30, max_iter=iters, check_every=iters,
                              mode="log").f
    return jax.jit(fn)
rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("points"))
xs = jax.device_put(x, rows)
fns = {"single": common.compiled(solver(False), x, y),
       "sharded": common.compiled(solver(True), xs, y)}
times, outs = common.time_interleaved(fns, reps=3)
diff = float(jnp.max(jnp.abs(outs["single"] - outs["sharded"])))
print(json.dumps({"times": times, "diff": diff, "devices": len(jax.devices())}))
"""


def _sharded(n: int, iters: int) -> str:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(n), str(iters)], env=env, capture_output=True,
        text=True, timeout=1800,
    )  # fmt: skip
    if proc.returncode != 0:
        return f"sharded run failed: `{proc.stderr.strip().splitlines()[-1]}`\n"
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    t = r["times"]
    rows = [
        [f"one device ({n} x {n}, online, block 256)", common.fmt(1e3 * t["single"] / iters)],
        [f"`otlab.sharding.shard` over {r['devices']} host devices", common.fmt(1e3 * t["sharded"] / iters)],
    ]
    return (
        common.table(["online Sinkhorn, float32", "ms / iteration"], rows)
        + f"\n\nSharded / single: **{t['single'] / t['sharded']:.2f}x** the speed "
        f"(max |f difference| {r['diff']:.1e}). {iters} iterations per timed solve.\n"
    )


def _vmap_vs_loop(sizes, batch: int = 32) -> str:
    def solver_fn(solver):
        def solve(x, y):
            sol = solver(otlab.PointCloud(x, y))
            return sol.status, sol.n_iter  # the loop's iterations must be the vmap's

        return solve

    def divergence(x, y):
        div, status = otlab.sinkhorn_divergence(x, y, with_status=True)
        return status, div  # the loop's values must be the vmap's

    rows = []
    for name, solve in (("otlab.sinkhorn", solver_fn(otlab.sinkhorn)),
                        ("otlab.sns", solver_fn(otlab.sns)),
                        ("otlab.sinkhorn_divergence", divergence)):  # fmt: skip
        for n in sizes:
            rng = np.random.default_rng(0)
            xs = jnp.asarray(rng.normal(size=(batch, n, 2)), jnp.float32)
            scale = rng.uniform(0.5, 2.0, size=(batch, 1, 1))
            ys = jnp.asarray(rng.normal(size=(batch, n, 2)) * scale + 1.0, jnp.float32)
            vmapped = common.compiled(jax.jit(jax.vmap(solve)), xs, ys)
            mapped = common.compiled(
                jax.jit(lambda xs, ys, solve=solve: jax.lax.map(lambda z: solve(*z), (xs, ys))),
                xs, ys,
            )  # fmt: skip
            one = jax.jit(solve).lower(xs[0], ys[0]).compile()

            def loop(one=one, xs=xs, ys=ys):
                return [common.block(one(xs[i], ys[i])) for i in range(batch)]

            t, out = common.time_interleaved(
                {"vmap": lambda f=vmapped: common.block(f()),
                 "map": lambda f=mapped: common.block(f()), "loop": loop},
                reps=3,
            )  # fmt: skip
            same = all(
                np.allclose(out["vmap"][1][i], out["loop"][i][1], rtol=1e-5, atol=0)
                for i in range(batch)
            )
            rows.append(
                [name, n, common.fmt(t["vmap"] * 1e3), common.fmt(t["map"] * 1e3),
                 common.fmt(t["loop"] * 1e3), f"{t['loop'] / t['vmap']:.2f}x",
                 int(jnp.sum(out["vmap"][0] == otlab.Status.SUCCESS)), same]
            )  # fmt: skip
            print("scale:", rows[-1], file=sys.stderr, flush=True)
    return common.table(
        ["solver", "n = m", "vmap ms", "lax.map ms", "loop ms", "loop / vmap",
         f"SUCCESS of {batch}", "iterations (divergence: values) equal to the loop's"],
        rows,
    ) + "\n"


def run(quick: bool = False) -> str:
    n, iters = (1024, 20) if quick else (4096, 20)
    count, lo, hi = (8, 20, 100) if quick else (32, 50, 500)
    _, passes = _passes(n, iters)
    return (
        "### Throughput per pass\n\n" + passes
        + "\n### Ragged batch vs loop\n\n" + _ragged(count, lo, hi)
        + "\n### vmap vs loop (equal shapes)\n\n" + _vmap_vs_loop((100,) if quick else (100, 1000))
        + "\n### Sharded vs single device\n\n" + _sharded(n, iters)
    )  # fmt: skip


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
