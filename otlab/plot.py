"""Matplotlib helpers for transport plans, matchings, maps and convergence.

matplotlib is imported inside each function, so ``import otlab`` never imports it;
use ``import otlab.plot``. Every helper draws on ``ax`` (a new figure's axes when
``None``) and returns that axes, so they compose with subplots.

Example:
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import jax, otlab, otlab.plot
    >>> x = jax.random.normal(jax.random.key(0), (60, 2))
    >>> sol = otlab.sinkhorn(otlab.PointCloud(x, x + 2.0), epsilon=0.1)
    >>> ax = otlab.plot.plot_plan(sol)
    >>> ax = otlab.plot.plot_errors(sol.errors, every=10, label="kernel")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # matplotlib is imported lazily at run time
    from matplotlib.axes import Axes

from typing import Any

import numpy as np

__all__ = ["plot_plan", "plot_matching", "plot_transport", "plot_errors"]


def _axes(ax):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots()
    return ax


def _dense_plan(sol_or_plan: Any) -> np.ndarray:
    """A NumPy ``(n, m)`` plan from an ``OTSolution`` (anything with ``plan()``) or an array."""
    plan = sol_or_plan.plan() if hasattr(sol_or_plan, "plan") else sol_or_plan
    plan = np.asarray(plan)
    if plan.ndim != 2:
        raise ValueError(f"`plan` must be 2-D (n, m); got shape {plan.shape}.")
    return plan


def _points(p: Any, name: str) -> np.ndarray:
    p = np.asarray(p)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"`{name}` must have shape (k, 2) (2-D points); got {p.shape}.")
    return p


def plot_plan(
    sol_or_plan: Any,
    ax: Axes | None = None,
    *,
    log: bool = False,
    cmap: str = "magma_r",
    floor: float = 1e-6,
) -> Axes:
    """Show a dense transport plan as an image (rows: source, columns: target).

    Args:
        sol_or_plan: an `OTSolution` (its dense ``plan()`` is built,
            memory ``n * m``) or an ``(n, m)`` array.
        ax: matplotlib axes to draw on; a new figure when ``None``.
        log: show ``log10`` of the entries, clipped below at ``floor`` times the
            largest entry: shows the spread of an entropic plan.
        cmap: matplotlib colormap name.
        floor: relative lower limit of the colour scale when ``log``.

    Returns:
        Axes: the axes drawn on.

    Example:
        >>> import numpy as np, otlab.plot
        >>> ax = otlab.plot.plot_plan(np.eye(4) / 4)
    """
    plan = _dense_plan(sol_or_plan)
    ax = _axes(ax)
    img = plan
    if log:
        top = float(plan.max()) if plan.size and plan.max() > 0 else 1.0
        img = np.log10(np.maximum(plan, floor * top))
    # "antialiased" averages entries when the image is smaller than the plan.
    im = ax.imshow(img, cmap=cmap, aspect="auto", interpolation="antialiased")
    ax.figure.colorbar(im, ax=ax, label="log10 P_ij" if log else "P_ij")
    ax.set_xlabel("target j")
    ax.set_ylabel("source i")
    return ax


def plot_matching(
    x: Any,
    y: Any,
    plan: Any,
    ax: Axes | None = None,
    *,
    top: int = 200,
    color: str = "0.3",
) -> Axes:
    """Draw 2-D source and target points and lines for the ``top`` largest plan entries.

    Line opacity is proportional to the entry (the largest is opaque).

    Args:
        x: ``(n, 2)`` source points.
        y: ``(m, 2)`` target points.
        plan: ``(n, m)`` plan, or an `OTSolution`.
        ax: matplotlib axes; a new figure when ``None``.
        top: number of largest entries drawn as lines.
        color: line colour.

    Returns:
        Axes: the axes drawn on.

    Example:
        >>> import numpy as np, otlab.plot
        >>> x = np.random.rand(5, 2); y = x + 1.0
        >>> ax = otlab.plot.plot_matching(x, y, np.eye(5) / 5, top=5)
    """
    from matplotlib.collections import LineCollection

    x, y = _points(x, "x"), _points(y, "y")
    plan = _dense_plan(plan)
    if plan.shape != (len(x), len(y)):
        raise ValueError(f"`plan` must have shape {(len(x), len(y))}; got {plan.shape}.")
    ax = _axes(ax)
    k = int(min(max(top, 0), plan.size))
    if k > 0:
        flat = plan.ravel()
        idx = np.argpartition(flat, flat.size - k)[flat.size - k :]
        idx = idx[np.argsort(flat[idx])]  # draw the heaviest last (on top)
        i, j = np.unravel_index(idx, plan.shape)
        w = flat[idx]
        alpha = np.clip(w / max(float(w.max()), np.finfo(float).tiny), 0.05, 1.0)
        rgba = np.zeros((k, 4))
        import matplotlib.colors as mcolors

        rgba[:, :3] = mcolors.to_rgb(color)
        rgba[:, 3] = alpha
        segs = np.stack([x[i], y[j]], axis=1)
        ax.add_collection(LineCollection(segs, colors=rgba, linewidths=0.8, zorder=1))
    ax.scatter(x[:, 0], x[:, 1], s=6, c="tab:blue", label="source", zorder=2)
    ax.scatter(y[:, 0], y[:, 1], s=6, c="tab:orange", label="target", zorder=2)
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(loc="best", fontsize="small")
    return ax


def plot_transport(
    x: Any, y: Any, tx: Any, ax: Axes | None = None, *, max_arrows: int | None = 300
) -> Axes:
    """Arrows from source points ``x`` to their images ``tx`` over the target cloud ``y``.

    Args:
        x: ``(n, 2)`` source points.
        y: ``(m, 2)`` target points (drawn for reference).
        tx: ``(n, 2)`` transported points, e.g. ``sol.transport(x)``.
        ax: matplotlib axes; a new figure when ``None``.
        max_arrows: draw arrows for an evenly spaced subset of at most this many
            points (``None``: all); all transported points are still drawn.

    Returns:
        Axes: the axes drawn on.

    Example:
        >>> import numpy as np, otlab.plot
        >>> x = np.random.rand(20, 2)
        >>> ax = otlab.plot.plot_transport(x, x + 1.0, x + 1.0)
    """
    x, y, tx = _points(x, "x"), _points(y, "y"), _points(tx, "tx")
    if tx.shape != x.shape:
        raise ValueError(f"`tx` must have the shape of `x` {x.shape}; got {tx.shape}.")
    ax = _axes(ax)
    ax.scatter(y[:, 0], y[:, 1], s=6, c="tab:orange", alpha=0.4, label="target")
    ax.scatter(x[:, 0], x[:, 1], s=6, c="tab:blue", alpha=0.6, label="source")
    ax.scatter(tx[:, 0], tx[:, 1], s=6, c="tab:green", label="transported")
    sel = np.arange(len(x))
    if max_arrows is not None and len(x) > max_arrows:
        sel = np.linspace(0, len(x) - 1, max_arrows).astype(int)
    d = tx[sel] - x[sel]
    ax.quiver(
        x[sel, 0], x[sel, 1], d[:, 0], d[:, 1],
        angles="xy", scale_units="xy", scale=1.0, width=0.002, color="0.35", alpha=0.7,
    )  # fmt: skip
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(loc="best", fontsize="small")
    return ax


def plot_errors(
    errors: Any, ax: Axes | None = None, *, label: str | None = None, every: int = 1
) -> Axes:
    """Marginal-error history on a log scale; entries equal to ``-1`` (not computed) are skipped.

    Args:
        errors: ``OTSolution.errors`` (or ott-jax's ``SinkhornOutput.errors``): one
            entry per residual check, ``-1`` where no check ran.
        ax: matplotlib axes; a new figure when ``None``.
        label: legend label of the curve.
        every: iterations between checks (the solver's ``check_every``): the x axis
            is in iterations.

    Returns:
        Axes: the axes drawn on.

    Example:
        >>> import numpy as np, otlab.plot
        >>> ax = otlab.plot.plot_errors(np.array([1.0, 0.1, 0.01, -1, -1]), every=10, label="run")
    """
    e = np.asarray(errors, dtype=float).ravel()
    it = (np.arange(e.size) + 1) * every
    keep = (e != -1) & np.isfinite(e) & (e > 0)
    ax = _axes(ax)
    ax.semilogy(it[keep], e[keep], label=label, marker="." if keep.sum() < 30 else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel("marginal error (L1)")
    ax.grid(True, which="both", alpha=0.3)
    if label is not None:
        ax.legend(loc="best", fontsize="small")
    return ax


__all__.append("plot_metric")


def plot_metric(
    metric: Any,
    points: Any,
    ax: Axes | None = None,
    *,
    size: float = 0.15,
    color: str = "C3",
    **kwargs,
) -> Axes:
    """Draw a 2-D metric as its unit balls ``{v : v^T G(x) v <= 1}`` (ellipses whose
    long axes lie along the cheap directions) at each of ``points``.

    The ellipses are normalised by the largest axis over all points, so they show
    the metric's shape and relative scale. ``kwargs`` go to ``EllipseCollection``.

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import jax.numpy as jnp, otlab.plot
        >>> from otlab import metric
        >>> ax = otlab.plot.plot_metric(metric.PoincareHalfPlane(), jnp.array([[0.0, 1.0], [1.0, 2.0]]))
    """
    from matplotlib.collections import EllipseCollection

    ax = _axes(ax)
    pts = _points(points, "points")
    g = np.asarray(metric(np.asarray(pts, np.float32)), np.float64)
    w, v = np.linalg.eigh(g)  # ascending: column 0 is the cheapest direction
    axes_len = 1.0 / np.sqrt(w)  # semi-axes of the unit ball of G
    axes_len = size * axes_len / axes_len.max()
    angles = np.degrees(np.arctan2(v[:, 1, 0], v[:, 0, 0]))
    coll = EllipseCollection(
        2 * axes_len[:, 0], 2 * axes_len[:, 1], angles, units="xy", offsets=pts,
        offset_transform=ax.transData, facecolors="none", edgecolors=color, **kwargs,
    )  # fmt: skip
    ax.add_collection(coll)
    ax.update_datalim(pts)
    ax.autoscale_view()
    ax.set_aspect("equal")
    return ax
