"""Metric learning and geodesics (otlab.metric, otlab.geodesic).

* Trajectory inference: snapshots of a curved flow (`synthetic.rotating_arc`) and of
  a straight-flow control (`synthetic.translating_arc`); every other time is held
  out, a metric is fitted on the rest, and each held-out snapshot is predicted by
  geodesic interpolation of its neighbours under the learned metric, under the
  Euclidean metric (McCann interpolation of the same entropic coupling) and, for
  the curved flow, under the true metric. W2 (exact, POT's ``emd2``) to the true
  held-out snapshot.
* Metric recovery: mean |cos| between the learned metric's cheapest direction and
  the true one (the circles' tangent) on the data's support.
* Timings: warm time per training epoch, and per batch of 1000 geodesics
  (vmapped, jitted) under the learned metric and the Poincaré half-plane.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from otlab import geodesic, metric
from otlab.metric import synthetic

#: rotation per unit time of the curved flow (held-out points are SPEED from their neighbours).
SPEED = np.pi / 6


def _w2(a, b) -> float:
    import ot

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(ot.emd2([], [], ot.dist(a, b))))


def _trajectory(snaps, times, fit_kw, true_metric=None, resample=None):
    """Fit on even times, predict odd ones; return per-time W2 rows and the fit.

    ``resample``: independent samples of the same snapshots; W2 between them and the
    truth is the sampling floor that no prediction can beat."""
    t0 = time.perf_counter()
    res = metric.fit(snaps[::2], times[::2], progress=False, **fit_kw)
    fit_s = time.perf_counter() - t0
    eye = metric.Constant(jnp.eye(snaps[0].shape[1], dtype=jnp.float32))
    rows = []
    for i in range(1, len(snaps) - 1, 2):
        a, b, truth = snaps[i - 1], snaps[i + 1], snaps[i]
        learned = _w2(geodesic.interpolate(res.metric, a, b, 0.5), truth)
        mccann = _w2(geodesic.interpolate(eye, a, b, 0.5), truth)
        oracle = (
            _w2(geodesic.interpolate(true_metric, a, b, 0.5), truth) if true_metric else np.nan
        )
        floor = _w2(resample[i], truth) if resample is not None else np.nan
        rows.append((times[i], learned, mccann, oracle, floor))
    return rows, res, fit_s


def _cos(g, snaps) -> float:
    pts = jnp.concatenate([jnp.asarray(s) for s in snaps])
    v = jnp.linalg.eigh(g(pts))[1][:, :, 0]
    return float(jnp.mean(jnp.abs(jnp.sum(v * synthetic.tangent(pts), -1))))


def _table(name, rows):
    out = [f"**{name}**\n", "| held-out t | W2 learned | W2 McCann | learned / McCann | W2 true metric "
           "| W2 resample (floor) |", "|---|---|---|---|---|---|"]  # fmt: skip
    fmt = lambda v: "–" if np.isnan(v) else f"{v:.4f}"  # noqa: E731
    for t, lw, mw, ow, fw in rows:
        out.append(f"| {t:g} | {lw:.4f} | {mw:.4f} | {lw / mw:.3f} | {fmt(ow)} | {fmt(fw)} |")
    lw, mw, ow = (np.mean([r[k] for r in rows]) for k in (1, 2, 3))
    oracle = "" if np.isnan(ow) else f"{ow:.4f} ({ow / mw:.3f} of McCann)"
    out.append(f"| **mean** | **{lw:.4f}** | **{mw:.4f}** | **{lw / mw:.3f}** | {oracle} | |")
    return "\n".join(out), lw / mw


def run(quick: bool = False) -> str:
    n = 60 if quick else 200
    fit_kw = dict(epochs=40 if quick else 300, seed=0)
    curved, times = synthetic.rotating_arc(num_times=7, n=n, speed=SPEED, seed=0)
    straight, times_s = synthetic.translating_arc(num_times=7, n=n, seed=0)
    resample_c, _ = synthetic.rotating_arc(num_times=7, n=n, speed=SPEED, seed=123)
    resample_s, _ = synthetic.translating_arc(num_times=7, n=n, seed=123)
    rows_c, res_c, fit_c = _trajectory(curved, times, fit_kw, synthetic.circular_metric(0.1), resample_c)
    rows_s, res_s, fit_s = _trajectory(straight, times_s, fit_kw, resample=resample_s)
    table_c, ratio_c = _table(f"curved flow (rotating arc, {n} points per snapshot)", rows_c)
    table_s, ratio_s = _table(f"straight-flow control (translating arc, {n} points)", rows_s)
    cos = _cos(res_c.metric, curved)

    # warm time per epoch: a second fit of a few epochs reuses the compiled step
    k = 5 if quick else 20
    t0 = time.perf_counter()
    short = metric.fit(curved[::2], times[::2], progress=False, epochs=k, patience=k, seed=1)
    epoch_s = (time.perf_counter() - t0) / len(short.history)

    rng = np.random.default_rng(0)
    x0 = jnp.asarray(np.stack([rng.uniform(-1.5, -0.3, 1000), rng.uniform(0.5, 2, 1000)], 1), jnp.float32)
    x1 = jnp.asarray(np.stack([rng.uniform(0.3, 1.5, 1000), rng.uniform(0.5, 2, 1000)], 1), jnp.float32)
    batch = jax.jit(jax.vmap(lambda g, a, b: geodesic.shortest_path(g, a, b, 32), in_axes=(None, 0, 0)))
    c0 = jnp.asarray(curved[0][: min(n, 1000)])
    c1 = jnp.asarray(curved[2][: min(n, 1000)])
    reps = np.tile(np.arange(len(c0)), 1000 // len(c0) + 1)[:1000]
    fns = {
        "learned metric (rotating arc)": common.compiled(batch, res_c.metric, c0[reps], c1[reps]),
        "Poincaré half-plane": common.compiled(batch, metric.PoincareHalfPlane(), x0, x1),
    }
    geo_times, _ = common.time_interleaved(fns, reps=3)

    lines = [
        f"Fit: `otlab.metric.fit` defaults, {fit_kw['epochs']} epochs max, seed 0 "
        f"(curved: {len(res_c.history)} epochs in {fit_c:.0f} s; straight: "
        f"{len(res_s.history)} epochs in {fit_s:.0f} s, both including compilation). "
        "Interpolation: `otlab.geodesic.interpolate` (ε = 0.01 × cost scale, 16 points per geodesic).\n",
        table_c,
        "",
        f"Curved flow: learned / McCann = **{ratio_c:.3f}** (target ≤ 0.70).",
        "",
        table_s,
        "",
        f"Straight control: learned / McCann = **{ratio_s:.3f}** (target ≤ 1.05).",
        "",
        f"Metric recovery on the curved flow: mean |cos(learned, true principal direction)| "
        f"= **{cos:.3f}** on all {len(curved)} snapshots' points (target ≥ 0.9).",
        "",
        "| timing (warm) | seconds |",
        "|---|---|",
        f"| one training epoch (3 pairs of {n} × {n} points, Sinkhorn + backward) | {epoch_s:.3f} |",
    ]
    for name, s in geo_times.items():
        lines.append(f"| 1000 geodesics, 32 points, {name} | {s:.3f} |")
    return "\n".join(lines)
