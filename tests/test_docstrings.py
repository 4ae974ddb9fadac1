"""Every ``Example:`` in otlab's docstrings runs and prints what it shows (the API
reference is generated from these docstrings)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "otlab.costs",
    "otlab.geometry",
    "otlab.solution",
    "otlab.implicit",
    "otlab.initializers",
    "otlab.solvers.sinkhorn",
    "otlab.solvers.sns",
    "otlab.solvers.progot",
    "otlab.plot",
    "otlab.solvers.cardinality",
    "otlab.nn.routing",
    "otlab.sharding",
    "otlab.ragged",
    "otlab.metric",
    "otlab.metric.tensors",
    "otlab.metric.fit",
    "otlab.metric.synthetic",
    "otlab.geodesic",
    "otlab._control",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, report=True)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
