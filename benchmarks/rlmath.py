"""Benchmark family ``rlmath`` (issues #3, #12): the RL maths over token tensors [B, T], with the
masks trainers really pass.

Every case runs once per mask dtype (``MASKS``): fp32 0/1 (verl's ``response_mask``), int64 (TRL's
``completion_mask``) and bool. The shape label names it (``B=256,T=4096 fp32 mask=int64``), and
every implementation of a case -- rlkern, the peers' eager code, torch.compile of the same maths --
receives that same mask tensor. Cases per shape, each against the peers' eager formulation,
torch.compile of the same maths and the streaming floor (inputs read once, outputs written once;
the mask counts at its own width):

* ``gae`` forward: TRL's Python loop over T (no mask), verl's masked loop, torch.compile of verl's
  maths as two associative scans (``peers.math_gae``); target >= 50x faster than the TRL loop.
* ``discounted_returns`` forward (verl's REINFORCE++ loop; torch.compile of one associative scan),
  ``token_rewards`` forward (verl ``apply_kl_penalty`` with k1, score at the last valid token).
* ``masked_sum`` / ``masked_mean`` / ``masked_var`` / ``masked_whiten`` forward (verl/TRL), ``kl``
  k3 with verl's clamps forward.
* ``policy_loss`` (verl vanilla, dual-clip c = 3), ``value_loss`` (verl), ``grpo_loss`` (TRL,
  beta = 0.04, per-sequence advantages) forward+backward to d logp / d values; target <= 1.5x the
  floor.

Target for every op (issue #12): rlkern >= 1.2x torch.compile's speed at B=256,T=4096 and >= 1.0x
at smaller shapes. ``summary_tables`` pivots the rows into one README table per shape: rlkern's
time and its speedups over torch.compile and over the peers' eager code, one column group per mask
dtype. An op that has not landed in ``rlkern.ops`` is reported in a note and its rlkern row omitted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from benchmarks import peers
from benchmarks.harness import Case, Impl, Row, Target, dtype_label, streaming_probe

FAMILY = "rlmath"
RLKERN = "rlkern (cpp)"
COMPILE = "torch.compile(same maths)"
COMPILE_SCAN = "torch.compile(associative scans)"
TRL_GAE = "TRL PPO loop over T (no mask)"
GAMMA, LAM = 1.0, 0.95
GAMMA_RETURNS = 0.99
KL_COEF = 0.05
# fp32 first: verl's response_mask, what the issue's targets are stated for; int64 is TRL's.
MASKS = (torch.float32, torch.int64, torch.bool)
OPS = ("gae", "discounted_returns", "token_rewards", "masked_sum", "masked_mean", "masked_var",
       "masked_whiten", "kl", "policy_loss", "value_loss", "grpo_loss")
BIG_TOKENS = 256 * 4096  # issue #12: >= 1.2x torch.compile from this size, >= 1.0x below it


def mask_label(dtype: torch.dtype) -> str:
    return "bool" if dtype == torch.bool else dtype_label(dtype)


@dataclass(frozen=True)
class Shape:
    batch: int
    length: int
    dtype: torch.dtype = torch.float32
    mask: torch.dtype = torch.float32

    @property
    def label(self) -> str:
        return f"B={self.batch},T={self.length} {dtype_label(self.dtype)} mask={mask_label(self.mask)}"

    @property
    def size_label(self) -> str:
        return f"B={self.batch},T={self.length} {dtype_label(self.dtype)}"


SHAPES = {
    "full": [Shape(256, 4096, mask=m) for m in MASKS] + [Shape(64, 1024, mask=m) for m in MASKS],
    "quick": [Shape(64, 1024, mask=m) for m in MASKS],
}


@functools.cache
def _compiled(fn):
    import torch._dynamo

    # One compiled function sees every (shape, mask dtype) of a run: 6 specialisations in the full
    # run, above nothing but well within this limit (the default, 8, leaves little headroom).
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _rlkern_op(name: str) -> Callable | None:
    import rlkern

    return getattr(rlkern.ops, name, None)


def _on_cpp_fn(op: Callable) -> Callable:
    """op, run with the C++ backend forced (so a missing extension fails loudly, not silently eager)."""
    import rlkern

    def call(*args, **kwargs):
        with rlkern.use_backend("cpp"):
            return op(*args, **kwargs)

    return call


def _on_cpp(op: Callable, *args, **kwargs) -> Callable[[], object]:
    return functools.partial(_on_cpp_fn(op), *args, **kwargs)


def _loss_forward_backward(loss_fn: Callable, leaf_index: int, args: tuple, kwargs: dict | None = None):
    """A call that computes the loss (the first output when the function returns a tuple) and its
    gradient w.r.t. args[leaf_index] (via autograd.grad, so nothing accumulates)."""
    args = list(args)
    leaf = args[leaf_index].detach().requires_grad_(True)
    args[leaf_index] = leaf
    kwargs = kwargs or {}

    def call():
        out = loss_fn(*args, **kwargs)
        loss = out[0] if isinstance(out, tuple) else out
        return torch.autograd.grad(loss, leaf)[0]

    return call


def _inputs(shape: Shape) -> dict:
    b, t = shape.batch, shape.length
    lengths = torch.randint(t // 2, t + 1, (b, 1))
    valid = torch.arange(t).unsqueeze(0) < lengths  # right padding, as in RLHF batches
    logp = (-torch.rand(b, t) * 3).to(shape.dtype)
    return {
        "mask": valid.to(shape.mask),  # the one mask tensor every implementation of a case receives
        "logp": logp,
        "old": (logp.float() + 0.1 * torch.randn(b, t)).to(shape.dtype),
        "ref": (logp.float() + 0.1 * torch.randn(b, t)).to(shape.dtype),
        "adv_tok": torch.randn(b, t).to(shape.dtype),
        "adv_seq": torch.randn(b).to(shape.dtype),
        "scores": torch.randn(b).to(shape.dtype),
        "values": torch.randn(b, t).to(shape.dtype),
        "rewards": torch.randn(b, t).to(shape.dtype),
    }


def _compile_target(shape: Shape, name: str = COMPILE) -> Target:
    big = shape.batch * shape.length >= BIG_TOKENS
    bound = 1.2 if big else 1.0
    return Target(f">= {bound:g}x torch.compile", RLKERN, "speedup", bound, name)


def cases(shapes: list[Shape], *, compile: bool = True) -> Iterator[Case]:
    """Yields the cases shape by shape. ``compile=False`` leaves out the torch.compile rows."""
    missing = [name for name in OPS if _rlkern_op(name) is None]
    notes = [f"not in rlkern.ops yet, rlkern rows omitted: {', '.join(missing)}"] if missing else []
    for shape in shapes:
        x = _inputs(shape)
        mask = x["mask"]
        tok = x["logp"].nbytes  # bytes of one [B, T] float tensor
        rows = shape.batch

        def case(op, mode, impls, read, write, targets, label=shape.label, rows=rows):
            return Case(FAMILY, op, label, mode, impls, work=read + write, rows=rows, notes=notes,
                        targets=targets)

        # GAE, forward only (no gradient flows through advantages)
        impls = [Impl("floor: read r, V, mask + write A, R", streaming_probe(2 * tok + mask.nbytes, 2 * tok),
                      "floor")]
        if _rlkern_op("gae"):
            impls.append(Impl(RLKERN, _on_cpp(_rlkern_op("gae"), x["rewards"], x["values"], mask, gamma=GAMMA,
                                              lam=LAM), "rlkern"))
        impls += [
            Impl(TRL_GAE, functools.partial(peers.trl_gae_loop, x["rewards"], x["values"], GAMMA, LAM)),
            Impl("verl masked loop over T",
                 functools.partial(peers.verl_gae_loop, x["rewards"], x["values"], mask, GAMMA, LAM)),
        ]
        if compile:
            impls.append(Impl(COMPILE_SCAN, functools.partial(
                _compiled(peers.math_gae), x["rewards"], x["values"], mask, GAMMA, LAM), "compile"))
        yield case("gae", "fwd", impls, 2 * tok + mask.nbytes, 2 * tok,
                   [Target(">= 50x faster than the TRL loop", RLKERN, "speedup", 50.0, TRL_GAE),
                    _compile_target(shape, COMPILE_SCAN)])

        # discounted returns (REINFORCE++), forward only
        impls = [Impl("floor: read r, mask + write R", streaming_probe(tok + mask.nbytes, tok), "floor")]
        if _rlkern_op("discounted_returns"):
            impls.append(Impl(RLKERN, _on_cpp(_rlkern_op("discounted_returns"), x["rewards"], mask,
                                              gamma=GAMMA_RETURNS), "rlkern"))
        impls.append(Impl("verl REINFORCE++ loop over T", functools.partial(
            peers.verl_reinforce_returns_loop, x["rewards"], mask, GAMMA_RETURNS)))
        if compile:
            impls.append(Impl(COMPILE_SCAN, functools.partial(
                _compiled(peers.math_discounted_returns), x["rewards"], mask, GAMMA_RETURNS), "compile"))
        yield case("discounted_returns", "fwd", impls, tok + mask.nbytes, tok,
                   [_compile_target(shape, COMPILE_SCAN)])

        # forward-only elementwise / reduction ops: (op, rlkern args, kwargs, peer, peer args, read, write)
        fwd_specs = (
            ("token_rewards", (x["scores"], x["logp"], x["ref"], mask),
             {"kl_coef": KL_COEF, "estimator": "k1"},
             peers.verl_token_rewards, (x["scores"], x["logp"], x["ref"], mask, KL_COEF),
             2 * tok + mask.nbytes + x["scores"].nbytes, tok),
            ("masked_sum", (x["adv_tok"], mask), {}, peers.verl_masked_sum, (x["adv_tok"], mask),
             tok + mask.nbytes, 0),
            ("masked_mean", (x["adv_tok"], mask), {}, peers.verl_masked_mean, (x["adv_tok"], mask),
             tok + mask.nbytes, 0),
            ("masked_var", (x["adv_tok"], mask), {}, peers.verl_masked_var, (x["adv_tok"], mask),
             tok + mask.nbytes, 0),
            ("masked_whiten", (x["adv_tok"], mask), {}, peers.verl_masked_whiten, (x["adv_tok"], mask),
             tok + mask.nbytes, tok),
            ("kl", (x["logp"], x["ref"]), {"estimator": "k3", "clamp": True}, peers.verl_kl_k3,
             (x["logp"], x["ref"]), 2 * tok, tok),
        )
        for op, args, kwargs, peer, peer_args, read, write in fwd_specs:
            impls = [Impl("floor: read inputs + write output", streaming_probe(read, write), "floor")]
            if _rlkern_op(op):
                impls.append(Impl(RLKERN, _on_cpp(_rlkern_op(op), *args, **kwargs), "rlkern"))
            impls.append(Impl(f"verl eager ({peer.__name__.removeprefix('verl_')})",
                              functools.partial(peer, *peer_args)))
            if compile:
                impls.append(Impl(COMPILE, functools.partial(_compiled(peer), *peer_args), "compile"))
            yield case(op, "fwd", impls, read, write, [_compile_target(shape)])

        # losses, forward + backward to the one differentiable input
        loss_specs = (
            ("policy_loss", (x["logp"], x["old"], x["adv_tok"], mask), {"dual_clip": 3.0}, 0,
             peers.verl_policy_loss, (x["old"], x["logp"], x["adv_tok"], mask), 1, 3 * tok + mask.nbytes),
            ("value_loss", (x["values"], x["old"], x["rewards"], mask), {}, 0,
             peers.verl_value_loss, (x["values"], x["rewards"], x["old"], mask), 0, 3 * tok + mask.nbytes),
            ("grpo_loss", (x["logp"], x["old"], x["ref"], x["adv_seq"], mask), {"beta": 0.04}, 0,
             peers.trl_grpo_loss, (x["logp"], x["old"], x["ref"], x["adv_seq"], mask), 0,
             3 * tok + x["adv_seq"].nbytes + mask.nbytes),
        )
        for op, args, kwargs, leaf, peer, peer_args, peer_leaf, read in loss_specs:
            impls = [Impl("floor: read inputs + write d input", streaming_probe(read, tok), "floor")]
            if _rlkern_op(op):
                rl = _loss_forward_backward(_on_cpp_fn(_rlkern_op(op)), leaf, args, kwargs)
                impls.append(Impl(RLKERN, rl, "rlkern"))
            source = "TRL" if peer.__name__.startswith("trl") else "verl"
            impls.append(Impl(f"{source} eager ({peer.__name__.split('_', 1)[1]})",
                              _loss_forward_backward(peer, peer_leaf, peer_args)))
            if compile:
                impls.append(Impl(COMPILE, _loss_forward_backward(_compiled(peer), peer_leaf, peer_args),
                                  "compile"))
            yield case(op, "fwd+bwd", impls, read, tok,
                       [Target("forward+backward <= 1.5x floor", RLKERN, "x_floor", 1.5),
                        _compile_target(shape)])


# ---------------------------------------------------------------------------------------------
# README summary: one table per shape, one column group per mask dtype
# ---------------------------------------------------------------------------------------------


def _split_shape(shape_label: str) -> tuple[str, str]:
    """'B=256,T=4096 fp32 mask=int64' -> ('B=256,T=4096 fp32', 'int64')."""
    size, _, mask = shape_label.rpartition(" mask=")
    return (size, mask) if size else (shape_label, "")


def summary_tables(rows: list[Row]) -> str:
    """Per shape, per op and mode: rlkern's median ms and its speedup over torch.compile (compile
    ms / rlkern ms: > 1 means rlkern is faster) and over the fastest peer eager row, one column
    group per mask dtype. Empty when no rlkern row ran."""
    rows = [r for r in rows if r.family == FAMILY and r.median_ms]
    if not any(r.kind == "rlkern" for r in rows):
        return ""
    by_case: dict[str, dict[str, list[Row]]] = {}
    for r in rows:
        by_case.setdefault(r.case, {}).setdefault(r.kind, []).append(r)
    sizes = list(dict.fromkeys(_split_shape(r.shape)[0] for r in rows))
    masks = list(dict.fromkeys(_split_shape(r.shape)[1] for r in rows))
    out = []
    for size in sizes:
        head = "| op | mode | " + " | ".join(
            f"rlkern ms, mask={m} | x compile, mask={m} | x eager, mask={m}" for m in masks) + " |"
        lines = [f"#### RL maths at {size}: rlkern vs torch.compile and the peers' eager code, "
                 "per mask dtype",
                 "", head, "|---|---|" + "---:|" * (3 * len(masks))]
        ops = list(dict.fromkeys((r.op, r.mode) for r in rows if _split_shape(r.shape)[0] == size))
        for op, mode in ops:
            cells = []
            for m in masks:
                kinds = by_case.get(f"{op} {size} mask={m} {mode}", {})
                rl = kinds.get("rlkern", [None])[0]
                comp = kinds.get("compile", [None])[0]
                peer = min(kinds.get("peer", []), key=lambda r: r.median_ms, default=None)
                if rl is None:
                    cells += ["n/a", "n/a", "n/a"]
                    continue
                cells += [f"{rl.median_ms:.3f}",
                          f"{comp.median_ms / rl.median_ms:.2f}x" if comp else "n/a",
                          f"{peer.median_ms / rl.median_ms:.1f}x" if peer else "n/a"]
            lines.append(f"| {op} | {mode} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    out.append("x compile = torch.compile(same maths) ms / rlkern ms; x eager = fastest peer eager ms "
               "(verl/TRL code as they ship it) / rlkern ms; > 1 means rlkern is faster. Every "
               "implementation of a cell received the same mask tensor (dtype in the column).")
    return "\n\n".join(out)
