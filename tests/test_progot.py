"""ProgOT: the recursion (and the ott-jax 0.6.0 bug it must not have), a reference loop
on ott-jax's Sinkhorn, closed-form maps (Gaussian, gradient of a convex function), the
jittable epsilon selection, jit == eager, vmap == loop, gradients vs finite
differences, dense == online, SNS steps, bad inputs and run-time status.

Compilation dominates this file's run time: most tests share one jitted function or
one set of static options, and those that only check properties of the chain (not
Sinkhorn's own engines) run the steps with ``LOG`` (log-domain Sinkhorn, cheaper to
compile; the solution does not depend on the engine).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import otlab
from otlab import Status
from otlab.solvers import progot as progot_lib

K = 4
# float32: 1e-5, above the ~1e-6 rounding floor of an honestly re-evaluated marginal error
LOG = functools.partial(otlab.sinkhorn, mode="log", tol=1e-5, max_iter=5000)
LOG64 = functools.partial(otlab.sinkhorn, mode="log", tol=1e-11, max_iter=20000)


def _clouds(dtype, n=30, m=40, d=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = 0.6 * rng.normal(size=(m, d)) @ np.diag(np.linspace(0.5, 1.5, d)) + 1.5
    return jnp.asarray(x, dtype), jnp.asarray(y, dtype)


def _eps(x, y, scales=(1.0, 0.7, 0.4, 0.2)):
    e0 = 0.05 * float(np.mean(np.sum((np.asarray(x)[:, None] - np.asarray(y)[None]) ** 2, -1)))
    return jnp.asarray(e0 * np.asarray(scales), x.dtype)


def recursion_gap(xs, alphas, maps) -> float:
    """``max_k |x^(k+1) - (1 - alpha_k) x^(k) - alpha_k T_k(x^(k))|``: zero for ProgOT's
    recursion, large for a loop that displaces the original points (ott-jax 0.6.0)."""
    gaps = [
        np.max(np.abs(np.asarray(xs[k + 1]) - (1 - alphas[k]) * np.asarray(xs[k])
                      - alphas[k] * np.asarray(maps[k](xs[k]))))
        for k in range(len(alphas) - 1)
    ]  # fmt: skip
    return float(max(gaps))


# ------------------------------------------------------------------ the recursion


def test_recursion_default_path():
    """Defaults (kernel Sinkhorn, epsilons="auto", "lin"): the iterates follow the
    recursion from the current iterate, the map of the training points is the last
    iterate, the coupling has the marginals, and the schedule is Algorithm 4's."""
    x, y = _clouds(jnp.float32)
    sol = otlab.progot(x, y, num_steps=K)
    assert bool(sol.converged), Status.name(sol.status)
    np.testing.assert_array_equal(sol.xs[0], x)
    np.testing.assert_array_equal(sol.steps.geom.x, sol.xs[:-1])
    np.testing.assert_allclose(sol.alphas, [1 / 4, 1 / 3, 1 / 2, 1.0], rtol=1e-6)
    maps = [sol.step(k).transport for k in range(K)]
    assert recursion_gap(sol.xs, np.asarray(sol.alphas), maps) < 1e-5
    np.testing.assert_allclose(sol.transport(x), sol.xs[-1], atol=1e-5)
    plan = np.asarray(sol.plan())
    np.testing.assert_allclose(plan.sum(1), 1 / 30, atol=1e-4)
    np.testing.assert_allclose(plan.sum(0), 1 / 40, atol=1e-4)
    # the cost prices the coupling on the original points
    c = np.sum((np.asarray(x)[:, None] - np.asarray(y)[None]) ** 2, -1)
    np.testing.assert_allclose(sol.cost, np.sum(c * plan), rtol=1e-4)
    # Algorithm 4: start = beta_0 0.05 mean C(x, y) (beta_0 = 2 when centered), end = best scale * 0.05 mean C(y_tr, y_tr),
    # interpolated by the travelled fraction t_k = k / K.
    train, held = progot_lib._holdout_split(40, 5)
    ytr = np.asarray(y)[train]
    eps_yy = 0.05 * np.mean(np.sum((ytr[:, None] - ytr[None]) ** 2, -1))
    best = progot_lib.EPSILON_SCALES[int(np.argmin(sol.selection_errors))]
    start, end = 2 * 0.05 * np.mean(c), best * eps_yy
    t = np.arange(K) / K
    np.testing.assert_allclose(sol.epsilons, (1 - t) * start + t * end, rtol=1e-5)
    # the selection errors are the held-out errors of the y -> y entropic maps: centered
    # (the default), of the Richardson extrapolation (2 T_eps - T_2eps) of the maps at a
    # scale and the next larger one (twice the largest for the largest: the grid is
    # geometric with ratio 2); plain (the paper's) with center=False
    plain = otlab.progot(x, y, num_steps=K, center=False)
    yev = np.asarray(y)[held]

    def self_map(s):
        one = otlab.sinkhorn(otlab.PointCloud(ytr, ytr), epsilon=s * eps_yy)
        return np.asarray(one.transport(yev))

    best_plain = progot_lib.EPSILON_SCALES[int(np.argmin(plain.selection_errors))]
    for s in sorted({best, best_plain, progot_lib.EPSILON_SCALES[0]}):
        i = progot_lib.EPSILON_SCALES.index(s)
        err = np.mean(np.sum((self_map(s) - yev) ** 2, -1))
        np.testing.assert_allclose(plain.selection_errors[i], err, rtol=1e-3)
        err = np.mean(np.sum((2 * self_map(s) - self_map(2 * s) - yev) ** 2, -1))
        np.testing.assert_allclose(sol.selection_errors[i], err, rtol=1e-3)
    # (uncentered: beta_0 = 1, the paper's)
    end_plain, start_plain = best_plain * eps_yy, 0.05 * np.mean(c)
    np.testing.assert_allclose(plain.epsilons, (1 - t) * start_plain + t * end_plain, rtol=1e-5)


