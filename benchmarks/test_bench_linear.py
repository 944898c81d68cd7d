"""pytest-benchmark cases of the linear family (see pytest_cases.py):
``pytest benchmarks/test_bench_linear.py``."""

import pytest

from benchmarks.pytest_cases import params, run


@pytest.mark.parametrize(("shape_index", "case_index", "impl"), params("linear"))
def test_bench_linear(benchmark, shape_index, case_index, impl):
    run(benchmark, "linear", shape_index, case_index, impl)
