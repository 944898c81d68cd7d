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
    sum p^2 = sum_r w_r^2 P_r,   P_r = sum_{j in r} e^{2 (z_j - lse_r)}  (each shard's sum e^{2 (z - m_r)}
        rescaled by e^{2 (m_r - lse)}; with return_sum_p2, in the entropy's all-reduce)
A per-row temperature tensor scales each shard's logits by its row's 1 / T before all of this.
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
    row_inv_temperatures,
    shard_grads,
    shard_stats,
    torch_shard_dz,
    torch_shard_stats,
    torch_sum_p2,
    validate,
)

__all__ = [
    "vocab_parallel_logprobs",
    "vocab_parallel_linear_logprobs",
    "vocab_parallel_linear_outputs",
    "shard_range",
]

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


def _combine(lse_r: Tensor, ent_r: Tensor | None, zy_r: Tensor, group, want_entropy: bool,
             p2_r: Tensor | None = None):
    """Full-vocabulary (lse, entropy, z_y, sum p^2) from every rank's shard statistics (see module
    doc); entropy / sum p^2 are None unless asked for (``want_entropy`` / ``p2_r`` given: this shard's
    own sum_j p_j^2)."""
    top = lse_r.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    dead = top == NEG_INF  # every logit of the token is -inf on every rank
    top_safe = torch.where(dead, torch.zeros_like(top), top)
    w = torch.where(lse_r == NEG_INF, torch.zeros_like(lse_r), torch.exp(lse_r - top_safe))
    sums = torch.stack([w, zy_r])
    dist.all_reduce(sums, group=group)
    total, zy = sums[0], sums[1]
    lse = torch.where(dead, top, top_safe + torch.log(torch.where(dead, torch.ones_like(total), total)))
    if not want_entropy and p2_r is None:
        return lse, None, zy, None
    share = w / torch.where(dead, torch.ones_like(total), total)  # w_r = e^{lse_r - lse}
    # share == 0 (not > 0) selects the empty shards, so that a NaN share (a NaN or +inf logit on
    # some rank) makes the entropy / sum p^2 NaN instead of being dropped.
    empty = share == 0
    terms = []
    if want_entropy:
        terms.append(torch.where(empty, 0.0, share * (ent_r - torch.log(torch.where(empty, 1.0, share)))))
    if p2_r is not None:
        terms.append(torch.where(empty, 0.0, share * share * p2_r))
    terms = torch.stack(terms)
    dist.all_reduce(terms, group=group)
    terms = torch.where(dead, torch.zeros_like(terms), terms)  # a dead token: entropy 0, sum p^2 0
    ent = terms[0] if want_entropy else None
    p2 = terms[-1] if p2_r is not None else None
    return lse, ent, zy, p2


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
    runs, materialising one fp32 copy of the shard.

    ``inv_rows``: per-row inverse temperatures [N] (fp32; fp64 for fp64 logits) replacing
    ``1 / temperature``, or None. With ``want_p2`` the third output is sum p^2 (no gradient)."""

    @staticmethod
    def forward(ctx, logits2d, labels, group, temperature, inv_rows, ignore_index, want_entropy, want_p2,
                backend, vocab_start):
        inv_temp = 1.0 / temperature
        n = logits2d.shape[0]
        if backend == "cpp":
            m, s, t, zy_r = (torch.full((n,), NEG_INF), torch.zeros(n), torch.zeros(n), torch.zeros(n))
            q = torch.zeros(n) if want_p2 else None
            if n:
                cpp_kernels().lm_fold(
                    logits2d, None, labels, inv_temp, ignore_index, vocab_start, want_entropy, m, s, t, zy_r,
                    inv_rows, q,
                )
            lse_r, ent_r = finalize(m, s, t)
            # this shard's sum p^2 = Q / S^2 (0 for a shard whose logits are all -inf)
            p2_r = torch.where(s == 0, 0.0, q / torch.where(s == 0, 1.0, s) ** 2) if want_p2 else None
        else:
            z = logits2d.double() if logits2d.dtype == torch.float64 else logits2d.float()
            z = z * (inv_temp if inv_rows is None else inv_rows.to(z.dtype)[:, None])
            lse_r, ent_r, zy_r = torch_shard_stats(z, labels, ignore_index, vocab_start)
            p2_r = torch_sum_p2(z, lse_r) if want_p2 else None
        lse, ent, zy, p2 = _combine(lse_r, ent_r, zy_r, group, want_entropy, p2_r)
        logp = label_logprobs(zy, lse, labels, ignore_index)
        ctx.save_for_backward(logits2d, labels, lse, ent if ent is not None else lse, inv_rows)
        ctx.args = (ignore_index, want_entropy, backend, vocab_start, inv_temp)
        p2 = p2 if p2 is not None else lse.new_empty(0)
        ctx.mark_non_differentiable(p2)  # sum p^2 is used under no_grad (verl, TRL), as single-device
        return logp, (ent if ent is not None else lse.new_empty(0)), p2

    @staticmethod
    def backward(ctx, grad_logp, grad_ent, _grad_p2):
        logits2d, labels, lse, ent, inv_rows = ctx.saved_tensors
        ignore_index, want_entropy, backend, vocab_start, inv_temp = ctx.args
        grad_ent = grad_ent if want_entropy else None
        if backend == "cpp":
            out = new_output(logits2d.shape, device=logits2d.device, dtype=logits2d.dtype)
            out.copy_(logits2d)  # lm_grad turns logits into d logits in place
            if out.shape[0]:
                cpp_kernels().lm_grad(
                    out, None, labels, _present(grad_logp), _present(grad_ent), lse,
                    ent if want_entropy else None, inv_temp, ignore_index, vocab_start, inv_rows,
                )
            return out, *(None,) * 9
        z = logits2d.double() if logits2d.dtype == torch.float64 else logits2d.float()
        inv = inv_temp if inv_rows is None else inv_rows.to(z.dtype)[:, None]
        dz = torch_shard_dz(
            z * inv, labels, grad_logp, grad_ent, lse.to(z.dtype), ent.to(z.dtype) if want_entropy else None,
            ignore_index, vocab_start, inv,
        )
        return dz.to(logits2d.dtype), *(None,) * 9


def _temperature_rows(temperature, lead: torch.Size, device, dtype: torch.dtype):
    """(scalar temperature, None), or (1.0, flat per-row inverse temperatures) for a tensor that
    broadcasts to the tokens' shape (checked on CPU; see
    :func:`rlkern.ops.lm_tiles.row_inv_temperatures`)."""
    if not isinstance(temperature, Tensor):
        return check_positive(temperature, "temperature"), None
    inv = row_inv_temperatures(temperature, lead, device, check_values=device.type == "cpu",
                               dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return 1.0, inv


def vocab_parallel_logprobs(
    logits_shard: Tensor,
    labels: Tensor | None,
    process_group,
    *,
    temperature: float | Tensor = 1.0,
    ignore_index: int = -100,
    want_entropy: bool = False,
    want_sum_p2: bool = False,
) -> tuple[Tensor | None, ...]:
    """Log-probs (and entropy, and sum p^2) of the full vocabulary from this rank's logits shard.

    Args:
        logits_shard: ``[..., V_r]`` this rank's vocabulary columns (see the module doc for the
            layout), float32 / bfloat16 / float16 (float64 runs in torch).
        labels: ``[...]`` global token ids in ``[0, V)`` or ``ignore_index``, the same on every rank;
            None for entropy (or sum p^2) only.
        process_group: the ``torch.distributed`` group the vocabulary is sharded over.
        temperature: a number > 0, or a float tensor that broadcasts to ``[...]`` (one temperature
            per row, the same on every rank; its values are checked on CPU), as for
            :func:`rlkern.ops.logprobs`: each shard's logits are multiplied by float32(1 / T).
        want_sum_p2: also return ``sum_v p_v^2`` of the full-vocabulary softmax (float32 ``[...]``,
            no gradient), combined exactly from the shards' sums.

    Returns:
        ``(logp, entropy)``, float32 ``[...]`` each, identical on every rank (``(logp, entropy,
        sum_p2)`` with ``want_sum_p2``); ``logp`` is None without labels, ``entropy`` None unless
        ``want_entropy``. Backward gives this rank's d logits shard.
    """
    check_tensor(logits_shard, "logits_shard")
    if logits_shard.dim() == 0 or logits_shard.shape[-1] == 0:
        raise ValueError(
            f"logits_shard must have shape [..., V_r] with V_r >= 1, got {tuple(logits_shard.shape)}"
        )
    if labels is None and not want_entropy and not want_sum_p2:
        raise ValueError("vocab_parallel_logprobs needs labels, want_entropy=True or want_sum_p2=True")
    lead = logits_shard.shape[:-1]
    temperature, inv_rows = _temperature_rows(temperature, lead, logits_shard.device, logits_shard.dtype)
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
    logp, ent, p2 = _VocabParallelLogprobs.apply(
        logits2d, flat_labels, process_group, temperature, inv_rows, int(ignore_index), bool(want_entropy),
        bool(want_sum_p2), backend, vocab_start,
    )
    out = (logp.view(lead) if has_labels else None), (ent.view(lead) if want_entropy else None)
    return (*out, p2.view(lead)) if want_sum_p2 else out


# ------------------------------------------------------------------------------------------------
# LM head (weight rows) sharded by vocabulary
# ------------------------------------------------------------------------------------------------


class _VocabParallelLinearLogprobs(torch.autograd.Function):
    """The shard's statistics and gradients come from :func:`shard_stats` / :func:`shard_grads`, which
    call the backend's kernels (C++, Triton, or their plain-PyTorch twin for the torch backend) the
    same way; only the all-reduces are added here. ``inv_rows``: per-row inverse temperatures (fp32
    [N]) or None; with ``want_p2`` the third output is sum p^2 (no gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_rows, group, want_entropy, want_p2, *args):
        # args: temperature, ignore_index, vocab_start, chunk_size, backend, precision
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        p2_r = new_output((hidden.shape[0],), device=hidden.device, dtype=acc) if want_p2 else None
        lse_r, ent_r, zy_r = shard_stats(
            hidden, weight, bias, labels, *args[:3], want_entropy, *args[3:], inv_rows, p2_r
        )
        lse, ent, zy, p2 = _combine(lse_r, ent_r, zy_r, group, want_entropy, p2_r)
        logp = label_logprobs(zy, lse, labels, args[1])
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent if ent is not None else lse, inv_rows)
        ctx.group, ctx.want_entropy, ctx.args = group, want_entropy, args
        p2 = p2 if p2 is not None else lse.new_empty(0)
        ctx.mark_non_differentiable(p2)
        return logp, (ent if ent is not None else lse.new_empty(0)), p2

    @staticmethod
    def backward(ctx, grad_logp, grad_ent, _grad_p2):
        hidden, weight, bias, labels, lse, ent, inv_rows = ctx.saved_tensors
        if not ctx.want_entropy:
            grad_ent = ent = None
        gh, gw, gb = shard_grads(
            grad_logp, grad_ent, hidden, weight, bias, labels, lse, ent, *ctx.args, inv_rows
        )
        dist.all_reduce(gh, group=ctx.group)  # every shard's logits depend on the whole hidden state
        gb = gb.to(bias.dtype) if bias is not None else None
        return gh.to(hidden.dtype), gw, gb, *(None,) * 11


