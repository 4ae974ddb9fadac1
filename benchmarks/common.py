"""Shared helpers: warm timings interleaved across methods, machine info, markdown."""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np


def block(out):
    """Wait for every array in ``out`` (asynchronous dispatch)."""
    return jax.block_until_ready(out)


_EXECUTABLES: dict = {}


def compiled(fn: Callable, *args) -> Callable[[], object]:
    """A zero-argument callable running ``fn(*args)``, compiled ahead of time.

    ``fn`` is a ``jax.jit``-wrapped function; ``fn.lower(*args).compile()`` compiles
    it without running it, so no warm-up run is needed before timing. Executables
    are cached per function, argument tree structure and leaf shapes / dtypes.
    """
    leaves, treedef = jax.tree.flatten(args)  # arguments may be pytrees (a metric)
    key = (fn, treedef, tuple((jax.numpy.shape(a), jax.numpy.result_type(a)) for a in leaves))
    if key not in _EXECUTABLES:
        _EXECUTABLES[key] = fn.lower(*args).compile()
    exe = _EXECUTABLES[key]
    return lambda: exe(*args)


def time_interleaved(
    fns: dict[str, Callable[[], object]], reps: int = 3, warmup: bool = False
) -> tuple[dict[str, float], dict[str, object]]:
    """Median wall time (s) of each zero-argument ``fn``, and its last output.

    Repetitions are interleaved (``a b c a b c ...``) so that a change of machine
    load affects every method alike and ratios stay meaningful on a shared machine.
    Pass callables from `compiled` (already warm), or ``warmup=True`` to run
    each once first.
    """
    if warmup:
        for fn in fns.values():
            block(fn())
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs: dict[str, object] = {}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            outs[k] = block(fn())
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}, outs


def ott_sinkhorn(tol: float, max_iter: int, check_every: int, fixed: bool = False):
    """ott-jax's ``Sinkhorn`` with otlab's stopping rule; ``fixed`` runs exactly
    ``max_iter`` iterations (per-iteration timing)."""
    from ott.solvers.linear import sinkhorn

    return sinkhorn.Sinkhorn(
        threshold=tol,
        inner_iterations=check_every,
        min_iterations=max_iter if fixed else 0,
        max_iterations=max_iter,
    )


def machine() -> str:
    """One line: date, CPU count, load, platform and library versions."""
    import ott

    try:
        load = f"load avg {os.getloadavg()[0]:.1f}"
    except OSError:  # pragma: no cover - not on every OS
        load = "load avg n/a"
    dev = jax.devices()[0]
    return (
        f"{datetime.datetime.now().isoformat(timespec='minutes')}, "
        f"{os.cpu_count()} CPUs ({platform.machine()}), {load} at start, "
        f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}), "
        f"ott-jax {ott.__version__}, Python {platform.python_version()}"
    )


def table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one char per column: ``l`` or ``r`` (default all ``r``
    except the first)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float, digits: int = 3) -> str:
    """Compact number: ``nan``/``inf`` pass, otherwise ``digits`` significant figures."""
    if x is None:
        return "—"
    if not np.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"