def test_reference_loop_and_the_ott_bug(x64):
    """Against a ProgOT loop written on ott-jax's Sinkhorn with the correct recursion
    (same explicit schedules): same iterates and potentials, and the centered last
    step ``x^(K) = x^(K-1) + T_{K-1}(x^(K-1)) - U(x^(K-1))`` with ``U`` ott-jax's
    entropic self map of ``x^(K-1)``. ott-jax 0.6.0's own ``ProgOT`` displaces the
    original points: `recursion_gap` catches it."""
    from ott.geometry import pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn as ott_sinkhorn
    from ott.tools import progot as ott_progot

    x, y = _clouds(jnp.float64, m=30)  # n = m: the steps and the self problem share a compile
    eps = _eps(x, y)
    alphas = progot_lib.alpha_schedule("lin", K)
    sol = otlab.progot(x, y, num_steps=K, epsilons=eps, solver=LOG64)
    assert bool(sol.converged)

    solver = ott_sinkhorn.Sinkhorn(threshold=1e-11, max_iterations=20000)

    @jax.jit
    def ott_step(xk, yk, eps_k, alpha):
        out = solver(linear_problem.LinearProblem(pointcloud.PointCloud(xk, yk, epsilon=eps_k)))
        return out.g, (1 - alpha) * xk + alpha * out.to_dual_potentials().transport(xk)

    ref_xs = [x]
    for k in range(K):
        g, x_next = ott_step(ref_xs[-1], y, eps[k], alphas[k])  # alphas[-1] = 1: x_next = T(x)
        np.testing.assert_allclose(sol.steps.g[k] - sol.steps.g[k].mean(), g - g.mean(), atol=1e-7)
        ref_xs.append(x_next)
    np.testing.assert_allclose(sol.xs[:-1], np.stack(ref_xs[:-1]), atol=1e-7)
    xl = ref_xs[-2]  # the paper's (uncentered) last step:
    np.testing.assert_allclose(sol.last.transport(xl), x_next, atol=1e-7)
    ref_xs[-1] = x_next - ott_step(xl, xl, eps[-1], 1.0)[1] + xl  # U(xl): ott's self map
    np.testing.assert_allclose(sol.xs, np.stack(ref_xs), atol=1e-7)

    ours = [sol.step(k).transport for k in range(K)]
    assert recursion_gap(sol.xs, alphas, ours) < 1e-10
    ott_out = ott_progot.ProgOT(jnp.asarray(alphas), epsilons=eps)(
        linear_problem.LinearProblem(pointcloud.PointCloud(x, y)),
        threshold=1e-11, max_iterations=20000,
    )  # fmt: skip
    ott_xs = list(ott_out.outputs.geom.x) + [ott_out.transport(x)[0]]
    ott_maps = [
        functools.partial(ott_out.get_output(k).to_dual_potentials().transport, forward=True)
        for k in range(K)
    ]
    assert recursion_gap(ott_xs, alphas, ott_maps) > 1e-2  # the bug, caught