def vocab_parallel_linear_outputs(
    flat_hidden: Tensor, weight: Tensor, flat_labels: Tensor, process_group, bias: Tensor | None,
    temperature: float, inv_rows: Tensor | None, ignore_index: int, return_entropy: bool,
    return_sum_p2: bool, chunk_size: int | None, precision: str,
) -> tuple[Tensor, ...]:
    """The vocabulary-parallel head on arguments already checked (``linear_logprobs`` calls it after
    its ``rows`` selection): flat_hidden [N, H], flat_labels [N], inv_rows fp32 [N] or None.
    Returns ``(logp,)`` then entropy and sum p^2 when asked for, each [N]."""
    vocab_start, vocab = _shard_layout(weight.shape[0], process_group, weight.device)
    check_label_range(flat_labels, vocab, ignore_index)
    tensors = (flat_hidden, weight) if bias is None else (flat_hidden, weight, bias)
    backend = pick_backend(*tensors, flat_labels)
    logp, ent, p2 = _VocabParallelLinearLogprobs.apply(
        flat_hidden.contiguous(), weight.contiguous(), bias, flat_labels.to(torch.int64).contiguous(),
        inv_rows, process_group, bool(return_entropy), bool(return_sum_p2),
        temperature, ignore_index, vocab_start, chunk_size, backend, precision,
    )
    return (logp,) + ((ent,) if return_entropy else ()) + ((p2,) if return_sum_p2 else ())


