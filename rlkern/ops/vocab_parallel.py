"""Vocabulary-parallel log-probs and entropy: the vocabulary (LM-head rows, or logits columns) is
sharded across the ranks of a process group, as in Megatron / verl tensor parallelism.

Rank r holds vocabulary ids [r * c, min(V, (r + 1) * c)) with c = ceil(V / world) (the last shard
may be shorter); labels are global ids and identical on every rank. Each rank reduces its shard
to three numbers per token (fp32): its log-sum-exp lse_r, its entropy H_r (of the softmax over its
shard alone) and the label's logit z_y (0 if the label lives elsewhere). Three all-reduces give
the full-vocabulary answer on every rank:
    lse = M + log sum_r e^{lse_r - M},   M = max_r lse_r        (all-reduce max, then sum)
    logp = sum_r z_y,r - lse                                      (one rank owns the label)
    H = sum_r w_r (H_r - log w_r),   w_r = e^{lse_r - lse}        (the entropy of a mixture of the
        shards' softmaxes with weights w_r: H = sum_r w_r H_r + the entropy of w; no cancellation)
Non-finite logits follow linear_logprobs / logprobs: a NaN or +inf logit on any rank makes its
token's outputs NaN on every rank (the NaN reaches the all-reduced sums), -inf bans a token.
Backward needs only the global lse and H: each rank's d logits are those of the global softmax
restricted to its shard. For the fused LM head, d hidden is a sum over shards (all-reduce);
d weight / d bias stay on their rank. The upstream gradients must be the same on every rank (the
loss is computed from the replicated outputs), as in Megatron's vocab-parallel cross-entropy.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from rlkern.ops._common import (
    check_label_range,
    check_labels,
    check_positive,
    check_tensor,
    new_output,
    pick_backend,
)
from rlkern.ops._registry import cpp_kernels
from rlkern.ops.lm_tiles import (
    NEG_INF,
    check_precision,
    finalize,
    label_logprobs,
    shard_grads,
    shard_stats,
    torch_shard_dz,
    torch_shard_stats,
    validate,
)

__all__ = ["vocab_parallel_logprobs", "vocab_parallel_linear_logprobs", "shard_range"]

def shard_range(vocab: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank's vocabulary shard: ceil(V / world) ids per rank, the last one shorter."""
    per = -(-vocab // world)
    return min(rank * per, vocab), min((rank + 1) * per, vocab)


def _shard_layout(local_vocab: int, group, device) -> tuple[int, int]:
    """(vocab_start, V) of this rank's shard, from every rank's shard size; checks the layout."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)  # on the tensors' device, as NCCL needs
    sizes[rank] = local_vocab
    dist.all_reduce(sizes, group=group)
    vocab = int(sizes.sum())
    expected = [shard_range(vocab, world, r) for r in range(world)]
    sizes = sizes.cpu()
    if [e - s for s, e in expected] != sizes.tolist():
        raise ValueError(
            f"vocabulary shards must hold ceil(V/world) = {-(-vocab // world)} ids each on every rank "
            f"but the last (V = {vocab}, world = {world}); got shard sizes {sizes.tolist()}"
        )
    return expected[rank][0], vocab


def _combine(lse_r: Tensor, ent_r: Tensor, zy_r: Tensor, group, want_entropy: bool):
    """Full-vocabulary (lse, entropy, z_y) from every rank's shard statistics (see module doc)."""
    top = lse_r.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    dead = top == NEG_INF  # every logit of the token is -inf on every rank
    top_safe = torch.where(dead, torch.zeros_like(top), top)
    w = torch.where(lse_r == NEG_INF, torch.zeros_like(lse_r), torch.exp(lse_r - top_safe))
    sums = torch.stack([w, zy_r])
    dist.all_reduce(sums, group=group)
    total, zy = sums[0], sums[1]
    lse = torch.where(dead, top, top_safe + torch.log(torch.where(dead, torch.ones_like(total), total)))
    ent = None
    if want_entropy:
        share = w / torch.where(dead, torch.ones_like(total), total)
        # share == 0 (not > 0) selects the empty shards, so that a NaN share (a NaN or +inf logit on
        # some rank) makes the entropy NaN instead of being dropped.
        term = torch.where(share == 0, 0.0, share * (ent_r - torch.log(torch.where(share == 0, 1.0, share))))
        dist.all_reduce(term, group=group)
        ent = torch.where(dead, torch.zeros_like(term), term)
    return lse, ent, zy


def _present(t: Tensor | None) -> Tensor | None:
    return t.float().contiguous() if t is not None else None


# ------------------------------------------------------------------------------------------------
# Logits sharded by vocabulary
# ------------------------------------------------------------------------------------------------


class _VocabParallelLogprobs(torch.autograd.Function):
    """A logits shard: lm_fold / lm_grad on the C++ backend, the same maths in torch otherwise.

    The one backend branch of this module, kept on purpose: the shard needs the fold and the
    gradient of a tile whose labels are global ids (``vocab_start``) and whose gradient uses the
    *global* lse and entropy, and only the C++ tile primitives have that contract. The logits
    family's kernels (``logprobs_fwd`` / ``_bwd``, C++ and Triton) would treat a token whose label
    lives on another rank as ignored and drop its -g p_j terms, so they cannot stand in; a Triton
    lm_fold / lm_grad is not written yet (no GPU here to check it). On a GPU the torch maths below
    runs, materialising one fp32 copy of the shard."""

    @staticmethod
    def forward(ctx, logits2d, labels, group, temperature, ignore_index, want_entropy, backend, vocab_start):
        inv_temp = 1.0 / temperature
        n = logits2d.shape[0]
        if backend == "cpp":
            m, s, t, zy_r = (torch.full((n,), NEG_INF), torch.zeros(n), torch.zeros(n), torch.zeros(n))
            if n:
                cpp_kernels().lm_fold(
                    logits2d, None, labels, inv_temp, ignore_index, vocab_start, want_entropy, m, s, t, zy_r
                )
            lse_r, ent_r = finalize(m, s, t)
        else:
            z = logits2d.double() if logits2d.dtype == torch.float64 else logits2d.float()
            lse_r, ent_r, zy_r = torch_shard_stats(z * inv_temp, labels, ignore_index, vocab_start)
        lse, ent, zy = _combine(lse_r, ent_r, zy_r, group, want_entropy)
        logp = label_logprobs(zy, lse, labels, ignore_index)
        ctx.save_for_backward(logits2d, labels, lse, ent if ent is not None else lse)
        ctx.args = (ignore_index, want_entropy, backend, vocab_start, inv_temp)
        return logp, (ent if ent is not None else lse.new_empty(0))

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        logits2d, labels, lse, ent = ctx.saved_tensors
        ignore_index, want_entropy, backend, vocab_start, inv_temp = ctx.args
        grad_ent = grad_ent if want_entropy else None
        if backend == "cpp":
            out = new_output(logits2d.shape, device=logits2d.device, dtype=logits2d.dtype)
            out.copy_(logits2d)  # lm_grad turns logits into d logits in place
            if out.shape[0]:
                cpp_kernels().lm_grad(
                    out,
                    None,
                    labels,
                    _present(grad_logp),
                    _present(grad_ent),
                    lse,
                    ent if want_entropy else None,
                    inv_temp,
                    ignore_index,
                    vocab_start,
                )
            return out, None, None, None, None, None, None, None
        z = logits2d.double() if logits2d.dtype == torch.float64 else logits2d.float()
        dz = torch_shard_dz(
            z * inv_temp,
            labels,
            grad_logp,
            grad_ent,
            lse.to(z.dtype),
            ent.to(z.dtype) if want_entropy else None,
            ignore_index,
            vocab_start,
            inv_temp,
        )
        return dz.to(logits2d.dtype), None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits_shard: Tensor,
    labels: Tensor | None,
    process_group,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    want_entropy: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """Log-probs (and entropy) of the full vocabulary from this rank's logits shard.

    Args:
        logits_shard: ``[..., V_r]`` this rank's vocabulary columns (see the module doc for the
            layout), float32 / bfloat16 / float16 (float64 runs in torch).
        labels: ``[...]`` global token ids in ``[0, V)`` or ``ignore_index``, the same on every rank;
            None for entropy only.
        process_group: the ``torch.distributed`` group the vocabulary is sharded over.

    Returns:
        ``(logp, entropy)``, float32 ``[...]`` each, identical on every rank; ``logp`` is None
        without labels, ``entropy`` None unless ``want_entropy``. Backward gives this rank's
        d logits shard.
    """
    check_tensor(logits_shard, "logits_shard")
    if logits_shard.dim() == 0 or logits_shard.shape[-1] == 0:
        raise ValueError(
            f"logits_shard must have shape [..., V_r] with V_r >= 1, got {tuple(logits_shard.shape)}"
        )
    if labels is None and not want_entropy:
        raise ValueError("vocab_parallel_logprobs needs labels, want_entropy=True, or both")
    temperature = check_positive(temperature, "temperature")
    lead = logits_shard.shape[:-1]
    vocab_start, vocab = _shard_layout(logits_shard.shape[-1], process_group, logits_shard.device)
    has_labels = labels is not None
    if has_labels:
        check_labels(labels, "labels", lead)
        check_label_range(labels, vocab, int(ignore_index))
        flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    else:  # entropy only: every label "ignored"
        flat_labels = torch.full(
            (math.prod(lead),), int(ignore_index), dtype=torch.int64, device=logits_shard.device
        )
    backend = pick_backend(logits_shard)
    logits2d = logits_shard.reshape(-1, logits_shard.shape[-1])
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    logp, ent = _VocabParallelLogprobs.apply(
        logits2d,
        flat_labels,
        process_group,
        temperature,
        int(ignore_index),
        bool(want_entropy),
        backend,
        vocab_start,
    )
    return (logp.view(lead) if has_labels else None), (ent.view(lead) if want_entropy else None)


# ------------------------------------------------------------------------------------------------
# LM head (weight rows) sharded by vocabulary
# ------------------------------------------------------------------------------------------------


class _VocabParallelLinearLogprobs(torch.autograd.Function):
    """The shard's statistics and gradients come from :func:`shard_stats` / :func:`shard_grads`, which
    call the backend's kernels (C++, Triton, or their plain-PyTorch twin for the torch backend) the
    same way; only the all-reduces are added here."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, group, want_entropy, *args):
        # args: temperature, ignore_index, vocab_start, chunk_size, backend, precision
        lse_r, ent_r, zy_r = shard_stats(hidden, weight, bias, labels, *args[:3], want_entropy, *args[3:])
        lse, ent, zy = _combine(lse_r, ent_r, zy_r, group, want_entropy)
        logp = label_logprobs(zy, lse, labels, args[1])
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent if ent is not None else lse)
        ctx.group, ctx.want_entropy, ctx.args = group, want_entropy, args
        return logp, (ent if ent is not None else lse.new_empty(0))

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        if not ctx.want_entropy:
            grad_ent = ent = None
        gh, gw, gb = shard_grads(grad_logp, grad_ent, hidden, weight, bias, labels, lse, ent, *ctx.args)
        dist.all_reduce(gh, group=ctx.group)  # every shard's logits depend on the whole hidden state
        gb = gb.to(bias.dtype) if bias is not None else None
        return gh.to(hidden.dtype), gw, gb, None, None, None, None, None, None, None, None, None


def vocab_parallel_linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    process_group,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    precision: str = "ieee",
):
    """:func:`rlkern.ops.linear_logprobs` with ``weight`` ``[V_r, H]`` (and ``bias`` ``[V_r]``) this
    rank's vocabulary shard; ``hidden`` and ``labels`` (global ids) are replicated. Returns the
    full-vocabulary log-probs (and entropy) on every rank; d hidden is summed over the group.
    ``precision`` ("ieee" or "tf32") is the Triton backend's fp32 GEMM mode, as for linear_logprobs."""
    temperature = validate(hidden, weight, labels, bias, temperature, chunk_size)
    precision = check_precision(precision)
    vocab_start, vocab = _shard_layout(weight.shape[0], process_group, weight.device)
    check_label_range(labels, vocab, int(ignore_index))
    tensors = (hidden, weight) if bias is None else (hidden, weight, bias)
    backend = pick_backend(*tensors, labels)
    lead = hidden.shape[:-1]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    logp, ent = _VocabParallelLinearLogprobs.apply(
        flat_hidden, weight.contiguous(), bias, flat_labels, process_group, bool(return_entropy),
        temperature, int(ignore_index), vocab_start, chunk_size, backend, precision,
    )
    return (logp.view(lead), ent.view(lead)) if return_entropy else logp.view(lead)
