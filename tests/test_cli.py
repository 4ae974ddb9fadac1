"""The command-line entry points behind `make demo` (``python -m otlab demo``) and
``python -m otlab solve``: a smoke test at a small size, so that the README's first
command cannot break unnoticed."""

from __future__ import annotations

import re

import numpy as np
import pytest

from otlab import cli


def test_demo_small(tmp_path, capsys):
    rows = cli.demo(out=str(tmp_path), n=60, use_ott=False, quick=True)
    out = capsys.readouterr().out
    progot = [r for r in rows if r.solver == cli.PROGOT_LABEL]  # balanced problems only
    assert len(progot) == 2 and all(r.status == "SUCCESS" for r in progot)
    assert all(r.marginal_error <= 1e-4 and r.reg_cost > 0 for r in progot)
    rows = [r for r in rows if r.solver != cli.PROGOT_LABEL]
    problems = {r.problem for r in rows}
    solvers = {r.solver for r in rows}
    assert len(problems) == 3
    assert {"otlab kernel", "otlab kernel, init=auto", cli.SNS_LABEL} <= solvers
    assert len(rows) == len(problems) * len(solvers)
    for r in rows:
        assert r.status == "SUCCESS", (r.problem, r.solver, r.status)
        assert r.marginal_error <= 1e-4
    # every solver solves the same problem: the same regularised cost per problem
    for p in problems:
        costs = [r.reg_cost for r in rows if r.problem == p]
        np.testing.assert_allclose(costs, costs[0], rtol=1e-3)
    assert "otlab sns" in out and "init=auto" in out
    line = next(q for q in out.splitlines() if q.startswith("MoE routing"))
    assert int(re.search(r"\(max (\d+) tokens/expert", line).group(1)) <= 20  # the capacity
    line = next(q for q in out.splitlines() if q.startswith("assignment (k = 1"))
    assert "SUCCESS, a permutation: True" in line, line
    cost, best = map(float, re.search(r"cost ([0-9.]+) vs .* assignment ([0-9.]+),", line).groups())
    np.testing.assert_allclose(cost, best, rtol=1e-4)
    line = next(q for q in out.splitlines() if q.startswith("large online solve"))
    assert line.count("SUCCESS") == 2, line
    line = next(q for q in out.splitlines() if q.startswith("ragged batch"))
    assert "statuses equal: True" in line and float(re.search(r"alone\| ([0-9.e+-]+),", line).group(1)) < 1e-4
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 4 * len(problems) + 1  # + metric_learning.png
    assert "metric learning" in out and (tmp_path / "metric_learning.png").exists()
    assert all(p.stat().st_size > 1000 for p in pngs)


def test_solve_command(capsys):
    assert cli.main(["solve", "--n", "40", "--eps", "0.1", "--seed", "1"]) == 0
    assert "SUCCESS" in capsys.readouterr().out


def test_bad_arguments_exit_with_usage():
    with pytest.raises(SystemExit):
        cli.main(["solve", "--n", "0"])