def test_centered_last_step_is_the_identity_on_the_target():
    """From ``x = y`` a single step (the last) moves nothing when centered: ``T_0`` and
    the self map ``U`` solve the same problem. The plain entropic map pulls points in."""
    _, y = _clouds(jnp.float32)
    eps = _eps(y, y)[:1]
    z = y[:5] + 0.05
    centered = otlab.progot(y, y, num_steps=1, epsilons=eps, solver=LOG)
    assert bool(centered.converged)
    # to the solvers' tolerance (1e-5 on the marginals; the two solves start differently)
    np.testing.assert_allclose(centered.transport(z), z, atol=2e-3)
    np.testing.assert_allclose(centered.xs[-1], y, atol=2e-3)
    assert float(jnp.max(jnp.abs(centered.last.transport(z) - z))) > 5e-2  # plain T_0


# ----------------------------------------------------------------- closed forms


def _gaussian_pair(d, n, seed=1):
    rng = np.random.default_rng(seed)

    def spd():
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        return (q * np.exp(rng.uniform(np.log(0.25), np.log(4.0), d))) @ q.T

    sx, sy, mu = spd(), spd(), rng.standard_normal(d)
    rx = np.real(scipy.linalg.sqrtm(sx))
    amap = np.linalg.inv(rx) @ np.real(scipy.linalg.sqrtm(rx @ sy @ rx)) @ np.linalg.inv(rx)
    lx, ly = np.linalg.cholesky(sx), np.linalg.cholesky(sy)
    x = rng.standard_normal((n, d)) @ lx.T
    y = rng.standard_normal((n, d)) @ ly.T + mu
    z = rng.standard_normal((500, d)) @ lx.T
    return x, y, z, z @ amap.T + mu


@jax.jit
def _one_shot(x, y, z, scales):
    """One-shot entropic maps of ``z`` at ``scales`` times the default epsilon."""
    eps0 = 0.05 * otlab.PointCloud(x, y).mean_cost()

    def one(_, s):
        sol = otlab.sinkhorn(otlab.PointCloud(x, y), epsilon=s * eps0, mode="log", max_iter=20000)
        return None, sol.transport(z)

    return jax.lax.scan(one, None, scales)[1]


@pytest.mark.parametrize("d", [2, 8])
def test_gaussian_monge_map(d):
    """Gaussian -> Gaussian (Brenier map linear, closed form), held-out points: ProgOT
    (auto schedule) is within 2x of the best one-shot entropic map over an epsilon
    grid, better than the worst, and no worse than ott-jax's ProgOT (which trains on
    the wrong iterates) given the same schedules."""
    from ott.geometry import pointcloud
    from ott.problems.linear import linear_problem
    from ott.tools import progot as ott_progot

    x, y, z, tz = (jnp.asarray(v, jnp.float32) for v in _gaussian_pair(d, 200))
    mse = lambda t: float(jnp.mean(jnp.sum((t - tz) ** 2, -1)))  # noqa: E731
    sol = otlab.progot(x, y, num_steps=K, solver=LOG)
    assert bool(sol.converged)
    err = mse(sol.transport(z))
    one_shot = [mse(t) for t in _one_shot(x, y, z, jnp.asarray([2.0, 1.0, 0.5, 0.25, 0.125]))]
    assert err <= 2.0 * min(one_shot) and err < max(one_shot), (err, one_shot)
    ott_out = ott_progot.ProgOT(sol.alphas, epsilons=sol.epsilons)(
        linear_problem.LinearProblem(pointcloud.PointCloud(x, y)), warm_start=True
    )
    err_ott = mse(ott_out.transport(z)[1])
    assert err <= 1.05 * err_ott, (err, err_ott)


