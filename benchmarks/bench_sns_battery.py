"""The battery section of `benchmarks.bench_sns` (issue 11) as its own benchmark, so
that ``python -m benchmarks.run --only sns_battery`` runs it alone."""

from __future__ import annotations

from benchmarks.bench_sns import run_battery


def run(quick: bool = False) -> str:
    """Measure and return the markdown section."""
    return run_battery(quick=quick)
