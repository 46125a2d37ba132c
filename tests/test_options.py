"""The solver options of :mod:`pyro_ntk.options`: enums, defaults and validation."""

from __future__ import annotations

import dataclasses

import pytest

from pyro_ntk.options import DEFAULT_MAX_CHOLESKY_SIZE, PreconditionerKind, Solver, SolverOptions


def test_defaults_and_normalisation():
    o = SolverOptions()
    assert (o.solver, o.preconditioner) == (Solver.AUTO, PreconditionerKind.AUTO)
    assert (o.max_cholesky_size, o.cg_tolerance, o.max_cg_iterations) == (
        DEFAULT_MAX_CHOLESKY_SIZE, 1e-4, 1000,
    )  # fmt: skip
    assert (o.num_trace_samples, o.preconditioner_rank) == (10, 100)
    assert SolverOptions(preconditioner=None).preconditioner is PreconditionerKind.NONE
    assert SolverOptions(solver="cg").solver is Solver.CG and Solver.CG == "cg"
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.solver = "cg"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(solver="lu"), ValueError, r"SolverOptions: solver must be one of .* got 'lu'"),
        (dict(preconditioner="ilu"), ValueError, r"preconditioner must be one of .* got 'ilu'"),
        (dict(max_cholesky_size=1.5), ValueError, r"max_cholesky_size must be an int, got 1\.5"),
        (dict(cg_tolerance=0.0), ValueError, r"cg_tolerance must be a positive float, got 0\.0"),
        (dict(max_cg_iterations=0), ValueError, r"max_cg_iterations must be a positive int"),
        (dict(num_trace_samples=2.0), TypeError, r"num_trace_samples must be a positive int"),
        (dict(preconditioner_rank=-1), ValueError, r"preconditioner_rank must be a positive int"),
    ],
)
def test_each_field_is_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        SolverOptions(**kwargs)
