"""Diagnostics behind two initializer decisions (docs/initializers.md).

1. **How good can a Gaussian start be?** Oracle starts on the initializer benchmark's
   Gaussian rows. The target "at least 2x fewer iterations with the Gaussian init"
   holds on those rows except d = 16, eps = 0.01 x mean cost (53 -> 34). Does any
   start built from the two *distributions* (rather than from the two samples) do
   better there? otlab's Sinkhorn (exact iteration counts, tol 1e-3, float32,
   n = 1000) runs from:

   * ``zeros``: the default;
   * ``gaussian``: `otlab.initializers.gaussian` (the entropic closed form between
     the Gaussian fits of the samples);
   * ``gaussian, eps x k``: the same closed form at a larger or smaller epsilon;
   * ``population Gaussian``: the closed form between the true distributions (the
     rows' clouds are exact Gaussian samples);
   * ``independent sample (N, draws)``: the converged potential of another sample of
     N points from the same distributions, extended to this sample by the soft
     c-transform and averaged over draws (an estimate of the population potential);
   * ``blend t``: ``g* + t (g_gaussian - g*)``, with ``g*`` the converged potential of
     this very sample: how close to the answer a start must be for a given saving.

2. **1-D: gaussian or sorting?** `auto` takes `gaussian` at ``eps >= SORT_BELOW``
   times the mean cost in 1-D. Iterations from zeros, `gaussian` and `sorting` on
   eight pairs of 1-D clouds at eps = 0.1 and 0.05 x mean cost, with ``delta``, the
   mean gap between the clouds' standardised quantiles (0 when the monotone map is
   affine).

3. **Unbalanced starts.** The solver shifts a given start of an unbalanced problem by
   the constant that maximises the half-step dual and keeps it only if it beats zeros
   there (`otlab.solvers.sinkhorn._unbalanced_start`). Iterations on the demo's clouds
   from zeros, from `gaussian` without that step (``before``: the solver's internal
   ``_forward(translate=False)``) and with it (``after``), and from the solution at
   1.1 eps (a warm start), before and after.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import otlab
import otlab.initializers as inits
from benchmarks.bench_initializers import clouds

TOL = 1e-3
N = 1000


def _population(d: int):
    """The distributions of `clouds("gauss", d, n)` (seed 0): means and covariances."""
    k = jax.random.split(jax.random.key(0), 4)
    a = jax.random.normal(k[2], (d, d)) / np.sqrt(d) + 0.5 * jnp.eye(d)
    b = jax.random.normal(k[3], (d, d)) / np.sqrt(d) + 0.5 * jnp.eye(d)
    return (jnp.zeros(d), a.T @ a, a), (jnp.ones(d), b.T @ b, b)


def _extend(x, ys, g_sub, w, eps):
    """Soft c-transform of a potential on ``ys`` to the points ``x`` (centred)."""
    c = jnp.sum((x[:, None] - ys[None]) ** 2, -1)
    f = eps * jnp.log(w) - eps * jax.nn.logsumexp((g_sub[None] - c) / eps, axis=1)
    return f - jnp.mean(f)


def _rows(d: int, rel: float) -> list[tuple[str, int]]:
    x, y = clouds("gauss", d, N)
    geom = otlab.PointCloud(x, y)
    w = jnp.full(N, 1.0 / N)
    eps = rel * float(geom.mean_cost())

    def count(init) -> int:
        sol = otlab.sinkhorn(geom, epsilon=eps, tol=TOL, max_iter=50_000, check_every=1, init=init)
        return int(sol.n_iter)

    def with_c_transform(f):
        return f, inits.c_transform(geom, f, w, eps)

    out = [("zeros", count(None)), ("gaussian", count(inits.gaussian))]
    for k in (0.5, 2.0, 5.0):
        out.append((f"gaussian, eps x {k:g}", count(inits.gaussian(geom, w, w, k * eps))))
    (ma, sa, fa), (mb, sb, fb) = _population(d)
    u, v = inits._quadratic_potentials(x, y, ma, sa, mb, sb, eps)
    out.append(("population Gaussian", count(inits._from_uv(u, v, w, w, eps))))
    for n_ind in (1000, 4000):
        fs = []
        for s in range(4):
            kk = jax.random.split(jax.random.key(100 + s), 2)
            xs = jax.random.normal(kk[0], (n_ind, d)) @ fa + ma
            ys = jax.random.normal(kk[1], (n_ind, d)) @ fb + mb
            sub = otlab.sinkhorn(otlab.PointCloud(xs, ys), epsilon=eps, tol=1e-4, max_iter=50_000)
            fs.append(_extend(x, ys, sub.g, w, eps))
        out.append((f"independent sample ({n_ind}, 1 draw)", count(with_c_transform(fs[0]))))
        f_mean = jnp.mean(jnp.stack(fs), 0)
        out.append((f"independent sample ({n_ind}, 4 draws)", count(with_c_transform(f_mean))))
    star = otlab.sinkhorn(geom, epsilon=eps, tol=1e-6, max_iter=50_000)
    g_star = star.g - jnp.mean(star.g)
    g_gauss = inits.gaussian(geom, w, w, eps)[1]
    g_gauss = g_gauss - jnp.mean(g_gauss)
    zero_f = jnp.zeros(N, geom.dtype)
    for t in (0.25, 0.5, 0.75):
        out.append((f"blend t = {t:g}", count((zero_f, g_star + t * (g_gauss - g_star)))))
    rms = float(jnp.sqrt(jnp.mean((g_gauss - g_star) ** 2)))
    spread = float(jnp.std(g_star))
    out.append(
        (f"(rms(g_gaussian - g*) = {rms / eps:.2f} eps; std(g*) = {spread / eps:.1f} eps)", -1)
    )
    return out


def _one_d_clouds(n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    blobs3 = np.array([-2.0, 0.5, 2.5])[rng.integers(0, 3, n)] + 0.3 * rng.normal(size=n)
    return {
        "Gaussian -> Gaussian": (rng.normal(size=n), 0.7 * rng.normal(size=n) + 1),
        "uniform -> uniform": (rng.uniform(-1.5, 1.5, n), rng.uniform(0, 2, n)),
        "uniform -> Gaussian": (rng.uniform(-1.5, 1.5, n), rng.normal(size=n)),
        "Gaussian -> Laplace": (rng.normal(size=n), rng.laplace(size=n)),
        "Gaussian -> exponential": (rng.normal(size=n), rng.exponential(size=n)),
        "uniform -> 3 blobs": (rng.uniform(-1.5, 1.5, n), blobs3),
        "Gaussian -> 2 blobs": (
            rng.normal(size=n),
            np.array([-1.0, 1.0])[rng.integers(0, 2, n)] + 0.3 * rng.normal(size=n),
        ),
        "Gaussian -> log-normal": (rng.normal(size=n), rng.lognormal(0, 0.5, n)),
    }


def one_d(n: int = N, rels=(0.1, 0.05)) -> str:
    """Part 2: zeros / gaussian / sorting iteration counts on 1-D cloud pairs."""

    def standardised(v):
        return np.sort((v - v.mean()) / v.std())

    head = "| clouds | delta | " + " | ".join(
        f"eps = {r:g} x mean C: zeros / gaussian / sorting" for r in rels
    )
    lines = [head + " |", "|:---|---:|" + "---:|" * len(rels)]
    for name, (x, y) in _one_d_clouds(n).items():
        delta = float(np.mean(np.abs(standardised(x) - standardised(y))))
        geom = otlab.PointCloud(
            jnp.asarray(x[:, None], jnp.float32), jnp.asarray(y[:, None], jnp.float32)
        )
        cells = []
        for rel in rels:
            eps = rel * float(geom.mean_cost())
            counts = [
                int(
                    otlab.sinkhorn(
                        geom, epsilon=eps, tol=TOL, max_iter=50_000, check_every=1, init=init
                    ).n_iter
                )
                for init in (None, inits.gaussian, inits.sorting)
            ]
            cells.append(" / ".join(map(str, counts)))
        lines.append(f"| {name} | {delta:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unbalanced(n: int = N, rels=(0.01, 0.05), taus=(0.99, 0.95, 0.9)) -> str:
    """Part 3: unbalanced starts, before / after the solver's translation and check."""
    from otlab import _dual
    from otlab.cli import demo_problems
    from otlab.solvers import sinkhorn as sinkhorn_lib

    def count(geom, w, eps, tau, start, translate):
        problem = _dual.Problem(geom, w, w, jnp.asarray(eps), jnp.asarray(tau), jnp.asarray(tau))
        forward = jax.jit(
            lambda problem, f0, g0: sinkhorn_lib._forward(
                problem, (f0, g0, None), mode="kernel", tol=TOL, max_iter=50_000,
                check_every=1, epsilon_decay=0.9, unroll=False, translate=translate,
            )[2][1]
        )  # fmt: skip
        return int(forward(problem, *start))

    lines = [
        "| clouds | eps / mean C | tau | zeros | gaussian before -> after "
        "| warm start (1.1 eps) before -> after |",
        "|:---|---:|---:|---:|---:|---:|",
    ]
    for p in demo_problems(n):
        geom = otlab.PointCloud(jnp.asarray(p.x), jnp.asarray(p.y))
        w = jnp.full(n, 1.0 / n, jnp.float32)
        zeros = (jnp.zeros(n), jnp.zeros(n))
        for rel in rels:
            eps = rel * float(geom.mean_cost())
            gauss = inits.gaussian(geom, w, w, eps)
            for tau in taus:
                near = otlab.sinkhorn(geom, w, w, epsilon=1.1 * eps, tau_a=tau, tau_b=tau, tol=1e-5)
                warm = (near.f, near.g)
                z = count(geom, w, eps, tau, zeros, False)
                g = [count(geom, w, eps, tau, gauss, t) for t in (False, True)]
                h = [count(geom, w, eps, tau, warm, t) for t in (False, True)]
                lines.append(
                    f"| {p.key} | {rel:g} | {tau:g} | {z} | {g[0]} -> {g[1]} | {h[0]} -> {h[1]} |"
                )
    return "\n".join(lines)


def run(quick: bool = False) -> str:
    cases = [(16, 1e-2), (2, 1e-2)] if not quick else [(16, 1e-2)]
    lines = [
        "Oracle starts on the initializer benchmark's Gaussian rows (n = 1000, float32, "
        f"tol {TOL:g}, exact iteration counts). See the module docstring for each start.",
        "",
    ]
    for d, rel in cases:
        rows = _rows(d, rel)
        zeros = rows[0][1]
        lines += [f"**gauss, d = {d}, eps = {rel:g} x mean cost**", "", "| start | iterations | / zeros |",
                  "|:---|---:|---:|"]  # fmt: skip
        for name, it in rows:
            if it < 0:
                lines.append(f"| {name} | | |")
            else:
                lines.append(f"| {name} | {it} | {it / zeros:.2f} |")
        lines.append("")
    lines += ["**1-D: gaussian or sorting** (exact iteration counts, tol 1e-3)", "",
              one_d(300 if quick else N), "",
              f"**Unbalanced starts** (exact iteration counts, tol {TOL:g}, kernel mode)", "",
              unbalanced(300 if quick else N)]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    t0 = time.time()
    print(run(quick="--quick" in sys.argv))
    print(f"\n(took {time.time() - t0:.0f} s)")
