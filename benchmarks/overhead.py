"""Benchmark section ``overhead`` (issue #12): per-call time on tiny CPU inputs, where the work is
negligible and what is measured is what a call costs (argument checks, dispatch, autograd).

For each RL-maths op at B=8, T=32 (fp32 mask, verl's) and for log-probs / entropy from logits
[8, 32, V=64]: rlkern as a user calls it (default backend, no context manager) against eager torch
doing the same maths -- the peers' code where the benchmarks have it (``benchmarks.peers``, the same
functions as the rlmath / logprobs rows), else ``rlkern.reference`` -- forward, and forward+backward
to the differentiable input where the op has a gradient. ``rlkern.reference`` is timed too.

The implementations of an op are timed interleaved (``harness.time_calls_interleaved``: one sample
of each in turn, ``ROUNDS`` rounds, each sample a loop of calls lasting >= 2 ms), median per call in
microseconds. Target: rlkern <=
1.2x eager torch, or within 10 us of it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from benchmarks import harness, peers
from benchmarks.harness import TimingConfig, dtype_label

SECTION = "overhead"
ROUNDS = 21  # interleaved samples per implementation (median of 21)
TARGET_RATIO, TARGET_US = 1.2, 10.0


@dataclass(frozen=True)
class Tiny:
    batch: int = 8
    length: int = 32
    vocab: int = 64
    mask: torch.dtype = torch.float32

    @property
    def label(self) -> str:
        mask = "bool" if self.mask == torch.bool else dtype_label(self.mask)
        return f"B={self.batch},T={self.length} (logits V={self.vocab}) mask={mask}"


SHAPES = {"full": [Tiny()], "quick": [Tiny()]}


@dataclass
class OverheadCase:
    op: str
    mode: str  # fwd | fwd+bwd
    rlkern: Callable[[], object]
    eager: Callable[[], object]
    eager_name: str
    reference: Callable[[], object] | None = None


@dataclass
class OverheadRow:
    op: str
    shape: str
    mode: str
    rlkern_us: float | None
    eager_us: float | None
    eager_name: str
    reference_us: float | None
    ratio: float | None  # rlkern / eager
    diff_us: float | None  # rlkern - eager
    met: bool | None
    error: str | None = None


def _grad_call(fn: Callable, leaf_index: int, args: tuple, kwargs: dict | None = None):
    """fn forward, then d (first output) / d args[leaf_index] through autograd.grad, with an all-ones
    incoming gradient for a non-scalar output (built once, outside the timed call)."""
    args = list(args)
    leaf = args[leaf_index].detach().requires_grad_(True)
    args[leaf_index] = leaf
    kwargs = kwargs or {}
    ones: list[torch.Tensor] = []

    def call():
        out = fn(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        if out.dim() and not ones:
            ones.append(torch.ones_like(out))
        return torch.autograd.grad(out, leaf, ones[0] if out.dim() else None)[0]

    return call


def cases(shapes: list[Tiny]) -> Iterator[OverheadCase]:
    import rlkern
    from rlkern import reference as ref

    ops = rlkern.ops
    for shape in shapes:
        g = torch.Generator().manual_seed(0)
        b, t = shape.batch, shape.length

        def rand(*size, g=g):
            return torch.randn(*size, generator=g)

        valid = torch.arange(t).unsqueeze(0) < torch.randint(t // 2, t + 1, (b, 1), generator=g)
        mask = valid.to(shape.mask)
        logp = -torch.rand(b, t, generator=g) * 3
        old, refp = logp + 0.1 * rand(b, t), logp + 0.1 * rand(b, t)
        adv, adv_seq, scores = rand(b, t), rand(b), rand(b)
        values, rewards = rand(b, t), rand(b, t)
        logits, labels = 3 * rand(b, t, shape.vocab), torch.randint(0, shape.vocab, (b, t), generator=g)

        def fwd(fn, *args, **kwargs):
            return functools.partial(fn, *args, **kwargs)

        # (op, has backward, leaf index, rlkern fn+args+kwargs, eager (name, fn, args), reference fn+kwargs)
        specs = [
            ("kl", True, 0, ops.kl, (logp, refp), {"estimator": "k3", "clamp": True},
             ("verl kl_penalty low_var_kl", peers.verl_kl_k3, (logp, refp)), ref.kl,
             {"estimator": "k3", "clamp": True}),
            ("token_rewards", False, 0, ops.token_rewards, (scores, logp, refp, mask),
             {"kl_coef": 0.05, "estimator": "k1"},
             ("verl apply_kl_penalty", peers.verl_token_rewards, (scores, logp, refp, mask, 0.05)),
             ref.token_rewards, {"kl_coef": 0.05, "estimator": "k1"}),
            ("gae", False, 0, ops.gae, (rewards, values, mask), {"gamma": 1.0, "lam": 0.95},
             ("verl masked loop over T", peers.verl_gae_loop, (rewards, values, mask, 1.0, 0.95)),
             ref.gae, {"gamma": 1.0, "lam": 0.95}),
            ("discounted_returns", False, 0, ops.discounted_returns, (rewards, mask), {"gamma": 0.99},
             ("verl REINFORCE++ loop", peers.verl_reinforce_returns_loop, (rewards, mask, 0.99)),
             ref.discounted_returns, {"gamma": 0.99}),
            ("masked_sum", True, 0, ops.masked_sum, (adv, mask), {},
             ("verl masked_sum", peers.verl_masked_sum, (adv, mask)), ref.masked_sum, {}),
            ("masked_mean", True, 0, ops.masked_mean, (adv, mask), {},
             ("verl masked_mean", peers.verl_masked_mean, (adv, mask)), ref.masked_mean, {}),
            ("masked_var", True, 0, ops.masked_var, (adv, mask), {},
             ("verl masked_var", peers.verl_masked_var, (adv, mask)), ref.masked_var, {}),
            ("masked_whiten", True, 0, ops.masked_whiten, (adv, mask), {},
             ("verl masked_whiten", peers.verl_masked_whiten, (adv, mask)), ref.masked_whiten, {}),
            ("policy_loss", True, 0, ops.policy_loss, (logp, old, adv, mask), {"dual_clip": 3.0},
             ("verl policy_loss (leaf: log_prob)", peers.verl_policy_loss, (old, logp, adv, mask)),
             ref.policy_loss, {"dual_clip": 3.0}),
            ("value_loss", True, 0, ops.value_loss, (values, old, rewards, mask), {},
             ("verl value_loss", peers.verl_value_loss, (values, rewards, old, mask)), ref.value_loss, {}),
            ("grpo_loss", True, 0, ops.grpo_loss, (logp, old, refp, adv_seq, mask), {"beta": 0.04},
             ("TRL GRPO loss", peers.trl_grpo_loss, (logp, old, refp, adv_seq, mask)), ref.grpo_loss,
             {"beta": 0.04}),
            ("logprobs", True, 0, ops.logprobs, (logits, labels), {},
             ("log_softmax + gather", peers.naive_logprobs, (logits, labels)), ref.logprobs, {}),
            ("entropy", True, 0, ops.entropy, (logits,), {},
             ("verl entropy_from_logits", peers.naive_entropy, (logits,)), ref.entropy, {}),
        ]
        for op, has_bwd, leaf, rl, args, kwargs, eager_spec, reference, ref_kwargs in specs:
            eager_name, eager, eager_args = eager_spec
            # verl's policy loss takes (old_log_prob, log_prob, ...): its leaf is the second argument
            eager_leaf = 1 if op == "policy_loss" else leaf
            yield OverheadCase(op, "fwd", fwd(rl, *args, **kwargs), fwd(eager, *eager_args), eager_name,
                               fwd(reference, *args, **ref_kwargs))
            if has_bwd:
                yield OverheadCase(op, "fwd+bwd", _grad_call(rl, leaf, args, kwargs),
                                   _grad_call(eager, eager_leaf, eager_args), eager_name,
                                   _grad_call(reference, leaf, args, ref_kwargs))


def run_rows(shapes: list[Tiny], *, rounds: int = ROUNDS, min_sample_ms: float = 2.0,
             log=print) -> list[OverheadRow]:
    """Times every case: rlkern, eager torch and the reference sampled in turn
    (``harness.time_calls_interleaved``), ``rounds`` samples each of >= ``min_sample_ms``."""
    cfg = harness.TimingConfig(warmup=3, repeats=rounds, min_sample_ms=min_sample_ms)
    rows = []
    for shape in shapes:
        for case in cases(shapes=[shape]):
            fns = {"rlkern": case.rlkern, "eager": case.eager}
            if case.reference is not None:
                fns["reference"] = case.reference
            timings = dict(zip(fns, harness.time_calls_interleaved(list(fns.values()), cfg)))
            err = next((t for t in timings.values() if not isinstance(t, harness.Timing)), None)
            if err is not None:  # reported in the table, not fatal to the run
                msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
                rows.append(OverheadRow(case.op, shape.label, case.mode, None, None, case.eager_name, None,
                                        None, None, None, msg))
                log(f"  {case.op} {case.mode}: failed: {msg}")
                continue
            us = {name: 1e3 * t.median_ms for name, t in timings.items()}
            rl, eager = us["rlkern"], us["eager"]
            ratio, diff = rl / eager, rl - eager
            row = OverheadRow(case.op, shape.label, case.mode, rl, eager, case.eager_name,
                              us.get("reference"), ratio, diff, ratio <= TARGET_RATIO or diff <= TARGET_US)
            rows.append(row)
            log(f"  {case.op:<20} {case.mode:<8} rlkern {rl:8.1f} us   eager {eager:8.1f} us   "
                f"({ratio:.2f}x, {diff:+.1f} us)")
    return rows


def markdown_table(rows: list[OverheadRow]) -> str:
    shape = rows[0].shape if rows else ""
    lines = [f"### Per-call overhead on tiny CPU inputs ({shape})", "",
             "| op | mode | rlkern us | eager torch us | eager torch = | rlkern / eager | "
             "rlkern - eager us | rlkern.reference us | target |",
             "|---|---|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.op} | {r.mode} | failed: {r.error.replace('|', '/')} | | {r.eager_name} "
                         "| | | | |")
            continue
        verdict = "met" if r.met else "MISSED"
        ref = f"{r.reference_us:.1f}" if r.reference_us is not None else ""
        lines.append(f"| {r.op} | {r.mode} | {r.rlkern_us:.1f} | {r.eager_us:.1f} | {r.eager_name} | "
                     f"{r.ratio:.2f}x | {r.diff_us:+.1f} | {ref} | {verdict} |")
    met = sum(1 for r in rows if r.met)
    lines += ["", f"Median per call over {ROUNDS} interleaved samples; rlkern as users call it (default "
                  "backend: the C++ kernels on CPU tensors); eager torch = the peers' code doing the same "
                  "maths; fwd+bwd = forward, then autograd.grad to the differentiable input. Target: "
                  f"rlkern <= {TARGET_RATIO}x eager torch or within {TARGET_US:g} us of it: met by "
                  f"{met} of {len(rows)}."]
    return "\n".join(lines)


def run_section(*, quick: bool = False, cfg: TimingConfig | None = None, shapes=None,
                log=print) -> tuple[str, list[dict]]:
    """The report's entry point: (markdown table, JSON records)."""
    cfg = cfg or TimingConfig()
    shapes = shapes or SHAPES["quick" if quick else "full"]
    rows = run_rows(shapes, min_sample_ms=cfg.min_sample_ms, log=log)
    return markdown_table(rows), [asdict(r) for r in rows]
