"""The GPU benchmark of `make gpu-check`: every implementation of each op side by side, one run, one
CUDA device.

    python -m benchmarks.gpu --out DIR        # DIR/bench.json, DIR/bench.md
    python -m benchmarks.gpu --dry-run        # the plan (cases x implementations), no GPU needed

Cases (the table of issue #8): logprobs / entropy forward and forward+backward at 8192 x 151936
bf16 and 16384 x 32768 fp32; linear_logprobs forward+backward at N=8192, H=4096, V=151936 bf16;
gae / masked_whiten / policy_loss / grpo_loss at 512 x 8192 with float masks (what verl passes).

Implementations: rlkern (the Triton backend), torch eager (the peers' formulations in
benchmarks/peers.py), torch.compile of the same maths, Liger-Kernel and flash-attn's Triton
cross-entropy when importable (a row saying why when not).

Columns: median ms (CUDA events, L2 flushed between calls: triton.testing.do_bench), GB/s of the
bytes the case must move (TFLOP/s of the three GEMMs for linear_logprobs), % of the floor, and the
extra peak of torch.cuda.max_memory_allocated over what was live before the call. The floor of a
memory-bound case is its bytes at the bandwidth of a device-to-device copy measured in the same
run; the floor of linear_logprobs is torch.matmul running its three GEMMs. Bytes counted: logits
forward = one read; forward+backward = two reads and one write of d logits; RL maths = each [B, T]
input read once and each [B, T] output (advantages and returns, whitened x, d logp) written once.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks import peers

GAMMA, LAM = 1.0, 0.95
COPY_BYTES = 1 << 30  # the copy that measures bandwidth moves 2 GiB (read 1 GiB, write 1 GiB)


@dataclass
class Impl:
    name: str
    kind: str  # rlkern | eager | compile | liger | flash-attn | floor
    build: Callable[[dict], Callable[[], object]] | None  # inputs -> the call to time; None = unavailable
    why_not: str = ""


@dataclass
class Case:
    op: str
    shape: str
    mode: str  # fwd | fwd+bwd
    inputs: Callable[[], dict]  # builds the tensors on the current CUDA device
    impls: list[Impl]
    bytes: int = 0  # the traffic of the memory floor (0 for a compute-bound case)
    flops: float = 0.0  # for a compute-bound case: the GEMMs of the floor


@dataclass
class Row:
    op: str
    shape: str
    mode: str
    impl: str
    kind: str
    ms: float | None = None
    rate: float | None = None  # GB/s or TFLOP/s
    unit: str = ""
    pct_floor: float | None = None
    peak_mib: float | None = None
    note: str = ""


# ---------------------------------------------------------------------------------------------
# the peers that are separate packages (pure-Python wheels of Triton kernels)
# ---------------------------------------------------------------------------------------------


def _import(module: str, name: str):
    """(object, None) or (None, why not)."""
    try:
        mod = __import__(module, fromlist=[name])
        return getattr(mod, name), None
    except Exception as err:  # noqa: BLE001 (ImportError, or a Triton / CUDA mismatch while importing)
        return None, f"{module}.{name} not importable ({type(err).__name__}: {str(err)[:120]})"


@functools.cache
def _liger_module(name: str, **kwargs):
    cls, why = _import(*name.rsplit(".", 1))
    if cls is None:
        raise ImportError(why)
    return cls(**kwargs)


def _liger_logprobs(logits, labels):
    """Liger-Kernel's LigerCrossEntropyLoss(reduction="none"): -log p(label) per token. Its forward
    also computes the gradient (into the logits buffer), so forward-only is the fused cost."""
    return -_liger_module("liger_kernel.transformers.cross_entropy.LigerCrossEntropyLoss",
                          reduction="none")(logits, labels)


def _flash_logprobs(logits, labels):
    """flash-attn's Triton cross-entropy (flash_attn/ops/triton/cross_entropy.py): per-token losses."""
    fn, _ = _import("flash_attn.ops.triton.cross_entropy", "cross_entropy_loss")
    return -fn(logits, labels)[0]


def _liger_linear(hidden, weight, labels):
    """Liger's LigerFusedLinearCrossEntropyLoss (chunked GEMM + CE; gradients computed in the forward)."""
    loss_cls = "liger_kernel.transformers.fused_linear_cross_entropy.LigerFusedLinearCrossEntropyLoss"
    return _liger_module(loss_cls, reduction="sum")(weight, hidden, labels)