def test_convex_gradient_map():
    """A non-Gaussian pair with a known Monge map: ``x`` uniform on the square,
    ``y = grad phi(x')``, ``phi(x) = |x|^2/2 + sum softplus(2 x_i)/2 + x^T A x / 4``
    (strictly convex). ProgOT's map error on held-out points is a small fraction of the
    target's variance and within 2x of the best one-shot map."""
    rng = np.random.default_rng(3)
    amat = jnp.asarray([[1.0, 0.6], [0.6, 0.8]], jnp.float32)

    def t(v):
        return v + jax.nn.sigmoid(2.0 * v) + 0.5 * v @ amat

    x, xp, z = (jnp.asarray(rng.uniform(-1, 1, size=(k, 2)), jnp.float32) for k in (200, 200, 500))
    y, tz = t(xp), t(z)
    mse = lambda u: float(jnp.mean(jnp.sum((u - tz) ** 2, -1)))  # noqa: E731
    sol = otlab.progot(x, y, num_steps=K, solver=LOG)
    err = mse(sol.transport(z))
    var = float(jnp.sum(jnp.var(tz, axis=0)))
    best = min(mse(t) for t in _one_shot(x, y, z, jnp.asarray([1.0, 0.25, 0.0625])))
    assert err < 0.05 * var and err <= 2.0 * best, (err, var, best)


# --------------------------------------------------------- jit, vmap, grad, online


def _run_explicit(x, y, eps, center=True):
    sol = otlab.progot(x, y, num_steps=K, epsilons=eps, solver=LOG, center=center)
    return sol.xs, sol.steps.g, sol.status, sol.transport(x[:5] + 0.1)


