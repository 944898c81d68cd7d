"""verl's own CPU test suites, from the source release of the installed verl, run with
``rlkern.compat.patch("verl")`` applied: ``python -m tests.verl_release`` (a step of ``.ci/run``).

The wheel verl ships has no tests, so this downloads the matching sdist from PyPI once (``pip download
verl==<installed> --no-binary :all:``, cached in ``$RLKERN_CACHE`` or ``~/.cache/rlkern``), extracts
its ``tests/trainer/ppo`` and runs the files of :data:`SUITES` with pytest, with this module as a
plugin. The plugin patches verl before any test module is imported (so a test's
``from verl.trainer.ppo.core_algos import ...`` gets the shim too) and records, per test, which rlkern
shims it called (a profile hook on their code objects). A passing suite proves nothing if no test
reached rlkern, so the run fails when a file of :data:`MUST_REACH` had no test that called a shim, and
it prints each file's count of tests passed and tests that reached rlkern.
"""

from __future__ import annotations

import collections
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The CPU suites of verl's tests/trainer/ppo that touch what rlkern patches (core_algos and
# rollout_corr_helper). test_spec_decode_metrics_on_cpu.py is left out: it imports verl's ray
# trainer, which needs torchdata (not a verl dependency rlkern installs).
SUITES = (
    "test_core_algos_on_cpu.py",
    "test_rollout_corr.py",
    "test_rollout_corr_integration.py",
    "test_dynamic_policy_losses_on_cpu.py",
    "test_loss_aggregation_on_cpu.py",
    "test_reinforce_pp_multiturn_on_cpu.py",
    "test_value_loss_normalization_on_cpu.py",
)
# The suites the issue names: each must have tests that ran rlkern's code, not only verl's.
MUST_REACH = ("test_core_algos_on_cpu.py", "test_rollout_corr.py", "test_dynamic_policy_losses_on_cpu.py")

_reached: dict[str, set[str]] = collections.defaultdict(set)  # test node id -> shim names it called
_outcomes: dict[str, str] = {}


def _sdist_tests(version: str) -> Path:
    """Extracts ``tests/trainer/ppo`` of verl ``version``'s sdist into a fresh directory."""
    cache = Path(os.environ.get("RLKERN_CACHE", Path.home() / ".cache" / "rlkern")) / f"verl-{version}-sdist"
    archive = cache / f"verl-{version}.tar.gz"
    if not archive.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", "-d", str(cache), f"verl=={version}"], check=True)
    prefix = f"verl-{version}/tests/trainer/ppo/"
    out = Path(tempfile.mkdtemp(prefix="verl-suites-"))
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
        for member in members:
            member.name = member.name[len(prefix):]
        tar.extractall(out, members=members, filter="data")
    (out / "__init__.py").unlink(missing_ok=True)  # rootdir-relative imports, as verl's CI runs them
    (out / "pytest.ini").write_text("[pytest]\n")  # verl's tests, not rlkern's pytest settings
    return out


def main() -> int:
    version = importlib.metadata.version("verl")
    suites = _sdist_tests(version)
    missing = [name for name in SUITES if not (suites / name).exists()]
    if missing:
        print(f"verl {version}'s sdist lacks {missing}", file=sys.stderr)
        return 1
    repo = Path(__file__).resolve().parent.parent
    path = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    print(f"== verl {version} source-release suites, patched by rlkern ({suites})", flush=True)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                           "tests.verl_release", "--rootdir", str(suites), "-c", str(suites / "pytest.ini"),
                           *SUITES], cwd=suites, env=env).returncode


# ------------------------------------------------------------------------------------------------
# pytest plugin hooks (active with ``-p tests.verl_release``)
# ------------------------------------------------------------------------------------------------


def pytest_configure(config):
    import rlkern.compat
    import rlkern.compat.verl as shims

    rlkern.compat.patch("verl", strict=True)
    config._rlkern_shim_codes = {getattr(shims, name).__code__: name
                                 for _, _, name in shims.PATCH_TARGETS
                                 if hasattr(getattr(shims, name), "__code__")}


def _recorder(codes: dict, hit: set):
    def profile(frame, event, _arg):
        if event == "call" and frame.f_code in codes:
            hit.add(codes[frame.f_code])
    return profile


def pytest_runtest_call(item):
    sys.setprofile(_recorder(item.config._rlkern_shim_codes, _reached[item.nodeid]))


def pytest_runtest_teardown(item):
    sys.setprofile(None)


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        _outcomes[report.nodeid] = report.outcome


def pytest_sessionfinish(session, exitstatus):
    per_file: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    shims_hit: set[str] = set()
    for nodeid, outcome in _outcomes.items():
        counts = per_file[nodeid.split("::")[0]]
        counts[0] += outcome == "passed"
        counts[1] += bool(_reached[nodeid])
        shims_hit |= _reached[nodeid]
    print("\n== rlkern shims reached, per verl suite (tests passed / tests that called an rlkern shim)")
    for name in SUITES:
        passed, reached = per_file.get(name, [0, 0])
        print(f"   {name:45s} {passed:4d} passed {reached:4d} reached rlkern")
    print(f"   shims called: {', '.join(sorted(shims_hit)) or 'none'}")
    print("   tests that called no rlkern shim (they test verl code rlkern does not replace):")
    for nodeid in sorted(n for n, outcome in _outcomes.items() if outcome == "passed" and not _reached[n]):
        print(f"     {nodeid}")
    unreached = [name for name in MUST_REACH if per_file.get(name, [0, 0])[1] == 0]
    if unreached and session.exitstatus == 0:
        print(f"   FAIL: no test of {unreached} reached rlkern", file=sys.stderr)
        session.exitstatus = 1


if __name__ == "__main__":
    sys.exit(main())