def vocab_parallel_linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    process_group,
    *,
    bias: Tensor | None = None,
    temperature: float | Tensor = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    precision: str = "ieee",
    return_sum_p2: bool = False,
):
    """:func:`rlkern.ops.linear_logprobs` with ``weight`` ``[V_r, H]`` (and ``bias`` ``[V_r]``) this
    rank's vocabulary shard; ``hidden`` and ``labels`` (global ids) are replicated. Returns the
    full-vocabulary log-probs (then the entropy with ``return_entropy``, then sum p^2 with
    ``return_sum_p2``: a tuple in that order when either is asked for) on every rank; d hidden is
    summed over the group. ``temperature`` may be a per-row tensor (the same on every rank), as for
    linear_logprobs. ``precision`` ("ieee" or "tf32") is the Triton backend's fp32 GEMM mode."""
    temp_scalar = validate(hidden, weight, labels, bias, temperature, chunk_size)
    precision = check_precision(precision)
    lead = hidden.shape[:-1]
    on_cpu = hidden.device.type == "cpu"
    inv_rows = row_inv_temperatures(temperature, lead, hidden.device, check_values=on_cpu)
    outs = vocab_parallel_linear_outputs(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), process_group, bias, temp_scalar,
        inv_rows, int(ignore_index), return_entropy, return_sum_p2, chunk_size, precision,
    )
    outs = tuple(o.view(lead) for o in outs)
    return outs[0] if len(outs) == 1 else outs
