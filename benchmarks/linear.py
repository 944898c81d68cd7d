"""Benchmark family ``linear`` (issue #4): log-probs straight from hidden states and the LM head.

Forward+backward (gradients for hidden and weight) of ``rlkern.ops.linear_logprobs`` against the
naive path (logits = hidden @ weight^T materialised, fp32 log_softmax + gather), TRL's
``ChunkedLogProbFunction`` (installed TRL) and the GEMM floor: the three N*H*V matmuls any
forward+backward needs (logits, d hidden, d weight), timed alone in the same run into preallocated
outputs. The rate column is GFLOP/s of those 3 * 2*N*H*V flops. ``linear_policy_loss`` (GRPO loss
from hidden states, beta = 0.04) runs against the naive path and TRL's chunked function, each
followed by TRL's GRPO loss, with the same GEMM floor.

Shapes: the default run holds N=1024,H=512,V=32768 in fp32 and bf16 and N=2048,H=1024,V=151936 in
bf16. The same large shape in fp32 is in ``SHAPES["large"]`` (``--large``): one fp32 GEMM of it
takes ~4.5 s on this 2-core CPU (bf16 runs on AMX, ~0.5 s), so its case alone (4 implementations x
7 calls of 13-35 s) would take most of the 15-minute budget of a full run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from benchmarks import peers
from benchmarks.harness import Case, Impl, Target, dtype_label

FAMILY = "linear"
RLKERN = "rlkern (cpp)"
TRL = "TRL ChunkedLogProbFunction"
NAIVE = "naive matmul + log_softmax + gather"


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    vocab: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"N={self.tokens},H={self.hidden},V={self.vocab} {dtype_label(self.dtype)}"

    @property
    def gemm_flops(self) -> float:
        return 2.0 * self.tokens * self.hidden * self.vocab


SHAPES = {
    "full": [Shape(1024, 512, 32768, torch.float32), Shape(1024, 512, 32768, torch.bfloat16),
             Shape(2048, 1024, 151936, torch.bfloat16)],
    "large": [Shape(2048, 1024, 151936, torch.float32)],
    "quick": [Shape(256, 256, 8192, torch.float32), Shape(256, 256, 8192, torch.bfloat16)],
}


def _gemm_floor(hidden: torch.Tensor, weight: torch.Tensor):
    """The three matmuls of a forward+backward, into preallocated outputs: z = h W^T, dh = dz W,
    dW = dz^T h (dz a fixed random [N, V] in the input dtype)."""
    n, v = hidden.shape[0], weight.shape[0]
    z = torch.empty(n, v, dtype=hidden.dtype)
    dz = torch.randn(n, v).to(hidden.dtype)
    dh = torch.empty_like(hidden)
    dw = torch.empty_like(weight)

    def call():
        torch.mm(hidden, weight.t(), out=z)
        torch.mm(dz, weight, out=dh)
        torch.mm(dz.t(), hidden, out=dw)

    return call


def _forward_backward(fn, hidden, weight, *rest, grad_out):
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)

    def call():
        out = fn(h, w, *rest)
        return torch.autograd.grad(out, (h, w), grad_out)

    return call


def _rlkern_linear_logprobs(hidden, weight, labels):
    import rlkern

    with rlkern.use_backend("cpp"):
        return rlkern.ops.linear_logprobs(hidden, weight, labels)


def _policy_loss_case(shape: Shape, hidden, weight, labels, floor) -> Case | None:
    import rlkern

    op = getattr(rlkern.ops, "linear_policy_loss", None)
    if op is None:
        return None
    seq = 256 if shape.tokens % 256 == 0 else shape.tokens
    b = shape.tokens // seq
    hid3, lab2 = hidden.view(b, seq, -1), labels.view(b, seq)
    old = -torch.rand(b, seq) * 3
    ref = old + 0.1 * torch.randn(b, seq)
    adv = torch.randn(b)
    mask = torch.ones(b, seq, dtype=torch.bool)
    mask_f = mask.float()

    def rl(h, w):
        with rlkern.use_backend("cpp"):
            out = op(h, w, lab2, old, adv, mask, ref_logp=ref, beta=0.04)
        return out[0] if isinstance(out, tuple) else out

    def naive(h, w):
        logp = peers.naive_linear_logprobs(h.reshape(-1, h.shape[-1]), w, labels).view(b, seq)
        return peers.trl_grpo_loss(logp, old, ref, adv, mask_f)

    def trl_chunked(h, w):
        logp = peers.trl_chunked_logprobs(h.reshape(-1, h.shape[-1]), w, labels).view(b, seq)
        return peers.trl_grpo_loss(logp, old, ref, adv, mask_f)

    def fwd_bwd(fn):
        h = hid3.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        return lambda: torch.autograd.grad(fn(h, w), (h, w))

    trl_name = f"{TRL} + TRL GRPO loss"
    impls = [Impl("floor: 3 GEMMs (z, dh, dW)", floor, "floor"), Impl(RLKERN, fwd_bwd(rl), "rlkern"),
             Impl(f"{NAIVE} + TRL GRPO loss", fwd_bwd(naive))]
    if peers.trl_chunked_available() is None:
        impls.append(Impl(trl_name, fwd_bwd(trl_chunked)))
    return Case(FAMILY, "linear_policy_loss", shape.label, "fwd+bwd", impls, work=3 * shape.gemm_flops,
                unit="GFLOP/s", rows=shape.tokens,
                targets=[Target("forward+backward <= 1.15x GEMM floor", RLKERN, "x_floor", 1.15),
                         Target(">= 2x faster than TRL's chunked function", RLKERN, "speedup", 2.0,
                                trl_name)])


def cases(shapes: list[Shape], *, compile: bool = True) -> Iterator[Case]:
    """Yields the cases shape by shape. ``compile`` is accepted for the common family interface;
    this family has no torch.compile rows (the naive path is GEMM-bound, compile does not change it)."""
    import rlkern

    notes = []
    trl_missing = peers.trl_chunked_available()
    if trl_missing:
        notes.append(f"TRL rows skipped: {trl_missing}")
    has_op = getattr(rlkern.ops, "linear_logprobs", None) is not None
    if not has_op:
        notes.append("rlkern.ops.linear_logprobs is not in this checkout yet; rlkern rows omitted")
    if getattr(rlkern.ops, "linear_policy_loss", None) is None:
        notes.append("rlkern.ops.linear_policy_loss is not in this checkout yet; its case is omitted")
    for shape in shapes:
        hidden = (torch.randn(shape.tokens, shape.hidden) / shape.hidden**0.25).to(shape.dtype)
        weight = (torch.randn(shape.vocab, shape.hidden) / shape.hidden**0.25).to(shape.dtype)
        labels = torch.randint(0, shape.vocab, (shape.tokens,))
        grad_out = torch.randn(shape.tokens)
        floor = _gemm_floor(hidden, weight)
        impls = [Impl("floor: 3 GEMMs (z, dh, dW)", floor, "floor")]
        if has_op:
            impls.append(Impl(RLKERN, _forward_backward(_rlkern_linear_logprobs, hidden, weight, labels,
                                                        grad_out=grad_out), "rlkern"))
        impls.append(Impl(NAIVE, _forward_backward(peers.naive_linear_logprobs, hidden, weight, labels,
                                                   grad_out=grad_out)))
        if not trl_missing:
            impls.append(Impl(TRL, _forward_backward(peers.trl_chunked_logprobs, hidden, weight, labels,
                                                     grad_out=grad_out)))
        yield Case(FAMILY, "linear_logprobs", shape.label, "fwd+bwd", impls, work=3 * shape.gemm_flops,
                   unit="GFLOP/s", rows=shape.tokens, notes=notes,
                   targets=[Target("forward+backward <= 1.45x GEMM floor", RLKERN, "x_floor", 1.45),
                            Target(">= 2x faster than TRL's chunked function", RLKERN, "speedup", 2.0, TRL),
                            Target("extra peak <= 5% of the naive path's", RLKERN, "mem_fraction", 0.05,
                                   NAIVE)])
        policy_case = _policy_loss_case(shape, hidden, weight, labels, floor)
        if policy_case is not None:
            yield policy_case
