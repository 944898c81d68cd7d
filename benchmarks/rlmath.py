"""Benchmark family ``rlmath`` (issue #3): the RL maths over token tensors [B, T].

Cases per shape, each against the peers' eager formulation, torch.compile of the same maths and
the streaming floor (inputs read once, outputs written once; masks are bool, 1 byte a token):

* ``gae`` forward: TRL's Python loop over T (no mask), verl's masked loop, torch.compile of verl's
  maths as two associative scans (``peers.math_gae``); target >= 50x faster than the TRL loop.
* ``masked_whiten`` forward (verl/TRL), ``kl`` k3 with verl's clamps forward; target: at least as
  fast as torch.compile.
* ``policy_loss`` (verl vanilla, dual-clip c = 3), ``value_loss`` (verl), ``grpo_loss`` (TRL,
  beta = 0.04, per-sequence advantages) forward+backward to d logp / d values; targets <= 1.5x the
  floor and at least as fast as torch.compile.

An op that has not landed in ``rlkern.ops`` yet is reported in a note and its rlkern row omitted.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from benchmarks import peers
from benchmarks.harness import Case, Impl, Target, dtype_label, streaming_probe

FAMILY = "rlmath"
RLKERN = "rlkern (cpp)"
COMPILE = "torch.compile(same maths)"
TRL_GAE = "TRL PPO loop over T (no mask)"
GAMMA, LAM = 1.0, 0.95


@dataclass(frozen=True)
class Shape:
    batch: int
    length: int
    dtype: torch.dtype = torch.float32

    @property
    def label(self) -> str:
        return f"B={self.batch},T={self.length} {dtype_label(self.dtype)}"


SHAPES = {
    "full": [Shape(256, 4096), Shape(64, 1024)],
    "quick": [Shape(64, 1024)],
}


@functools.cache
def _compiled(fn):
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


def _inputs(shape: Shape):
    b, t = shape.batch, shape.length
    lengths = torch.randint(t // 2, t + 1, (b, 1))
    mask = torch.arange(t).unsqueeze(0) < lengths  # right padding, as in RLHF batches
    logp = (-torch.rand(b, t) * 3).to(shape.dtype)
    old = (logp.float() + 0.1 * torch.randn(b, t)).to(shape.dtype)
    ref = (logp.float() + 0.1 * torch.randn(b, t)).to(shape.dtype)
    adv_tok = torch.randn(b, t).to(shape.dtype)
    adv_seq = torch.randn(b).to(shape.dtype)
    values = torch.randn(b, t).to(shape.dtype)
    rewards = torch.randn(b, t).to(shape.dtype)
    return mask, logp, old, ref, adv_tok, adv_seq, values, rewards


def cases(shapes: list[Shape], *, compile: bool = True) -> Iterator[Case]:
    """Yields the cases shape by shape. ``compile=False`` leaves out the torch.compile rows."""
    missing = [name for name in ("gae", "masked_whiten", "kl", "policy_loss", "value_loss", "grpo_loss")
               if _rlkern_op(name) is None]
    notes = [f"not in rlkern.ops yet, rlkern rows omitted: {', '.join(missing)}"] if missing else []
    for shape in shapes:
        mask, logp, old, ref, adv_tok, adv_seq, values, rewards = _inputs(shape)
        tok = logp.nbytes  # bytes of one [B, T] float tensor
        mask_f = mask.to(shape.dtype)  # verl multiplies by the mask as floats
        rows = shape.batch

        # GAE, forward only (no gradient flows through advantages)
        floor = streaming_probe(2 * tok + mask.nbytes, 2 * tok)
        impls = [Impl("floor: read r, V, mask + write A, R", floor, "floor")]
        if _rlkern_op("gae"):
            impls.append(Impl(RLKERN, _on_cpp(_rlkern_op("gae"), rewards, values, mask, gamma=GAMMA, lam=LAM),
                              "rlkern"))
        impls += [
            Impl(TRL_GAE, functools.partial(peers.trl_gae_loop, rewards, values, GAMMA, LAM)),
            Impl("verl masked loop over T",
                 functools.partial(peers.verl_gae_loop, rewards, values, mask_f, GAMMA, LAM)),
        ]
        if compile:
            impls.append(Impl("torch.compile(associative scans)", functools.partial(
                _compiled(peers.math_gae), rewards, values, mask, GAMMA, LAM), "compile"))
        yield Case(FAMILY, "gae", shape.label, "fwd", impls, work=4 * tok + mask.nbytes, rows=rows,
                   notes=notes,
                   targets=[Target(">= 50x faster than the TRL loop", RLKERN, "speedup", 50.0, TRL_GAE),
                            Target("at least as fast as torch.compile", RLKERN, "speedup", 1.0,
                                   "torch.compile(associative scans)")])

        # masked whitening and KL, forward
        for op, args, kwargs, peer, n_in in (
                ("masked_whiten", (adv_tok, mask), {}, peers.verl_masked_whiten, 1),
                ("kl", (logp, ref), {"estimator": "k3", "clamp": True}, peers.verl_kl_k3, 2)):
            read = n_in * tok + (mask.nbytes if op == "masked_whiten" else 0)
            impls = [Impl("floor: read inputs + write output", streaming_probe(read, tok), "floor")]
            if _rlkern_op(op):
                impls.append(Impl(RLKERN, _on_cpp(_rlkern_op(op), *args, **kwargs), "rlkern"))
            peer_args = (adv_tok, mask_f) if op == "masked_whiten" else args
            impls.append(Impl(f"verl eager ({peer.__name__.removeprefix('verl_')})",
                              functools.partial(peer, *peer_args)))
            if compile:
                impls.append(Impl(COMPILE, functools.partial(_compiled(peer), *peer_args), "compile"))
            yield Case(FAMILY, op, shape.label, "fwd", impls, work=read + tok, rows=rows, notes=notes,
                       targets=[Target("at least as fast as torch.compile", RLKERN, "speedup", 1.0, COMPILE)])

        # losses, forward + backward to the one differentiable input
        loss_specs = (
            ("policy_loss", (logp, old, adv_tok, mask), {"dual_clip": 3.0}, 0,
             peers.verl_policy_loss, (old, logp, adv_tok, mask_f), 1, 3 * tok + mask.nbytes),
            ("value_loss", (values, old, rewards, mask), {}, 0,
             peers.verl_value_loss, (values, rewards, old, mask_f), 0, 3 * tok + mask.nbytes),
            ("grpo_loss", (logp, old, ref, adv_seq, mask), {"beta": 0.04}, 0,
             peers.trl_grpo_loss, (logp, old, ref, adv_seq, mask_f), 0,
             3 * tok + adv_seq.nbytes + mask.nbytes),
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
            yield Case(FAMILY, op, shape.label, "fwd+bwd", impls, work=read + tok, rows=rows, notes=notes,
                       targets=[Target("forward+backward <= 1.5x floor", RLKERN, "x_floor", 1.5),
                                Target("at least as fast as torch.compile", RLKERN, "speedup", 1.0, COMPILE)])

