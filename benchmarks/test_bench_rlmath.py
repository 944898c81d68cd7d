"""pytest-benchmark cases of the rlmath family (see pytest_cases.py):
``pytest benchmarks/test_bench_rlmath.py``."""

import pytest

from benchmarks.pytest_cases import params, run


@pytest.mark.parametrize(("shape_index", "case_index", "impl"), params("rlmath"))
def test_bench_rlmath(benchmark, shape_index, case_index, impl):
    run(benchmark, "rlmath", shape_index, case_index, impl)
