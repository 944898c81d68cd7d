"""rlkern's benchmark suite: ``python -m benchmarks`` prints one table per op family and saves JSON
and a PNG plot under benchmarks/results/; ``pytest benchmarks/`` runs the pytest-benchmark cases
(not collected by ``make test``, whose testpaths is tests/)."""