def _peer_impls(kind_fns: list[tuple[str, str, str, str, Callable]]) -> list[Impl]:
    impls = []
    for name, kind, module, attr, fn in kind_fns:
        _, why = _import(module, attr)
        impls.append(Impl(name, kind, None if why else fn, why or ""))
    return impls


# ---------------------------------------------------------------------------------------------
# the calls
# ---------------------------------------------------------------------------------------------


def _rlkern(fn):
    """Run an rlkern op on the Triton backend (forced, so a silent fallback cannot pass as rlkern)."""
    import rlkern

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with rlkern.use_backend("triton"):
            return fn(*args, **kwargs)

    return call


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _fwd(fn, *names, **kwargs):
    return lambda t: functools.partial(fn, *(t[n] for n in names), **kwargs)


def _fwd_bwd(fn, leaf: str, *names, **kwargs):
    """forward, then backward of sum(out * w) (or of the scalar loss) to the leaf input."""
    def build(t):
        x = t[leaf].detach().requires_grad_(True)
        args = [x if n == leaf else t[n] for n in names]
        w = t.get("grad_out")

        def call():
            x.grad = None
            out = fn(*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            (out * w if out.dim() else out).sum().backward()
        return call
    return build


def _logits_inputs(n, v, dtype, device):
    def make():
        logits = torch.randn(n, v, device=device, dtype=torch.float32).mul_(3).to(dtype)
        return {"logits": logits, "labels": torch.randint(0, v, (n,), device=device),
                "grad_out": torch.randn(n, device=device)}
    return make


def _build_for(wrap, args):
    if wrap is None:
        return lambda f: _fwd_bwd(f, "logits", *args)
    return lambda f: wrap(f, *args)


def logprobs_cases(device: str = "cuda", small: bool = False) -> list[Case]:
    import rlkern

    cases = []
    sizes = ((8192, 151936, torch.bfloat16), (16384, 32768, torch.float32))
    for n, v, dtype in ((4, 37, d) for _, _, d in sizes) if small else sizes:
        nv = n * v * dtype.itemsize
        label = f"{n}x{v} {str(dtype).removeprefix('torch.')}"
        for op in ("logprobs", "entropy"):
            ours = getattr(rlkern.ops, op)
            eager = peers.naive_logprobs if op == "logprobs" else peers.naive_entropy
            maths = peers.math_logprobs if op == "logprobs" else peers.math_entropy
            args = ("logits", "labels") if op == "logprobs" else ("logits",)
            # forward: one read of the logits; forward+backward: read, read again, write d logits
            for mode, traffic, wrap in (("fwd", nv, _fwd), ("fwd+bwd", 3 * nv, None)):
                build = _build_for(wrap, args)
                impls = [Impl("rlkern (triton)", "rlkern", build(_rlkern(ours))),
                         Impl("torch eager (log_softmax + gather)" if op == "logprobs"
                              else "torch eager (verl entropy_from_logits)", "eager", build(eager)),
                         Impl("torch.compile (same maths, fp32)", "compile", build(_compiled(maths)))]
                if op == "logprobs":
                    impls += _peer_impls([
                        ("Liger cross_entropy (reduction=none)", "liger",
                         "liger_kernel.transformers.cross_entropy", "LigerCrossEntropyLoss",
                         build(_liger_logprobs)),
                        ("flash-attn triton cross_entropy", "flash-attn",
                         "flash_attn.ops.triton.cross_entropy", "cross_entropy_loss",
                         build(_flash_logprobs))])
                cases.append(Case(op, label, mode, _logits_inputs(n, v, dtype, device), impls, bytes=traffic))
    return cases


def linear_cases(device: str = "cuda", small: bool = False) -> list[Case]:
    import rlkern

    n, h, v, dtype = (5, 32, 70, torch.float32) if small else (8192, 4096, 151936, torch.bfloat16)

    def make():
        return {"hidden": torch.randn(n, h, device=device, dtype=dtype),
                "weight": (torch.randn(v, h, device=device) / math.sqrt(h)).to(dtype),
                "labels": torch.randint(0, v, (n,), device=device), "grad_out": torch.randn(n, device=device)}

    def both_leaves(fn, scalar=False):
        def build(t):
            hid = t["hidden"].detach().requires_grad_(True)
            wt = t["weight"].detach().requires_grad_(True)

            def call():
                hid.grad = wt.grad = None
                out = fn(hid, wt, t["labels"])
                (out if scalar else out * t["grad_out"]).sum().backward()
            return call
        return build

    impls = [Impl("rlkern (triton)", "rlkern", both_leaves(_rlkern(rlkern.ops.linear_logprobs))),
             Impl("torch eager (logits [N, V], fp32 log_softmax)", "eager",
                  both_leaves(peers.naive_linear_logprobs)),
             Impl("torch.compile (same maths)", "compile",
                  both_leaves(_compiled(peers.naive_linear_logprobs)))]
    impls += _peer_impls([("Liger fused_linear_cross_entropy", "liger",
                           "liger_kernel.transformers.fused_linear_cross_entropy",
                           "LigerFusedLinearCrossEntropyLoss", both_leaves(_liger_linear, scalar=True))])
    # hidden @ W^T (logits), d logits @ W (d hidden), d logits^T @ hidden (d weight)
    label = f"N={n} H={h} V={v} {str(dtype).removeprefix('torch.')}"
    return [Case("linear_logprobs", label, "fwd+bwd", make, impls, flops=3 * 2.0 * n * h * v)]


def rlmath_cases(device: str = "cuda", small: bool = False) -> list[Case]:
    import rlkern

    b, t = (3, 16) if small else (512, 8192)
    tok = b * t * 4  # one [B, T] fp32 tensor

    def make():
        lengths = torch.randint(t // 2, t + 1, (b, 1), device=device)
        mask = (torch.arange(t, device=device)[None, :] < lengths).float()  # float masks, as verl passes
        logp = -torch.rand(b, t, device=device) * 3
        return {"mask": mask, "logp": logp, "old": logp + 0.1 * torch.randn_like(logp),
                "ref": logp + 0.1 * torch.randn_like(logp), "adv": torch.randn(b, t, device=device),
                "adv_seq": torch.randn(b, device=device), "values": torch.randn(b, t, device=device),
                "rewards": torch.randn(b, t, device=device)}

    ops = rlkern.ops
    label = f"{b}x{t} fp32, float mask"
    specs = [
        # bytes: inputs read once and outputs written once (losses: d logp written, scalars ignored)
        ("gae", "fwd", 5 * tok,
         (_rlkern(ops.gae), ("rewards", "values", "mask"), {"gamma": GAMMA, "lam": LAM}),
         ("verl loop over T", peers.verl_gae_loop, ("rewards", "values", "mask"),
          {"gamma": GAMMA, "lam": LAM}),
         ("torch.compile (associative scans)", peers.math_gae, ("rewards", "values", "mask"), (GAMMA, LAM))),
        ("masked_whiten", "fwd", 3 * tok, (_rlkern(ops.masked_whiten), ("adv", "mask"), {}),
         ("verl masked_whiten", peers.verl_masked_whiten, ("adv", "mask"), {}), None),
        ("policy_loss", "fwd+bwd", 5 * tok, (_rlkern(ops.policy_loss), ("logp", "old", "adv", "mask"),
                                              {"dual_clip": 3.0}),
         ("verl compute_policy_loss_vanilla", peers.verl_policy_loss, ("old", "logp", "adv", "mask"), {}),
         None),
        ("grpo_loss", "fwd+bwd", 5 * tok, (_rlkern(ops.grpo_loss), ("logp", "old", "ref", "adv_seq", "mask"),
                                            {"beta": 0.04}),
         ("TRL GRPOTrainer._compute_loss", peers.trl_grpo_loss,
          ("logp", "old", "ref", "adv_seq", "mask"), {}),
         None),
    ]
    cases = []
    for op, mode, traffic, (ours, our_args, our_kw), (peer_name, peer, peer_args, peer_kw), comp in specs:
        def build(f, names, kw, mode=mode):
            return _fwd(f, *names, **kw) if mode == "fwd" else _fwd_bwd(f, "logp", *names, **kw)
        impls = [Impl("rlkern (triton)", "rlkern", build(ours, our_args, our_kw)),
                 Impl(f"torch eager ({peer_name})", "eager", build(peer, peer_args, peer_kw))]
        if comp is not None:
            name, fn, names, extra = comp
            impls.append(Impl(name, "compile", lambda tt, fn=fn, names=names, extra=extra: functools.partial(
                _compiled(fn), *(tt[n] for n in names), *extra)))
        else:
            impls.append(Impl("torch.compile (the eager peer)", "compile",
                              build(_compiled(peer), peer_args, peer_kw)))
        cases.append(Case(op, label, mode, make, impls, bytes=traffic))
    return cases


def plan(device: str = "cuda", small: bool = False) -> list[Case]:
    """Every case and implementation of the run. Builds no tensors (that is Case.inputs), so it also
    works without a GPU; ``small`` swaps in tiny shapes (the CPU smoke test runs those)."""
    return logprobs_cases(device, small) + linear_cases(device, small) + rlmath_cases(device, small)


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------


def _bench(call: Callable[[], object]) -> tuple[float, float]:
    """(median ms, extra peak MiB) of call() on the current device."""
    from triton.testing import do_bench

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()  # also the warm-up that compiles (Triton JIT, torch.compile)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    ms = do_bench(call, warmup=25, rep=100, return_mode="median")
    return float(ms), peak


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (a copy reads and writes COPY_BYTES each)."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms, _ = _bench(lambda: dst.copy_(src))
    return 2 * COPY_BYTES / (ms * 1e-3)


def _matmul_floor(t: dict) -> Callable[[], object]:
    hidden, weight = t["hidden"], t["weight"]
    dlogits = torch.empty(hidden.shape[0], weight.shape[0], device="cuda", dtype=hidden.dtype)

    def call():
        torch.matmul(hidden, weight.t(), out=dlogits)
        torch.matmul(dlogits, weight)
        torch.matmul(dlogits.t(), hidden)
    return call


def run_case(case: Case, bandwidth: float) -> list[Row]:
    rows = []
    tensors = case.inputs()
    if case.flops:
        ms, peak = _bench(_matmul_floor(tensors))
        floor_ms = ms
        rows.append(Row(case.op, case.shape, case.mode, "floor: torch.matmul x3 (the GEMMs)", "floor", ms,
                        case.flops / ms / 1e9, "TFLOP/s", 100.0, peak))
    else:
        floor_ms = case.bytes / bandwidth * 1e3
        rows.append(Row(case.op, case.shape, case.mode, "floor: bytes at copy bandwidth", "floor", floor_ms,
                        bandwidth / 1e9, "GB/s", 100.0))
    for impl in case.impls:
        row = Row(case.op, case.shape, case.mode, impl.name, impl.kind)
        if impl.build is None:
            row.note = impl.why_not
        else:
            try:
                ms, peak = _bench(impl.build(tensors))
            except Exception as err:  # noqa: BLE001 (one failing peer must not lose the rest of the table)
                row.note = f"failed: {type(err).__name__}: {str(err)[:200]}"
            else:
                row.ms, row.peak_mib, row.pct_floor = ms, peak, 100.0 * floor_ms / ms
                row.rate, row.unit = ((case.flops / ms / 1e9, "TFLOP/s") if case.flops
                                      else (case.bytes / ms / 1e6, "GB/s"))
        rows.append(row)
        torch.cuda.empty_cache()
    del tensors
    torch.cuda.empty_cache()
    return rows


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown(rows: list[Row]) -> str:
    out, last = [], None
    for r in rows:
        if (r.op, r.shape, r.mode) != last:
            last = (r.op, r.shape, r.mode)
            out += ["", f"### {r.op} {r.mode}, {r.shape}", "",
                    "| implementation | ms | rate | % of floor | extra peak MiB | note |",
                    "|---|---:|---:|---:|---:|---|"]
        out.append(f"| {r.impl} | {_fmt(r.ms, '.3f')} | {_fmt(r.rate, '.1f')} {r.unit if r.rate else ''} | "
                   f"{_fmt(r.pct_floor, '.0f')} | {_fmt(r.peak_mib, '.0f')} | {r.note} |")
    return "\n".join(out).strip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="rlkern GPU benchmark (see the module docstring)")
    parser.add_argument("--out", type=Path, help="directory for bench.json and bench.md")
    parser.add_argument("--only", default="", help="run only ops whose name starts with this")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    args = parser.parse_args(argv)
    cases = [c for c in plan() if c.op.startswith(args.only)]
    if args.dry_run:
        for c in cases:
            print(f"{c.op} {c.mode} {c.shape}: " + "; ".join(
                i.name + ("" if i.build else f" [skipped: {i.why_not}]") for i in c.impls))
        return 0
    if not torch.cuda.is_available():
        print("benchmarks.gpu needs a CUDA device (torch.cuda.is_available() is False)")
        return 2
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    rows = []
    for case in cases:
        rows += run_case(case, bandwidth)
        print(markdown([r for r in rows if (r.op, r.shape, r.mode) == (case.op, case.shape, case.mode)]),
              flush=True)
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "copy_bandwidth_GBs": bandwidth / 1e9}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {"meta": meta, "rows": [asdict(r) for r in rows]}
        (args.out / "bench.json").write_text(json.dumps(payload, indent=1))
        (args.out / "bench.md").write_text(f"{meta}\n\n" + markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