def test_jit_equals_eager_and_nan_status():
    x, y = _clouds(jnp.float32)
    eps = _eps(x, y)
    # uncentered: the chain under an outer jit (the centered path: grad, reference, closed forms)
    eager = _run_explicit(x, y, eps, center=False)
    jitted = jax.jit(functools.partial(_run_explicit, center=False))
    out = jitted(x, y, eps)
    assert int(out[2]) == int(eager[2]) == Status.SUCCESS
    for a, b in zip(out[:2] + out[3:], eager[:2] + eager[3:], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # a NaN under jit: a non-converged status, never a silently finite, converged map
    bad = jitted(x.at[3, 0].set(jnp.nan), y, eps)
    assert int(bad[2]) != Status.SUCCESS
    bad = jitted(x, y, eps.at[2].set(jnp.nan))
    assert int(bad[2]) != Status.SUCCESS


def test_vmap_equals_loop():
    x, y = _clouds(jnp.float32)
    eps = _eps(x, y)
    xb = jnp.stack([x, 0.8 * x - 0.3])
    yb = jnp.stack([y, y[::-1] + 0.2])
    eb = jnp.stack([eps, 1.5 * eps])
    run = functools.partial(_run_explicit, center=False)  # as the jit test
    batched = jax.vmap(run)(xb, yb, eb)
    for i in range(2):
        single = run(xb[i], yb[i], eb[i])
        assert int(batched[2][i]) == int(single[2]) == Status.SUCCESS
        for a, b in zip(batched[:2] + batched[3:], single[:2] + single[3:], strict=True):
            np.testing.assert_allclose(a[i], b, atol=1e-5)


def test_grad_matches_finite_differences(x64):
    """jax.grad of a scalar of the output (transported new points, coupling cost)
    through the per-step implicit differentiation, vs central differences, with
    respect to x, y and the explicit epsilon schedule."""
    x, y = _clouds(jnp.float64, n=12, m=15)
    eps = _eps(x, y)
    z = x[:4] + 0.2

    def loss(x, y, eps):
        sol = otlab.progot(x, y, num_steps=3, epsilons=eps[:3], solver=LOG64)
        return jnp.sum(sol.transport(z) ** 2) + sol.cost

    grads = jax.grad(loss, argnums=(0, 1, 2))(x, y, eps)
    rng = np.random.default_rng(0)
    h = 1e-5
    args = (x, y, eps)
    for i, arg in enumerate(args):
        v = jnp.asarray(rng.normal(size=arg.shape))
        plus = [w + h * v if j == i else w for j, w in enumerate(args)]
        minus = [w - h * v if j == i else w for j, w in enumerate(args)]
        fd = (loss(*plus) - loss(*minus)) / (2 * h)
        np.testing.assert_allclose(jnp.vdot(grads[i], v), fd, rtol=1e-5, atol=1e-8)


def test_online_and_sns_match_dense(x64):
    """Online (blocked) point clouds and SNS steps give the dense Sinkhorn answer
    (uncentered: the steps' engines; centering is one more solve of the same kind)."""
    x, y = _clouds(jnp.float64)
    eps = _eps(x, y)
    opts = dict(num_steps=K, epsilons=eps, center=False)
    dense = otlab.progot(x, y, solver=LOG64, **opts)
    online = otlab.progot(x, y, solver=LOG64, block_size=16, **opts)
    newton = otlab.progot(x, y, solver="sns", **opts)
    for other in (online, newton):
        assert bool(other.converged)
        np.testing.assert_allclose(other.xs, dense.xs, atol=1e-7)
        np.testing.assert_allclose(other.cost, dense.cost, rtol=1e-9)
    z = x[:3] - 0.4
    np.testing.assert_allclose(online.transport(z), dense.transport(z), atol=1e-9)


# ------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(x=np.zeros((5,))), "`x` must be 2-D"),
        (dict(y=np.zeros((6, 3))), "same dimension"),
        (dict(a=np.ones(4) / 4), "`a` must have shape"),
        (dict(b=-np.ones(6) / 6), "`b` has negative"),
        (dict(a=np.ones(5)), "unequal masses"),
        (dict(num_steps=0), "`num_steps`"),
        (dict(alphas="cubic"), "`alphas` must be one of"),
        (dict(alphas=np.array([0.5, 1.0])), r"`alphas` must have shape \(3,\)"),
        (dict(alphas=np.array([0.5, 0.0, 1.0])), r"`alphas` must have every entry in \(0, 1.0\]"),
        (dict(alphas=np.array([0.5, 1.5, 1.0])), r"`alphas` must have every entry"),
        (dict(epsilons=np.array([0.1, 0.1])), r"`epsilons` must have shape \(3,\)"),
        (dict(epsilons=np.array([0.1, -0.1, 0.1])), "`epsilons` must have every entry"),
        (dict(epsilons="best"), "`epsilons` must be one of"),
        (dict(solver="newton"), "`solver` must be one of"),
        (dict(tol=-1.0), "`tol`"),
        (dict(holdout=1), "`holdout`"),
        (dict(epsilon_scales=()), "`epsilon_scales`"),
        (dict(epsilon_start_scale=0.0), "`epsilon_start_scale`"),
        (dict(mesh="points"), "`mesh` must be a jax.sharding.Mesh"),
    ],
)
def test_bad_inputs_raise_before_tracing(kwargs, match):
    args = dict(x=np.zeros((5, 2)), y=np.ones((6, 2)), a=None, b=None, num_steps=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        otlab.progot(args.pop("x"), args.pop("y"), args.pop("a"), args.pop("b"), **args)


def test_schedules():
    for k in (1, 3, 8):
        for kind in ("lin", "quad", "exp"):
            al = progot_lib.alpha_schedule(kind, k)
            assert al.shape == (k,) and np.all((al > 0) & (al <= 1)) and al[-1] == 1.0
    # travelled fractions: k / K (lin) and (k / K)^2 (quad)
    t = np.asarray(progot_lib._travelled(jnp.asarray(progot_lib.alpha_schedule("lin", 5))))
    np.testing.assert_allclose(t, np.arange(5) / 5, atol=1e-6)
    t = np.asarray(progot_lib._travelled(jnp.asarray(progot_lib.alpha_schedule("quad", 5))))
    np.testing.assert_allclose(t, (np.arange(5) / 5) ** 2, atol=1e-6)
