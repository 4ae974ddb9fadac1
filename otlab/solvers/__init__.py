"""Entropic OT solvers: each module is one algorithm returning an ``OTSolution``.

The solver functions are re-exported at the top level (``otlab.sinkhorn``,
``otlab.sns``); this package keeps the modules themselves importable by name.
"""
