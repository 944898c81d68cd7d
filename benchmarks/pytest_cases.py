"""pytest-benchmark plumbing: turns a family's cases into one benchmark test per (case, implementation).

``pytest benchmarks/`` (not part of ``make test``: pytest's testpaths is tests/) runs the quick
shapes; ``RLKERN_BENCH_SHAPES=full`` (or ``large``) runs the report's shapes. Tests of one
``--benchmark-group-by=group`` group share a case, so pytest-benchmark's table puts the floor and
every implementation side by side. Only one shape's tensors are alive at a time.
"""

from __future__ import annotations

import os

import pytest

from benchmarks.report import family_module

_current: dict = {}  # (family, shape index) -> that shape's cases, one entry at a time


SHAPE_SETS = ("quick", "full", "large")


def _shapes(family: str):
    """The family's shapes of the set named by $RLKERN_BENCH_SHAPES (a family without a "large"
    set has no cases there: pytest then reports its test as an empty parameter set)."""
    which = os.environ.get("RLKERN_BENCH_SHAPES", "quick")
    if which not in SHAPE_SETS:
        raise ValueError(f"RLKERN_BENCH_SHAPES must be one of {SHAPE_SETS}, got {which!r}")
    return family_module(family).SHAPES.get(which, [])


def _cases(family: str, shape_index: int):
    key = (family, shape_index)
    if key not in _current:
        _current.clear()  # drop the previous shape's tensors before building this one's
        _current[key] = list(family_module(family).cases([_shapes(family)[shape_index]]))
    return _current[key]


def params(family: str) -> list:
    """One pytest param per (shape, case, implementation), with readable ids."""
    out = []
    for s, _ in enumerate(_shapes(family)):
        for c, case in enumerate(_cases(family, s)):
            for impl in case.impls:
                out.append(pytest.param(s, c, impl.name, id=f"{case.label} | {impl.name}"))
    _current.clear()
    return out


def run(benchmark, family: str, shape_index: int, case_index: int, impl_name: str) -> None:
    case = _cases(family, shape_index)[case_index]
    impl = next(i for i in case.impls if i.name == impl_name)
    benchmark.group = case.label
    benchmark.extra_info.update({"work": case.work, "unit": case.unit, "kind": impl.kind})
    impl.fn()  # warm up outside the measurement (torch.compile compiles here)
    benchmark(impl.fn)  # pytest-benchmark calibrates iterations; >= 5 rounds by default
