"""Synthetic OT problems shared by the benchmarks and the tests (NumPy only)."""

from __future__ import annotations

import numpy as np

__all__ = ["battery_problem"]

_ANISO = np.array([[2.0, 0.5], [0.0, 1.0]])


def battery_problem(name: str, n: int, m: int, seed: int = 0):
    """``(x, y, a, b)`` of a battery problem in float64 NumPy (``a``, ``b`` normalised).

    * ``translated-sS``: ``x ~ N(0, I_2)``, ``y ~ N(0, I_2) A^T + (S, -S/3)`` with
      ``A = [[2, .5], [0, 1]]`` (the issue's example);
    * ``anisotropic``: axis scales (3, 0.3) against (0.3, 3);
    * ``mixture-3d``: a 3-component against a 4-component Gaussian mixture in 3-D;
    * ``outliers``: uniform clouds, 5% of the targets thrown ~5 units away;
    * ``weights``: Gaussian clouds with log-normal weights (two orders of magnitude).
    """
    rng = np.random.default_rng([seed, n, m, sum(map(ord, name))])
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    if name.startswith("translated-s"):
        s = float(name.removeprefix("translated-s"))
        x = rng.normal(size=(n, 2))
        y = rng.normal(size=(m, 2)) @ _ANISO.T + np.array([s, -s / 3])
    elif name == "anisotropic":
        x = rng.normal(size=(n, 2)) * np.array([3.0, 0.3])
        y = rng.normal(size=(m, 2)) * np.array([0.3, 3.0])
    elif name == "mixture-3d":

        def mixture(k, centers):
            return centers[rng.integers(len(centers), size=k)] + 0.4 * rng.normal(size=(k, 3))

        x = mixture(n, 2.0 * rng.normal(size=(3, 3)))
        y = mixture(m, 2.0 * rng.normal(size=(4, 3)))
    elif name == "outliers":
        x = rng.uniform(size=(n, 2))
        y = rng.uniform(size=(m, 2)) + 0.2
        k = max(1, m // 20)
        y[:k] += 5.0 * rng.normal(size=(k, 2))
    elif name == "weights":
        x = rng.normal(size=(n, 2))
        y = 1.5 * rng.normal(size=(m, 2)) + 1.0
        a, b = rng.lognormal(size=n), rng.lognormal(size=m)
        a, b = a / a.sum(), b / b.sum()
    else:
        raise ValueError(f"unknown battery problem {name!r}")
    return x, y, a, b
