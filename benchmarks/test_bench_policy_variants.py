"""pytest-benchmark cases of the policy_variants family (see pytest_cases.py):
``pytest benchmarks/test_bench_policy_variants.py``."""

import pytest

from benchmarks.pytest_cases import params, run


@pytest.mark.parametrize(("shape_index", "case_index", "impl"), params("policy_variants"))
def test_bench_policy_variants(benchmark, shape_index, case_index, impl):
    run(benchmark, "policy_variants", shape_index, case_index, impl)
