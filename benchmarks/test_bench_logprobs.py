"""pytest-benchmark cases of the logprobs family (see pytest_cases.py):
``pytest benchmarks/test_bench_logprobs.py``."""

import pytest

from benchmarks.pytest_cases import params, run


@pytest.mark.parametrize(("shape_index", "case_index", "impl"), params("logprobs"))
def test_bench_logprobs(benchmark, shape_index, case_index, impl):
    run(benchmark, "logprobs", shape_index, case_index, impl)
