"""Every Triton kernel the ops launch compiles for sm_80 and sm_90 with the real compiler, spills no
registers and fits the architecture's shared memory; no GPU needed (Triton's wheel ships ptxas and
cuobjdump). The compiling happens in a subprocess, tests/gpu_compile.py, because this process runs
with TRITON_INTERPRET=1, which replaces triton.language. It prints the table of registers, shared
memory and stack per kernel. About three minutes on two idle cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import gpu_compile

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "triton-cache")  # fresh, so the compiler itself answers
    proc = subprocess.run([sys.executable, "-m", "tests.gpu_compile", "--json", str(out / "report.json")],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    path = out / "report.json"
    assert path.exists(), (f"the compile check did not finish (rc {proc.returncode}):\n"
                           f"{proc.stdout}\n{proc.stderr}")
    return json.loads(path.read_text())


def test_every_launch_compiles_without_spills(report, capsys):
    with capsys.disabled():
        print("\n" + gpu_compile.table(report))
    assert {r["arch"] for r in report["results"]} == set(gpu_compile.ARCHS)
    bad = gpu_compile.problems(report)
    assert not bad, "\n".join(bad)


def test_every_jit_function_in_kernels_is_launched_or_called(report):
    """A kernel the launcher matrix never reaches would escape the check: every @triton.jit function
    of every file in kernels/ is either launched by it or called from a launched kernel."""
    files = sorted(p.stem for p in (ROOT / "kernels").glob("*.py") if p.stem != "__init__")
    assert files == sorted(gpu_compile.KERNEL_MODULES)
    in_source = {f"{p.stem}.{name}" for p in (ROOT / "kernels").glob("*.py")
                 for name in re.findall(r"@triton\.jit[^\n]*\ndef (\w+)", p.read_text())}
    assert in_source == set(report["kernels"])
    assert set(report["launched"]) | set(report["helpers"]) == in_source
    assert not set(report["launched"]) & set(report["helpers"])


def test_every_constexpr_code_a_kernel_branches_on_is_compiled(report):
    """`if KIND == 3:` in a kernel is a specialisation of its own: each such code (loss kinds, KL
    estimators) appears in at least one compiled launch of that file's kernels."""
    for path in sorted((ROOT / "kernels").glob("*.py")):
        text = path.read_text()
        constexprs = set(re.findall(r"\b(\w+): tl\.constexpr", text))
        for name, value in sorted(set(re.findall(r"\b([A-Z][A-Z0-9_]*) == (\d+)\b", text))):
            if name not in constexprs:  # a runtime value or a comment, not a specialisation
                continue
            assert any(r["kernel"].startswith(path.stem + ".")
                       and re.search(rf"[\[,]{name}={value}[,;\]]", r["what"])
                       for r in report["results"]), f"{path.name}: no compiled launch with {name}={value}"


# Interpreter-only: set by the launchers only under TRITON_INTERPRET=1 (see kernels/lm_head.py).
INTERPRETER_ONLY = {"DOT_FP32"}


def test_every_boolean_switch_is_compiled_both_ways(report):
    """A new on/off constexpr whose other side no launch in the matrix reaches would escape the check."""
    seen: dict[tuple[str, str], set[str]] = {}
    for r in report["results"]:
        for name, value in re.findall(r"([A-Z][A-Z0-9_]*)=(True|False)", r["what"]):
            seen.setdefault((r["kernel"], name), set()).add(value)
    assert seen
    for (kernel, name), values in sorted(seen.items()):
        expected = {"False"} if name in INTERPRETER_ONLY else {"True", "False"}
        assert values == expected, f"{kernel}: {name} compiled only as {sorted(values)}"


def test_block_and_warp_choices_of_every_vocabulary_size_are_compiled(report):
    """The logprobs launcher picks BLOCK_V and warps from V: each choice for the issue's sizes is in."""
    from triton import next_power_of_2

    seen = {(r["arch"], re.search(r"BLOCK_V=(\d+)", r["what"]).group(1), r["what"].rsplit(" w", 1)[1])
            for r in report["results"] if r["kernel"] == "logits._logprobs_fwd_kernel"}
    for vocab in gpu_compile.VOCABS:
        block = min(next_power_of_2(vocab), 4096)
        warps = 4 if block <= 1024 else 8 if block <= 2048 else 16
        for arch in gpu_compile.ARCHS:
            assert (arch, str(block), str(warps)) in seen


def test_fp32_dots_are_ieee_unless_tf32_is_asked(report):
    """On a GPU tl.dot defaults to TF32 for fp32 operands (~1e-3 relative error); the linear kernels
    ask for IEEE fp32 unless precision="tf32". Read from the PTX: TF32 instructions or none."""
    fp32 = [r for r in report["results"]
            if r["kernel"].startswith("lm_head.") and r["ok"] and not re.search(r"\*(bf|fp)16", r["what"])]
    assert {"PRECISION=ieee" in r["what"] for r in fp32} == {True, False}
    for r in fp32:
        assert r["tf32"] == ("PRECISION=tf32" in r["what"]), r["what"]


def test_problems_flags_failures_spills_and_shared_memory():
    ok = {"kernel": "k.a", "arch": 80, "what": "k.a[]", "ok": True, "reg": 40, "stack": 0, "local": 0,
          "smem": 0}
    report = {"kernels": ["k.a", "k.b", "k.h"], "helpers": ["k.h"], "launched": ["k.a"],
              "smem_limit": {"80": 1000},
              "results": [ok, {**ok, "stack": 16}, {**ok, "smem": 1001},
                          {**ok, "ok": False, "error": "CompilationError: at 3:4\nmore"}]}
    bad = gpu_compile.problems(report)
    assert len(bad) == 4
    assert "spills (stack 16 B" in bad[0] and "1001 B shared memory" in bad[1]
    assert bad[2].endswith("CompilationError: at 3:4") and "k.b: never launched" in bad[3]
