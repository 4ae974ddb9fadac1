"""Eager validation shared by the solvers (run before tracing; values only when concrete)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from otlab import geometry as geometry_lib

#: What ``init=`` accepts: ``None``, ``"auto"``, a pair ``(f0, g0)`` or a callable
#: ``init(geom, a, b, epsilon) -> (f0, g0)``.
Init = Callable[..., tuple[jax.Array, jax.Array]] | tuple[jax.Array, jax.Array] | str | None


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def weights(w, size: int, name: str, dtype):
    """Default uniform weights; check shape (always) and values (when concrete)."""
    if size == 0:
        raise ValueError(f"`{name}`: the geometry has no points on this side.")
    if w is None:
        return jnp.full((size,), 1.0 / size, dtype=dtype)
    _real(w, name)
    w = jnp.asarray(w, dtype=dtype) if not isinstance(w, jax.core.Tracer) else w.astype(dtype)
    if w.shape != (size,):
        hint = (
            " Solvers take a geometry and weights, `sinkhorn(geom, a, b)`: pass point clouds as "
            "`otlab.PointCloud(x, y)`."
            if w.ndim >= 2
            else ""
        )
        raise ValueError(
            f"`{name}` must have shape ({size},) to match the geometry; got {w.shape}.{hint}"
        )
    if _concrete(w):
        wn = np.asarray(w)
        if not np.all(np.isfinite(wn)):
            raise ValueError(f"`{name}` has non-finite entries.")
        if np.any(wn < 0):
            raise ValueError(f"`{name}` has negative entries.")
        if not wn.sum() > 0:
            raise ValueError(f"`{name}` must have positive total mass.")
    return w


def _real(x, name: str):
    """Complex values are rejected, never silently cast to their real part."""
    if jnp.iscomplexobj(x):
        raise ValueError(f"`{name}` must be real; got complex values ({jnp.result_type(x)}).")


def positive_scalar(x, name: str, dtype, upper: float | None = None):
    """A positive (traced) scalar; ``upper`` is an inclusive bound."""
    _real(x, name)
    x = jnp.asarray(x, dtype=dtype) if not isinstance(x, jax.core.Tracer) else x.astype(dtype)
    if x.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar; got shape {x.shape}.")
    if _concrete(x):
        v = float(x)
        if not np.isfinite(v) or v <= 0 or (upper is not None and v > upper):
            bound = f" and <= {upper}" if upper is not None else ""
            raise ValueError(f"`{name}` must be finite, > 0{bound}; got {v}.")
    return x


def masses(a, b, tau_a, tau_b):
    """A balanced problem (both tau == 1) needs equal masses: checked when concrete."""
    if not all(_concrete(t) for t in (a, b, tau_a, tau_b)):
        return
    if float(tau_a) == 1.0 and float(tau_b) == 1.0:
        sa, sb = float(jnp.sum(a)), float(jnp.sum(b))
        if abs(sa - sb) > 1e-5 * max(sa, sb):
            raise ValueError(
                f"`a` and `b` have unequal masses ({sa:.6g} vs {sb:.6g}) but the problem is "
                "balanced (tau_a = tau_b = 1): normalise them or relax a marginal with tau < 1."
            )


def geometry(geom):
    geom = geometry_lib.as_geometry(geom)
    base = getattr(geom, "inner", geom)  # a sharded geometry: check what it wraps
    arrays = (
        {"cost_matrix": base.cost_matrix}
        if isinstance(base, geometry_lib.Geometry)
        else {"x": base.x, "y": base.y}
    )
    for name, arr in arrays.items():
        if arr.ndim != 2:
            raise ValueError(f"`geom.{name}` must be 2-D; got shape {arr.shape}.")
    if not jnp.issubdtype(geom.dtype, jnp.floating):
        raise ValueError(f"`geom` must hold floating-point data; got {geom.dtype}.")
    if jnp.finfo(geom.dtype).bits < 32:
        raise ValueError(
            f"`geom` holds {jnp.dtype(geom.dtype).name} data: otlab's solvers run in float32 or "
            "float64 (half precision cannot reach their tolerances, and LAPACK has no half-"
            "precision routines); cast the points or costs with `.astype(jnp.float32)`."
        )
    return geom


def ott_epsilon(geom):
    """The epsilon an ott-jax geometry was given (``epsilon=`` or ``relative_epsilon=``),
    else ``None`` (ott's own default, ``0.05 * std(C)``, is not otlab's)."""
    if not (type(geom).__module__ or "").startswith("ott."):
        return None
    if getattr(geom, "_epsilon_init", None) is None and getattr(
        geom, "_relative_epsilon", None
    ) is None:
        return None
    return geom.epsilon


def potentials(init, geom, a, b, epsilon) -> tuple:
    """``None`` (zeros), a callable ``init(geom, a, b, epsilon) -> (f0, g0)``, or a pair."""
    n, m = geom.shape
    if init is None:
        return jnp.zeros((n,), geom.dtype), jnp.zeros((m,), geom.dtype)
    if isinstance(init, Callable):
        pair = init(geom, a, b, epsilon)
    else:
        pair = init
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError("`init` must be None, a callable returning (f0, g0), or a pair (f0, g0).")
    f0, g0 = (jnp.asarray(p, geom.dtype) for p in pair)
    if f0.shape != (n,) or g0.shape != (m,):
        raise ValueError(
            f"`init` potentials must have shapes ({n},) and ({m},); got {f0.shape} and {g0.shape}."
        )
    return f0, g0


def choice(value, name: str, options):
    if value not in options:
        raise ValueError(f"`{name}` must be one of {options}; got {value!r}.")


def positive_int(value, name: str):
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive int; got {value!r}.")


def nonnegative_int(value, name: str):
    if not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative int; got {value!r}.")


def problem(geom, a, b, epsilon, tau_a, tau_b):
    """Eager checks shared by every entropic solver's entry point.

    Returns ``(geom, a, b, epsilon, tau_a, tau_b)`` converted to the geometry's
    dtype (``epsilon`` stays ``None`` when not given).
    """
    if epsilon is None:
        epsilon = ott_epsilon(geom)
    geom = geometry(geom)
    n, m = geom.shape
    dtype = geom.dtype
    a = weights(a, n, "a", dtype)
    b = weights(b, m, "b", dtype)
    if epsilon is not None:
        epsilon = positive_scalar(epsilon, "epsilon", dtype)
    tau_a = positive_scalar(tau_a, "tau_a", dtype, upper=1.0)
    tau_b = positive_scalar(tau_b, "tau_b", dtype, upper=1.0)
    masses(a, b, tau_a, tau_b)
    return geom, a, b, epsilon, tau_a, tau_b


def split_init(init, geom, a, b, epsilon):
    """``init=`` as ``(static callable or None, checked pair or None)``; ``"auto"``
    is `otlab.initializers.auto`."""
    if isinstance(init, str):
        choice(init, "init", ("auto",))
        from otlab import initializers

        init = initializers.auto
    if callable(init):
        return init, None
    return None, (None if init is None else potentials(init, geom, a, b, epsilon))
