"""Benchmark section ``firstcall`` (issue #12): what the first call of an op costs in a fresh process.

One fresh subprocess per op family (``python -m benchmarks.firstcall --child FAMILY``): it imports
torch, then rlkern, builds small CPU inputs, and times the first call of the family's op, then the
first backward where the op has a gradient, then a second forward for comparison. It reports the
seconds of each, the growth of the resident set (RSS, from /proc/self/statm) over ``import rlkern``
and over the first call, and whether ``triton``, ``sympy`` and ``torch._dynamo`` are in
``sys.modules`` after ``import torch``, after ``import rlkern`` and after the calls. Target: first
call <= 0.3 s, and neither triton nor sympy imported.

This module imports only the standard library at the top: the child must measure a clean process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

SECTION = "firstcall"
# family -> the op whose first call is timed (one per module of rlkern/ops that holds a kernel op)
FAMILIES = {
    "logits": "logprobs",
    "lm_head": "linear_logprobs",
    "kl_penalty": "kl",
    "returns": "gae",
    "masked": "masked_whiten",
    "losses": "policy_loss",
    "advantages": "group_advantages",
    "dpo": "dpo_loss",
}
WATCHED = ("triton", "sympy", "torch._dynamo")
TARGET_S = 0.3
SHAPES = {"full": list(FAMILIES), "quick": list(FAMILIES)}


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # not Linux: peak RSS instead (KiB on Linux, bytes on macOS)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _loaded() -> dict[str, bool]:
    return {name: name in sys.modules for name in WATCHED}


def _inputs(family: str):
    """(call, differentiable leaf or None): the op's first call on small CPU tensors (fp32 masks,
    verl's), built before the clock starts."""
    import torch

    import rlkern

    ops = rlkern.ops
    g = torch.Generator().manual_seed(0)
    b, t, v, h = 8, 32, 64, 16
    mask = (torch.arange(t).unsqueeze(0) < torch.randint(t // 2, t + 1, (b, 1), generator=g)).float()
    logp = (-torch.rand(b, t, generator=g) * 3).requires_grad_(True)
    x = torch.randn(b, t, generator=g)
    if family == "logits":
        logits = torch.randn(b, t, v, generator=g).requires_grad_(True)
        labels = torch.randint(0, v, (b, t), generator=g)
        return (lambda: ops.logprobs(logits, labels)), logits
    if family == "lm_head":
        hidden = torch.randn(b * t, h, generator=g).requires_grad_(True)
        weight = torch.randn(v, h, generator=g)
        labels = torch.randint(0, v, (b * t,), generator=g)
        return (lambda: ops.linear_logprobs(hidden, weight, labels)), hidden
    if family == "kl_penalty":
        ref = logp.detach() + 0.1
        return (lambda: ops.kl(logp, ref, "k3", clamp=True)), logp
    if family == "returns":
        return (lambda: ops.gae(x, torch.zeros_like(x), mask, gamma=1.0, lam=0.95)), None
    if family == "masked":
        xs = x.clone().requires_grad_(True)
        return (lambda: ops.masked_whiten(xs, mask)), xs
    if family == "losses":
        old, adv = logp.detach() + 0.05, torch.randn(b, t, generator=g)
        return (lambda: ops.policy_loss(logp, old, adv, mask)), logp
    if family == "advantages":
        scores = torch.randn(b * 4, generator=g)
        return (lambda: ops.group_advantages(scores, group_size=4)), None
    if family == "dpo":
        chosen = torch.randn(b, generator=g).requires_grad_(True)
        rest = [torch.randn(b, generator=g) for _ in range(3)]
        return (lambda: ops.dpo_loss(chosen, *rest)), chosen
    raise ValueError(f"unknown family {family!r}; choose from {tuple(FAMILIES)}")


def child(family: str) -> dict:
    """Runs in the fresh process: the measurements, as one JSON-able dict."""
    out = {"family": family, "op": FAMILIES[family]}
    rss0 = _rss_mb()
    start = time.perf_counter()
    import torch

    out["import_torch_s"] = time.perf_counter() - start
    out["after_import_torch"] = _loaded()
    rss1 = _rss_mb()
    start = time.perf_counter()
    import rlkern  # noqa: F401

    out["import_rlkern_s"] = time.perf_counter() - start
    rss2 = _rss_mb()
    out["after_import_rlkern"] = _loaded()
    call, leaf = _inputs(family)
    rss3 = _rss_mb()
    start = time.perf_counter()
    result = call()
    out["first_call_s"] = time.perf_counter() - start
    rss4 = _rss_mb()
    out["after_first_call"] = _loaded()
    out["first_backward_s"] = None
    if leaf is not None:
        loss = result[0] if isinstance(result, tuple) else result
        start = time.perf_counter()
        torch.autograd.grad(loss.sum(), leaf)
        out["first_backward_s"] = time.perf_counter() - start
    start = time.perf_counter()
    call()
    out["second_call_s"] = time.perf_counter() - start
    out["after_all"] = _loaded()
    out["rss_torch_mb"] = rss1 - rss0
    out["rss_import_rlkern_mb"] = rss2 - rss1
    out["rss_first_call_mb"] = rss4 - rss3
    out["rss_total_mb"] = _rss_mb() - rss1  # import rlkern + inputs + every call
    out["threads"] = torch.get_num_threads()
    return out


def measure(family: str, *, timeout_s: float = 300.0) -> dict:
    """Runs ``child(family)`` in a fresh interpreter (same Python, same environment minus any
    RLKERN_BACKEND override, so the default backend runs) and returns its record."""
    env = {k: v for k, v in os.environ.items() if k != "RLKERN_BACKEND"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.firstcall", "--child", family], cwd=root,
                          env=env, capture_output=True, text=True, timeout=timeout_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"family": family, "op": FAMILIES[family], "error": f"exit {proc.returncode}: {tail}"[:200]}
    return json.loads(lines[-1])


def _yes(flags: dict, name: str) -> str:
    return "yes" if flags.get(name) else "no"


def markdown_table(records: list[dict]) -> str:
    lines = ["### First call in a fresh process (CPU tensors, default backend)", "",
             "| family | op | import rlkern s | first call s | first backward s | second call ms | "
             "RSS import rlkern MB | RSS first call MB | triton | sympy | torch._dynamo | target |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    for r in records:
        if r.get("error"):
            lines.append(f"| {r['family']} | {r['op']} | failed: {r['error'].replace('|', '/')} "
                         "| | | | | | | | | |")
            continue
        flags = r["after_all"]
        met = r["first_call_s"] <= TARGET_S and not flags["triton"] and not flags["sympy"]
        bwd = f"{r['first_backward_s']:.3f}" if r["first_backward_s"] is not None else ""
        lines.append(
            f"| {r['family']} | {r['op']} | {r['import_rlkern_s']:.2f} | {r['first_call_s']:.3f} | {bwd} | "
            f"{1e3 * r['second_call_s']:.2f} | {r['rss_import_rlkern_mb']:.1f} | "
            f"{r['rss_first_call_mb']:.1f} | "
            f"{_yes(flags, 'triton')} | {_yes(flags, 'sympy')} | {_yes(flags, 'torch._dynamo')} | "
            f"{'met' if met else 'MISSED'} |")
    ok = [r for r in records if not r.get("error")]
    torch_flags = {name: any(r["after_import_torch"][name] for r in ok) for name in WATCHED}
    already = [n for n, v in torch_flags.items() if v]
    lines += ["", "One fresh `python` per row: `import torch`, `import rlkern`, then the op's first call "
                  "on small CPU tensors (B=8, T=32, fp32 mask), its first backward, a second call. "
                  "triton / sympy / torch._dynamo: in sys.modules after all of it"
                  + (f" ({', '.join(already)} already after `import torch` alone)" if already else "")
                  + f". Target: first call <= {TARGET_S} s and neither triton nor sympy imported."]
    return "\n".join(lines)


def run_section(*, quick: bool = False, cfg=None, shapes=None, log=print) -> tuple[str, list[dict]]:
    """The report's entry point: (markdown table, JSON records); ``shapes`` is a list of family
    names (default: all of ``FAMILIES``)."""
    families = list(shapes or FAMILIES)
    records = []
    for fam in families:
        rec = measure(fam)
        records.append(rec)
        if rec.get("error"):
            log(f"  {fam}: failed: {rec['error']}")
        else:
            log(f"  {fam:<12} {rec['op']:<18} first call {rec['first_call_s']:.3f} s, "
                f"+{rec['rss_first_call_mb']:.1f} MB, modules {rec['after_all']}")
    return markdown_table(records), records


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--child":
        print(json.dumps(child(argv[1])))
        return 0
    table, _ = run_section()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
