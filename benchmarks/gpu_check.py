"""`make gpu-check`: everything rlkern claims about GPUs, measured on one CUDA machine in one command.

    python -m benchmarks.gpu_check [--out DIR]     (or RLKERN_GPU_CHECK_OUT=DIR; default gpu-check/)

Uses the python, torch and Triton already installed and needs no network. Steps, each logged to
DIR/<step>.log, with DIR/summary.json at the end:

1. build:  pip install --no-build-isolation --no-deps --no-index -e .  (rlkern._C on all cores)
2. tests:  the suite with RLKERN_TEST_DEVICE=cuda: every tensor a test makes is a CUDA tensor, so
           the triton backend runs the compiled kernels against the float64 oracle, opcheck,
           torch.compile(fullgraph=True) and the batch-invariance tests (tests/test_gpu_compile.py
           is skipped: the GPU compiles every kernel the tests launch for real).
3. bench:  python -m benchmarks.gpu --out DIR (bench.json, bench.md)
4. train:  python -m rlkern.train grpo --device cuda --steps 3 --out DIR/train-grpo

On a machine without CUDA it prints one line and exits 2. Exit 1 when a step failed; the later
steps still run, so one broken step does not hide the others' results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 8 * 60  # issue #8: the whole check, build included, on one H100 / H200


def steps(out: Path, pytest_args: list[str]) -> list[tuple[str, list[str], dict]]:
    """(name, command, extra environment) of each step, in order."""
    py = sys.executable
    no_interpreter = {"TRITON_INTERPRET": None}
    return [
        ("build", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."],
         {"MAX_JOBS": str(os.cpu_count() or 1)}),
        ("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--ignore=tests/test_gpu_compile.py",
                   f"--junitxml={out / 'tests.xml'}", *pytest_args],
         {"RLKERN_TEST_DEVICE": "cuda", **no_interpreter}),
        ("bench", [py, "-m", "benchmarks.gpu", "--out", str(out)], no_interpreter),
        ("train", [py, "-m", "rlkern.train", "grpo", "--device", "cuda", "--steps", "3",
                   "--out", str(out / "train-grpo"), "--overwrite"], no_interpreter),
    ]


def _env(extra: dict) -> dict:
    env = dict(os.environ)
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run(out: Path, pytest_args: list[str], only: list[str] | None = None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    summary, start, failed = {"steps": []}, time.perf_counter(), False
    for name, cmd, extra in steps(out, pytest_args):
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        log = out / f"{name}.log"
        with open(log, "w") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            rc = subprocess.run(cmd, cwd=ROOT, env=_env(extra), stdout=f, stderr=subprocess.STDOUT,
                                check=False).returncode
        seconds = time.perf_counter() - t0
        failed |= rc != 0
        summary["steps"].append({"step": name, "rc": rc, "seconds": round(seconds, 1), "log": str(log),
                                 "command": cmd})
        print(f"gpu-check {name:6} {'ok' if rc == 0 else f'FAILED (rc {rc})':16} {seconds:7.1f} s   {log}",
              flush=True)
    total = time.perf_counter() - start
    summary.update(total_seconds=round(total, 1), budget_seconds=BUDGET_S, ok=not failed)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    over = f" (over the {BUDGET_S} s budget)" if total > BUDGET_S else ""
    print(f"gpu-check {'ok' if not failed else 'FAILED'} in {total:.0f} s{over}; everything is in {out}/")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="rlkern's GPU check (see the module docstring)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("RLKERN_GPU_CHECK_OUT", "gpu-check")),
                        help="output directory (default: $RLKERN_GPU_CHECK_OUT or gpu-check/)")
    parser.add_argument("--only", nargs="+", choices=("build", "tests", "bench", "train"),
                        help="run only these steps")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments for the tests step (after --)")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print(f"make gpu-check needs a CUDA device and torch: {sys.executable} cannot import torch "
              "(set PYTHON=...)")
        return 2
    if not torch.cuda.is_available():
        print("make gpu-check needs a CUDA device: torch.cuda.is_available() is False on this machine")
        return 2
    return run(args.out.resolve(), args.pytest_args, args.only)


if __name__ == "__main__":
    sys.exit(main())
