"""Side-by-side benchmarks of otlab against ott-jax (and POT).

Each benchmark is a module ``benchmarks/bench_<name>.py`` with a function
``run(quick: bool) -> str`` that measures and returns a markdown section; it is
registered by name in `benchmarks.run.BENCHMARKS`. ``python -m benchmarks.run``
(``make bench``) runs them all and rewrites ``benchmarks/results.md``.

Rules (shared/STYLE.md): same problem, same tolerance, warm (compiled) timings,
medians of several runs, ratios against the reference measured in the same run.
Helpers for that live in `benchmarks.common`.
"""
