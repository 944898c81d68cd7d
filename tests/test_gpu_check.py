"""`make gpu-check` (benchmarks/gpu_check.py) and its benchmark (benchmarks/gpu.py), checked on the
CPU: the one-line refusal without CUDA, the steps and their environment, the step bookkeeping, the
benchmark's plan (every case of issue #8 with every implementation), and every non-compiled
implementation of the plan run once on tiny tensors (CPU: Triton through the interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu, gpu_check
from tests.conftest import DEVICE

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_says_in_one_line_that_it_needs_cuda_and_exits_2(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.count("\n") == 1 and "needs a CUDA device" in proc.stdout
    assert not out.exists()


def test_steps_build_offline_then_test_on_cuda_bench_and_train(tmp_path):
    steps = {name: (cmd, env) for name, cmd, env in gpu_check.steps(tmp_path, ["-x"])}
    assert list(steps) == ["build", "tests", "bench", "train"]
    build = steps["build"][0]
    assert build[1:4] == ["-m", "pip", "install"] and build[-2:] == ["-e", "."]
    assert {"--no-build-isolation", "--no-deps", "--no-index"} <= set(build)
    tests_cmd, tests_env = steps["tests"]
    assert tests_env["RLKERN_TEST_DEVICE"] == "cuda" and tests_env["TRITON_INTERPRET"] is None
    assert tests_cmd[-1] == "-x" and f"--junitxml={tmp_path / 'tests.xml'}" in tests_cmd
    assert steps["bench"][0][2:] == ["benchmarks.gpu", "--out", str(tmp_path)]
    train = steps["train"][0]
    assert train[2:8] == ["rlkern.train", "grpo", "--device", "cuda", "--steps", "3"]
    assert all(cmd[0] == sys.executable for cmd, _ in steps.values())


def test_run_logs_every_step_and_fails_when_one_fails(tmp_path, monkeypatch):
    py = sys.executable
    fake = [("build", [py, "-c", "print('built')"], {}),
            ("tests", [py, "-c", "import os, sys; print(os.environ['X']); sys.exit(3)"], {"X": "seen"}),
            ("bench", [py, "-c", "import os; assert 'TRITON_INTERPRET' not in os.environ"],
             {"TRITON_INTERPRET": None})]
    monkeypatch.setattr(gpu_check, "steps", lambda out, args: fake)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gpu_check.run(tmp_path, []) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["step"], s["rc"]) for s in summary["steps"]] == [("build", 0), ("tests", 3), ("bench", 0)]
    assert summary["ok"] is False
    assert "built" in (tmp_path / "build.log").read_text() and "seen" in (tmp_path / "tests.log").read_text()
    assert gpu_check.run(tmp_path / "again", [], only=["build"]) == 0


def test_benchmark_plan_is_the_issue_table():
    cases = gpu.plan()
    shapes = {(c.op, c.mode, c.shape) for c in cases}
    for op in ("logprobs", "entropy"):
        for mode in ("fwd", "fwd+bwd"):
            assert {(op, mode, "8192x151936 bfloat16"), (op, mode, "16384x32768 float32")} <= shapes
    assert ("linear_logprobs", "fwd+bwd", "N=8192 H=4096 V=151936 bfloat16") in shapes
    for op, mode in (("gae", "fwd"), ("masked_whiten", "fwd"), ("policy_loss", "fwd+bwd"),
                     ("grpo_loss", "fwd+bwd")):
        assert (op, mode, "512x8192 fp32, float mask") in shapes
    for c in cases:
        kinds = [i.kind for i in c.impls]
        assert kinds[:3] == ["rlkern", "eager", "compile"], (c.op, kinds)
        assert (c.flops > 0) == (c.op == "linear_logprobs") and (c.bytes > 0) != (c.flops > 0)
        for impl in c.impls:  # a peer that is not installed is a row that says why
            assert (impl.build is None) == bool(impl.why_not)
    peers_of = {c.op: {i.kind for i in c.impls} for c in cases}
    assert {"liger", "flash-attn"} <= peers_of["logprobs"] and "liger" in peers_of["linear_logprobs"]


def test_every_eager_and_rlkern_implementation_runs_on_small_cpu_inputs():
    """The benchmark's calls are wired right: each runs once (on the suite's device); forward rlkern
    matches the eager peer."""
    torch.manual_seed(0)
    for case in gpu.plan(device=str(DEVICE), small=True):
        tensors = case.inputs()
        outs = {}
        for impl in case.impls:
            if impl.build is None or impl.kind == "compile":  # compiling ~15 graphs on CPU: minutes
                continue
            out = impl.build(tensors)()
            outs[impl.kind] = out[0] if isinstance(out, tuple) else out
        if case.mode == "fwd":
            ours, theirs = outs["rlkern"].float(), outs["eager"].float()
            tol = 1e-4
            logits = tensors.get("logits")
            if logits is not None and logits.dtype == torch.bfloat16:
                # the eager peer rounds softmax, logsumexp and its output to bf16: a few u * max|z|
                tol = 8 * 2.0**-8 * logits.float().abs().max().item()
            torch.testing.assert_close(ours, theirs, atol=tol, rtol=1e-4, msg=f"{case.op} {case.shape}")
