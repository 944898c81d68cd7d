"""Benchmark family ``logprobs`` (issue #2): token log-probs and entropy from logits [N, V].

Per shape, for ``logprobs`` and ``entropy``, forward and forward+backward: rlkern (C++ backend;
forward+backward also with ``inplace_backward=True``), the plain log_softmax + gather (verl's
softmax-based entropy), TRL's row-loop formulation (the real ``selective_log_softmax`` /
``entropy_from_logits``; verl's ``logprobs_from_logits_v2`` is the same code), torch.compile of the
same maths, and the floor.

Floor bytes: forward reads the logits and labels once and writes the fp32 output; forward+backward
reads logits, labels and the incoming gradient once and writes the output and d logits (in the
logits' dtype) once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from benchmarks import peers
from benchmarks.harness import Case, Impl, Target, dtype_label, streaming_probe

FAMILY = "logprobs"
RLKERN = "rlkern (cpp)"
RLKERN_INPLACE = "rlkern (cpp, inplace_backward)"
TARGET_MIN_ELEMENTS = 2**27  # issue #2: the targets apply for N * V >= 2^27


@dataclass(frozen=True)
class Shape:
    rows: int
    vocab: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"{self.rows}x{self.vocab} {dtype_label(self.dtype)}"


SHAPES = {
    "full": [Shape(4096, 32768, torch.float32), Shape(2048, 151936, torch.bfloat16)],
    "quick": [Shape(128, 32768, torch.float32), Shape(64, 65536, torch.bfloat16)],
}


@functools.cache
def _compiled(fn):
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _rlkern(op_name: str):
    import rlkern

    op = getattr(rlkern.ops, op_name)

    def call(*args):
        with rlkern.use_backend("cpp"):
            return op(*args)

    return call


def _rlkern_inplace_backward(op_name: str, logits: torch.Tensor, *rest, grad_out: torch.Tensor):
    """rlkern forward+backward with ``inplace_backward=True``: d logits lands in the logits' own
    storage (no [N, V] allocation, hence no page faults on fresh memory). It runs on a private copy
    of the logits, made on the first call; every call overwrites that copy with a gradient, whose
    values (|d| <= 1) are as valid logits as any, so the timing is unaffected."""
    import rlkern

    op = getattr(rlkern.ops, op_name)
    leaf: list[torch.Tensor] = []

    def call():
        if not leaf:
            # A non-leaf (as lm_head logits are): the ops never overwrite a leaf that requires grad,
            # they fall back to a fresh gradient buffer then (rlkern/ops/logits.py).
            leaf.append(logits.detach().clone().requires_grad_(True) * 1.0)
        with rlkern.use_backend("cpp"):
            out = op(leaf[0], *rest, inplace_backward=True)
        return torch.autograd.grad(out, leaf[0], grad_out)[0]

    return call


def _forward_backward(fn, x: torch.Tensor, *rest, grad_out: torch.Tensor):
    """A call running fn forward and backward to d x (via autograd.grad, so no .grad accumulates)."""
    leaf = x.detach().requires_grad_(True)

    def call():
        out = fn(leaf, *rest)
        return torch.autograd.grad(out, leaf, grad_out)[0]

    return call


def _targets(shape: Shape, mode: str) -> list[Target]:
    if shape.rows * shape.vocab < TARGET_MIN_ELEMENTS:
        return []
    if mode == "fwd":
        return [Target("forward >= 80% of floor", RLKERN, "x_floor", 1 / 0.8),
                Target("extra forward peak <= 16 B/row", RLKERN, "mem_per_row", 16.0)]
    return [Target("forward+backward <= 1.5x floor", RLKERN, "x_floor", 1.5),
            Target("forward+backward <= 1.5x floor", RLKERN_INPLACE, "x_floor", 1.5)]


def cases(shapes: list[Shape], *, compile: bool = True) -> Iterator[Case]:
    """Yields the cases shape by shape; one shape's tensors are alive at a time. ``compile=False``
    leaves out the torch.compile rows (their compilation dominates a run on tiny shapes)."""
    trl_missing = peers.trl_available()
    notes = [f"TRL rows skipped: {trl_missing}"] if trl_missing else []
    for shape in shapes:
        logits = (torch.randn(shape.rows, shape.vocab) * 3.0).to(shape.dtype)
        labels = torch.randint(0, shape.vocab, (shape.rows,))
        grad_out = torch.randn(shape.rows)
        n_in = logits.nbytes
        out_bytes = shape.rows * 4
        for op in ("logprobs", "entropy"):
            args = (logits, labels) if op == "logprobs" else (logits,)
            label_bytes = labels.nbytes if op == "logprobs" else 0
            impls_fwd = {
                RLKERN: (_rlkern(op), "rlkern"),
                "log_softmax + gather" if op == "logprobs" else "softmax (verl entropy_from_logits)":
                    (peers.naive_logprobs if op == "logprobs" else peers.naive_entropy, "peer"),
            }
            if compile:
                name = ("torch.compile(gather - logsumexp)" if op == "logprobs"
                        else "torch.compile(lse - sum p z)")
                impls_fwd[name] = (_compiled(peers.math_logprobs if op == "logprobs" else peers.math_entropy),
                                   "compile")
            if not trl_missing:
                trl_name = ("TRL/verl row loop (selective_log_softmax)" if op == "logprobs"
                            else "TRL entropy_from_logits (128-row chunks)")
                impls_fwd[trl_name] = (peers.trl_selective_log_softmax if op == "logprobs"
                                       else peers.trl_entropy_from_logits, "peer")
            # forward
            floor = streaming_probe(n_in + label_bytes, out_bytes)
            impls = [Impl("floor: read inputs + write output", floor, "floor")]
            impls += [Impl(name, functools.partial(fn, *args), kind)
                      for name, (fn, kind) in impls_fwd.items()]
            yield Case(FAMILY, op, shape.label, "fwd", impls, work=n_in + label_bytes + out_bytes,
                       rows=shape.rows, targets=_targets(shape, "fwd"), notes=notes)
            # forward + backward
            read = n_in + label_bytes + grad_out.nbytes
            write = out_bytes + n_in
            impls = [Impl("floor: read inputs + write out, d logits", streaming_probe(read, write), "floor")]
            impls += [Impl(name, _forward_backward(fn, *args, grad_out=grad_out), kind)
                      for name, (fn, kind) in impls_fwd.items()]
            inplace = _rlkern_inplace_backward(op, *args, grad_out=grad_out)
            impls.insert(2, Impl(RLKERN_INPLACE, inplace, "rlkern"))
            yield Case(FAMILY, op, shape.label, "fwd+bwd", impls, work=read + write, rows=shape.rows,
                       targets=_targets(shape, "fwd+bwd"), notes=notes)
