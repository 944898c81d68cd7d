"""Compile every Triton kernel the ops launch for real NVIDIA targets, with no GPU present.

    python -m tests.gpu_compile [--arch 80 90] [--jobs 2] [--json out.json]

How the launches are found: the launchers in rlkern.kernels are called with meta tensors (shapes and
dtypes, no storage) over the matrix in `_drive_launchers`: every dtype, constexpr switch and the
vocabulary sizes 7, 4097, 32768, 151936 and 262144. `JITFunction.run` is replaced by a recorder,
so the block sizes, warp counts and switches are the ones the launchers' own code picks. Each
launch is then specialised exactly as Triton's JIT would specialise it (its binder: pointer
alignment, integers equal to 1 or divisible by 16) and compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`; Triton's wheel ships ptxas
and cuobjdump, so this needs no GPU and no CUDA toolkit. Registers, stack (spills), local memory
and shared memory are read from the cubin with `cuobjdump --dump-resource-usage`.

It must run in a process without TRITON_INTERPRET (the interpreter replaces triton.language) and
with a fresh TRITON_CACHE_DIR (a cached kernel would answer instead of the compiler): `main`
refuses otherwise. tests/test_gpu_compile.py runs it in a subprocess; .ci/run runs it again with the
oldest Triton of the supported range.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import importlib
import inspect
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time

KERNEL_MODULES = ("kl_penalty", "lm_head", "logits", "losses", "masked", "returns", "rollout_correction",
                  "token_selection")
ARCHS = (80, 90)
# Largest shared memory one block may use (the opt-in maximum): A100 (sm_80) 163 KiB, H100 (sm_90)
# 227 KiB (CUDA C Programming Guide, "Compute Capabilities", table 23).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
VOCABS = (7, 4097, 32768, 151936, 262144)


def _mask_dtypes():
    import torch

    return (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.bfloat16, torch.float16)


def _torch_dtypes():
    import torch

    return (torch.float32, torch.bfloat16, torch.float16)


def _meta(shape, dtype=None):
    import torch

    return torch.empty(shape, device="meta", dtype=dtype or torch.float32)


def _drive_launchers(modules) -> None:
    """Calls every launcher over the configurations the ops use (see rlkern/ops/<family>.py for
    what each op passes); each kernel launch lands in the recorder."""
    import torch

    lp, llp, kl, gae, masked, losses = (modules[m] for m in
                                        ("logits", "lm_head", "kl_penalty", "returns", "masked", "losses"))
    i64 = torch.int64
    MASK_DTYPES = _mask_dtypes()  # noqa: N806
    for dtype in _torch_dtypes():
        for vocab in VOCABS:
            # [outer, inner, V] row views: contiguous rows (inner = 1) and the logits[:, :-1] slice of
            # a [2, 4, V] batch (inner = 3, row strides 4V and V).
            for logits in (_meta((5, 1, vocab), dtype), _meta((2, 4, vocab), dtype)[:, :-1]):
                rows = logits.shape[0] * logits.shape[1]
                labels = _meta((rows,), i64)
                # sum p^2 and per-row temperatures (issue 13): with every output, and alone.
                fwd_specs = [(lab, ent, False, False) for lab in (True, False) for ent in (True, False)]
                fwd_specs += [(True, True, True, True), (False, False, True, False),
                              (True, False, False, True)]
                for has_labels, want_ent, want_p2, row_t in fwd_specs:
                    lp.logprobs_fwd(logits, labels if has_labels else None, 1.0,
                                    _meta((rows,)) if row_t else None, -100,
                                    _meta((rows,)) if has_labels else None, _meta((rows,)),
                                    _meta((rows,)) if want_ent else None, _meta((rows,)) if want_p2 else None)
                for grad_logp, grad_ent, row_t in ((True, False, False), (False, True, False),
                                                   (True, True, False), (True, True, True)):
                    grad = torch.empty_like(logits)
                    lp.logprobs_bwd(_meta((rows,)) if grad_logp else None,
                                    _meta((rows,)) if grad_ent else None,
                                    logits, labels if grad_logp else None, _meta((rows,)),
                                    _meta((rows,)) if grad_ent else None, 1.0,
                                    _meta((rows,)) if row_t else None, -100, grad)
        for vocab in VOCABS:
            for hidden_size in (24, 4096):  # BLOCK_H below and at its cap
                n = 300
                hidden, weight = _meta((n, hidden_size), dtype), _meta((vocab, hidden_size), dtype)
                labels, row = _meta((n,), i64), (_meta((n,)), _meta((n,)), _meta((n,)))
                for bias, precision in itertools.product((_meta((vocab,)), None), llp.PRECISIONS):
                    for want_ent in (True, False):
                        llp.linear_logprobs_fwd(hidden, weight, bias, labels, 1.0, -100, 0, want_ent,
                                                512, 4096,
                                                precision, row[0], row[1] if want_ent else None, row[2])
                    for grad_logp, grad_ent in ((True, False), (False, True), (True, True)):
                        llp.linear_logprobs_bwd(
                            _meta((n,)) if grad_logp else None, _meta((n,)) if grad_ent else None,
                            hidden, weight, bias, labels, row[0], row[1] if grad_ent else None,
                            1.0, -100, 0, 512, 4096, precision,
                            _meta((n, hidden_size)), _meta((vocab, hidden_size)),
                            _meta((vocab,)) if bias is not None else None)
                    # The options (per-row temperature, sum p^2) at their heaviest: all outputs.
                    llp.linear_logprobs_fwd(hidden, weight, bias, labels, 1.0, -100, 0, True, 512, 4096,
                                            precision, row[0], row[1], row[2], _meta((n,)), _meta((n,)))
                    llp.linear_logprobs_bwd(
                        _meta((n,)), _meta((n,)), hidden, weight, bias, labels, row[0], row[1], 1.0, -100, 0,
                        512, 4096, precision, _meta((n, hidden_size)), _meta((vocab, hidden_size)),
                        _meta((vocab,)) if bias is not None else None, _meta((n,)))
        for shape in ((3, 7), (8, 4096), (2, 5000)):
            x, mask, out = _meta(shape, dtype), _meta(shape, torch.bool), _meta(shape)
            from rlkern.codes import KL_ESTIMATORS

            for est in KL_ESTIMATORS.values():
                kl.kl_fwd(x, x, est, False, -10.0, 10.0, 10.0, out)
                for straight in (False, True):
                    for g in (out, _meta((1,))):  # a gradient per element, or one for all
                        kl.kl_bwd(g, x, x, est, straight, -10.0, 10.0, 10.0, torch.empty_like(x))
                # The mask in its own dtype: bool, and the float (verl) and int64 (TRL) masks.
                for m in (mask, _meta(shape), _meta(shape, i64)):
                    kl.token_rewards_fwd(_meta(shape[:1]), x, x, m, 0.1, est, -10.0, 10.0, 10.0, out)
            # Masks are read in their own dtype: each mask dtype is its own compiled kernel.
            for merge_all, m_dtype in itertools.product((True, False), MASK_DTYPES):
                m, stats = _meta(shape, m_dtype), (1,) if merge_all else shape[:1]
                saved2, saved4 = _meta((2, *stats), torch.float64), _meta((4, *stats), torch.float64)
                for kind in (0, 1, 2):  # sum, mean, var
                    masked.masked_stat_fwd(x, m, merge_all, kind, 1, False)
                    masked.masked_stat_bwd(_meta(stats), x, m, saved2, merge_all, kind, False)
                masked.masked_whiten_fwd(x, m, merge_all, True, 1, 1e-8, False)
                masked.masked_whiten_bwd(out, x, m, saved4, merge_all, False, False)
            # What rlkern/ops/losses.py passes: value_loss: per-token returns, no weights, no dual
            # clip; grpo_loss (both kinds): per-token or per-sequence advantages, optional weights,
            # no dual clip; policy_loss, and any kind added to kernels/losses.py later: everything.
            from rlkern.codes import LOSS_KINDS, LOSS_STATS

            for kind in LOSS_KINDS.values():
                value = kind == LOSS_KINDS["value"]
                grpo = kind in (LOSS_KINDS["grpo"], LOSS_KINDS["grpo_bc"])
                no_dual = value or grpo
                ref = x if grpo else None
                for adv in (x,) if value else (x, _meta(shape[:1], dtype)):
                    for weights in (None,) if value else (x, None):
                        for dual in (float("inf"),) if no_dual else (3.0, float("inf")):
                            # The mask in its own dtype: bool, float (verl) and int64 (TRL).
                            for m in (mask, _meta(shape), _meta(shape, i64)):
                                for per_row in (True, False):
                                    for saved in (None, _meta(shape)):  # x requires grad, or not
                                        losses.losses_fwd(x, x, adv, ref, weights, m, kind, 0.2, 0.2, dual,
                                                          0.04, 0.2, per_row, -1.0, _meta(()),
                                                          _meta((LOSS_STATS,)), _meta(shape[:1]), saved)
                                losses.losses_bwd(_meta(()), x, x, adv, ref, weights, m, _meta(shape[:1]),
                                                  kind, 0.2, 0.2, dual, 0.04, 0.2, torch.empty_like(x))
                                losses.losses_bwd_saved(_meta(()), _meta(shape), m, _meta(shape[:1]),
                                                        torch.empty_like(x))
            # The surrogate variants and ratio levels (issue 13) as rlkern/ops/losses.py passes them:
            # per-sequence advantages, weights, the float mask, x requiring grad; both backwards.
            from rlkern.codes import LOSS_VARIANTS, RATIO_LEVELS

            var, aux = LOSS_VARIANTS, _meta((shape[0], 2))
            combos = [(LOSS_KINDS["policy"], v) for v in var.values()] + [
                (k, v) for k in (LOSS_KINDS["grpo"], LOSS_KINDS["grpo_bc"])
                for v in (var["ppo"], var["cispo_cap"], var["sapo"], var["vespo"])]
            for (kind, v), level in itertools.product(combos, RATIO_LEVELS.values()):
                if v == var["ppo"] and level == RATIO_LEVELS["token"]:
                    continue  # the matrix above
                ref = x if kind != LOSS_KINDS["policy"] else None
                adv, m = _meta(shape[:1], dtype), _meta(shape)
                opts = (v, level, 1.5, 1.0, 1.05, aux)
                losses.losses_fwd(x, x, adv, ref, x, m, kind, 0.2, 0.2, float("inf"), 0.04, 0.2, True, -1.0,
                                  _meta(()), _meta((LOSS_STATS,)), _meta(shape[:1]), _meta(shape), *opts)
                losses.losses_bwd(_meta(()), x, x, adv, ref, x, m, _meta(shape[:1]), kind, 0.2, 0.2,
                                  float("inf"), 0.04, 0.2, torch.empty_like(x), *opts)
            losses.losses_bwd_saved(_meta(()), _meta(shape), _meta(shape), _meta(shape[:1]),
                                    torch.empty_like(x), aux)
            # The row-constant rows (sequence level, per-row advantages, no weights, no ref): no saved.
            losses.losses_bwd_saved(_meta(()), None, _meta(shape), _meta(shape[:1]), torch.empty_like(x), aux)
            # vespo's / gmpo's per-row input (row_in: vLLM IS log-sums / rollout-weight log means), with
            # per-token and per-sequence advantages, as rlkern/ops/losses.py passes them (gmpo: no weights).
            for (kind, v), adv in itertools.product(
                    [(LOSS_KINDS["grpo"], var["vespo"]), (LOSS_KINDS["grpo_bc"], var["vespo"]),
                     (LOSS_KINDS["policy"], var["gmpo"])], (x, _meta(shape[:1], dtype))):
                grpo = kind != LOSS_KINDS["policy"]
                ref, w = (x, x) if grpo else (None, None)
                opts = (v, RATIO_LEVELS["token"], float("inf"), 1.0, 1.05, aux, _meta(shape[:1]), 2.0, 3.0,
                        3.0, 2.0)
                losses.losses_fwd(x, x, adv, ref, w, _meta(shape), kind, 0.2, 0.2, float("inf"), 0.04, 0.2,
                                  False, -1.0, _meta(()), _meta((LOSS_STATS,)), _meta(shape[:1]),
                                  _meta(shape), *opts)
                losses.losses_bwd(_meta(()), x, x, adv, ref, w, _meta(shape), _meta(shape[:1]), kind, 0.2,
                                  0.2, float("inf"), 0.04, 0.2, torch.empty_like(x), *opts)
    for shape, m_dtype in itertools.product(((3, 7), (40, 4096)), MASK_DTYPES):  # GAE reads fp32 values only
        r, mask = _meta(shape), _meta(shape, m_dtype)
        gae.gae_fwd(r, r, mask, 0.99, 0.95, _meta(shape), _meta(shape))
        gae.discounted_returns_fwd(r, mask, 0.99, _meta(shape))
    _drive_rollout_correction(modules["rollout_correction"])
    _drive_token_selection(modules["token_selection"])


def _drive_rollout_correction(rc) -> None:
    """rlkern/ops/rollout_correction.py: the peers' conventions (level, mode, padding, bounds, clamp, gate
    as verl / TRL / OpenRLHF set them) and metrics-only calls (the kernel takes no rejection options),
    float32 log-probs and log-ratios, bool / float32 / int64 masks."""
    import torch

    nan = float("nan")
    conventions = (  # level, mode, padding, lower, upper, log_clamp, gate
        (1, 0, 0, nan, 2.0, 20.0, nan), (2, 0, 0, nan, 2.0, 20.0, nan), (1, 1, 0, 0.5, 2.0, 20.0, nan),
        (2, 1, 0, 0.5, 2.0, 20.0, nan), (1, 0, 1, 0.8, 1.5, nan, nan), (2, 1, 1, nan, 3.0, nan, nan),
        (1, 0, 2, 0.5, 1.2, nan, nan), (1, 1, 2, 0.8, 1.25, nan, nan), (1, 2, 2, nan, nan, nan, 0.9),
        (0, 0, 0, nan, nan, 20.0, nan))
    shape = (40, 4096)
    for m_dtype in (torch.bool, torch.float32, torch.int64):
        mask = _meta(shape, m_dtype)
        for level, mode, padding, lower, upper, clamp, gate in conventions:
            for rlp in (_meta(shape), None):
                rc.rollout_correction_fwd(_meta(shape), rlp, mask, level, mode, padding, lower, upper,
                                          clamp, gate, 1.1 if gate == gate else nan, [], [], [],
                                          _meta(shape) if level else None, None,
                                          _meta((shape[0], rc.K_STATS), torch.float64))
    # the weights alone (rollout_weights_fwd) in every log-prob storage type, and the trust-region gate
    # (trust_region_fwd: verl DPPO per-token / per-row advantages, OpenRLHF token / sequence gating)
    for lp_dtype, m_dtype in itertools.product(_torch_dtypes(), (torch.bool, torch.float32, torch.int64)):
        mask, lp = _meta(shape, m_dtype), _meta(shape, lp_dtype)
        for level, mode, padding, lower, upper, clamp, gate in conventions:
            for rlp in ((lp, None) if level else ()):
                rc.rollout_weights_fwd(lp, rlp, mask, level, mode, padding, lower, upper, clamp, gate,
                                       1.1 if gate == gate else nan, _meta(shape))
        for convention, divergence, level in itertools.product((0, 1), (0, 1), (1, 2)):
            if convention == 0 and level == 2:
                continue  # verl's DPPO is token-level
            for adv in ((_meta(shape), _meta((shape[0], 1))) if convention == 0 else (None,)):
                rc.trust_region_fwd(lp, lp, adv, mask, convention, divergence, level, 0.0, 0.2, 2.0,
                                    _meta(shape), _meta((shape[0], 3), torch.float64))



def _drive_token_selection(ts) -> None:
    """rlkern/ops/token_selection.py's KL-Cov token losses: every log-prob storage type and mask dtype,
    with and without weights, one-block rows and 4096-token rows."""
    import torch

    for dtype, m_dtype, shape in itertools.product(_torch_dtypes(), _mask_dtypes(), ((3, 7), (40, 4096))):
        x, mask, chosen = _meta(shape, dtype), _meta(shape, m_dtype), _meta(shape, torch.bool)
        for w in (None, _meta(shape)):
            ts.kl_cov_fwd(x, x, x, mask, w, 0.01, 0.1, chosen, _meta((3, shape[0])))
            ts.kl_cov_bwd(_meta(shape[:1]), x, x, x, mask, w, chosen, 0.1, _meta(shape, dtype))

def _load_modules():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile checks need TRITON_INTERPRET unset: the interpreter replaces "
                           "triton.language")
    return {name: importlib.import_module(f"rlkern.kernels.{name}") for name in KERNEL_MODULES}


def jit_functions(modules) -> dict[str, object]:
    """Every @triton.jit function defined in rlkern.kernels, by "module.name"."""
    from triton.runtime.jit import JITFunction

    found = {}
    for mod_name, mod in modules.items():
        for name, value in vars(mod).items():
            if isinstance(value, JITFunction) and value.fn.__module__ == mod.__name__:
                found[f"{mod_name}.{name}"] = value
    return found


def helpers_called(modules) -> set[str]:
    """JIT functions called by another JIT function of the same module (compiled into it, never
    launched themselves)."""
    funcs = jit_functions(modules)
    called = set()
    for key, fn in funcs.items():
        mod = key.split(".")[0]
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn.fn)))
        names = {node.func.id for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        called |= {f"{mod}.{name}" for name in names if f"{mod}.{name}" in funcs and f"{mod}.{name}" != key}
    return called


@contextlib.contextmanager
def _recording(records: list):
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        records.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


def record_launches(modules) -> list:
    records: list = []
    with _recording(records):
        _drive_launchers(modules)
    return records


def _specialise(kernel, args, kwargs, backend):
    """(signature, constexprs, attrs, options) exactly as Triton's JIT computes them for a launch
    (runtime/jit.py, JITFunction.run / _pack_args: the same in Triton 3.4 and 3.9)."""
    from triton.runtime.jit import create_function_from_signature

    try:
        from triton._utils import find_paths_if, get_iterable_path
    except ImportError:  # older layouts kept them in runtime.jit
        from triton.runtime.jit import find_paths_if, get_iterable_path
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, _ = binder(*args, **kwargs)
    options = backend.parse_options(kwargs)
    sigvals = [x[0] for x in spec]
    signature = {p.name: v for p, v in zip(kernel.params, sigvals)}
    constexprs = find_paths_if(sigvals, lambda _, val: val == "constexpr")
    constexprs = {path: get_iterable_path(list(bound.values()), path) for path in constexprs}
    attrvals = ["" if x[0] == "constexpr" else x[1] for x in spec]
    attrs = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
    attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k)) for k in attrs}
    return signature, constexprs, attrs, options


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def _describe(kernel_key, signature, constexprs, options) -> str:
    names = list(signature)
    consts = ",".join(f"{names[k[0]]}={v}" for k, v in sorted(constexprs.items())
                      if names[k[0]].isupper())
    ptrs = ",".join(sorted({v for v in signature.values() if v.startswith("*") and v != "*fp32"}))
    return f"{kernel_key}[{consts}{';' if ptrs else ''}{ptrs}] w{options.num_warps}"


def unique_specs(modules, archs, only: str = "") -> list[dict]:
    """The launches to compile, per arch (kernels whose "module.name" starts with `only`): every distinct
    configuration (argument types, constexprs: switches and block sizes, warps, stages), each once,
    plus every distinct alignment / divisible-by-16 specialisation of the integer and pointer
    arguments for each kernel's first configuration. Those hints change vectorisation, not the
    tiles a kernel holds, and compiling their full product with every configuration would take
    the check from minutes to a quarter of an hour on two cores."""
    from triton.compiler import make_backend

    names = {fn: key for key, fn in jit_functions(modules).items()}
    specs, configs, hints, base = [], set(), set(), {}
    for arch in archs:
        backend = make_backend(_target(arch))
        for index, (kernel, args, kwargs) in enumerate(record_launches(modules)):
            name = names[kernel]
            if not name.startswith(only):
                continue
            signature, constexprs, attrs, options = _specialise(kernel, args, kwargs, backend)
            config = (name, arch, repr(signature), repr(sorted(constexprs.items())), repr(options))
            hint = (name, arch, repr(sorted(attrs.items())))
            first = base.setdefault((name, arch), config) == config
            if config in configs and not (first and hint not in hints):
                continue
            configs.add(config)
            if first:
                hints.add(hint)
            specs.append({"kernel": name, "arch": arch, "launch": index,
                          "what": _describe(name, signature, constexprs, options)})
    return specs


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found in the Triton wheel at {path}")
    return path


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the one kernel in a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], check=True, capture_output=True,
                             text=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    if not {"REG", "STACK", "SHARED", "LOCAL"} <= usage.keys():
        raise RuntimeError(f"unexpected cuobjdump output:\n{out}")
    return {k.lower(): int(v) for k, v in usage.items()}


# Worker state: each worker process records the launches once, then compiles by index.
_WORKER: dict = {}


def _worker_init() -> None:
    _WORKER["modules"] = _load_modules()
    _WORKER["launches"] = record_launches(_WORKER["modules"])


def compile_one(spec: dict) -> dict:
    import triton
    from triton.compiler import ASTSource, make_backend

    kernel, args, kwargs = _WORKER["launches"][spec["launch"]]
    target = _target(spec["arch"])
    signature, constexprs, attrs, options = _specialise(kernel, args, kwargs, make_backend(target))
    result = dict(spec)
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    except Exception as err:  # noqa: BLE001 (the report lists every failure; the test fails on any)
        result.update(ok=False, error=f"{type(err).__name__}: {str(err)[:2000]}")
        return result
    usage = resource_usage(compiled.asm["cubin"])
    # Whether the dots run as TF32 (mma / wgmma .tf32, cvt to tf32): tests check the precision option.
    usage["tf32"] = ".tf32" in compiled.asm["ptx"]
    # Triton allocates shared memory dynamically (metadata.shared); static __shared__ shows in the cubin.
    usage["smem"] = int(compiled.metadata.shared) + usage.pop("shared")
    result.update(ok=True, seconds=round(time.perf_counter() - start, 2), **usage)
    return result


def compile_all(archs=ARCHS, jobs: int = 2, only: str = "") -> dict:
    modules = _load_modules()
    specs = unique_specs(modules, archs, only)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each: no inherited MLIR state
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init) as pool:
        results = list(pool.map(compile_one, specs))
    import triton

    return {
        "triton": triton.__version__,
        "kernels": sorted(jit_functions(modules)),
        "helpers": sorted(helpers_called(modules)),
        "launched": sorted({s["kernel"] for s in specs}),
        "smem_limit": {str(a): SMEM_LIMIT[a] for a in archs},
        "results": results,
    }


def problems(report: dict) -> list[str]:
    """Every compile failure, spill and over-limit shared memory in a report (empty = all good)."""
    bad = []
    for r in report["results"]:
        where = f"sm_{r['arch']} {r['what']}"
        if not r["ok"]:
            bad.append(f"{where}: {r['error'].splitlines()[0] if r['error'] else 'failed'}")
            continue
        if r["stack"] or r["local"]:
            bad.append(f"{where}: spills (stack {r['stack']} B, local {r['local']} B, {r['reg']} registers)")
        if r["smem"] > report["smem_limit"][str(r["arch"])]:
            bad.append(f"{where}: {r['smem']} B shared memory > {report['smem_limit'][str(r['arch'])]} B")
    if report.get("only"):
        return bad
    uncovered = set(report["kernels"]) - set(report["helpers"]) - set(report["launched"])
    bad += [f"{k}: never launched by the launcher matrix (add it to tests/gpu_compile.py)"
            for k in sorted(uncovered)]
    return bad


def table(report: dict) -> str:
    """Per kernel and arch: specialisations compiled, and the worst registers / shared / stack."""
    rows: dict[tuple[str, int], list] = {}
    for r in report["results"]:
        if r["ok"]:
            rows.setdefault((r["kernel"], r["arch"]), []).append(r)
    failed = sum(not r["ok"] for r in report["results"])
    lines = [f"Triton {report['triton']}: {len(report['results'])} compiles, {failed} failed",
             f"{'kernel':44} {'arch':>5} {'specs':>5} {'regs':>9} {'smem B':>13} {'stack B':>7}"]
    for (kernel, arch), rs in sorted(rows.items()):
        regs = sorted(r["reg"] for r in rs)
        smem = sorted(r["smem"] for r in rs)
        lines.append(f"{kernel:44} {'sm_' + str(arch):>5} {len(rs):>5} {f'{regs[0]}-{regs[-1]}':>9} "
                     f"{f'{smem[0]}-{smem[-1]}':>13} {max(r['stack'] for r in rs):>7}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(SMEM_LIMIT))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="", help="compile only kernels whose module.name starts with this")
    parser.add_argument("--json", help="write the full report (every specialisation) here")
    args = parser.parse_args(argv)
    cache = os.environ.get("TRITON_CACHE_DIR")
    if not cache or (os.path.isdir(cache) and os.listdir(cache)):
        print("set TRITON_CACHE_DIR to a new empty directory: a cached kernel would answer instead of "
              "the compiler")
        return 2
    start = time.perf_counter()
    report = compile_all(tuple(args.arch), args.jobs, args.only)
    report["only"] = args.only
    report["seconds"] = round(time.perf_counter() - start, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(table(report))
    bad = problems(report)
    for line in bad:
        print("PROBLEM", line)
    print(f"{len(report['results'])} compiles in {report['seconds']} s: "
          f"{'OK' if not bad else f'{len(bad)} problems'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
