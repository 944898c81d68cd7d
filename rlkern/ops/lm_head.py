"""Token log-probs and entropy straight from hidden states and the LM head: ``linear_logprobs``.

The logits ``hidden @ weight.T + bias`` (``[N, V]``: 9.7 GB in fp32 for N = 16k, V = 152k) never
exist. Tokens x vocabulary are cut into tiles; each logits tile is one matmul into a reused
buffer, folded into per-token running statistics (max, sum-exp, label logit, sum p*z for entropy)
and overwritten by the next. Only lse and entropy (fp32, one each per token) are saved; backward
recomputes each tile, turns it into d logits in place and accumulates d hidden and d weight.

CPU: ``rlkern._C.linear_logprobs_fwd`` / ``_bwd`` (csrc/lm_head.cpp) run the tile loop. The
forward's logits tiles come from ``lm_logits`` (fp32 output for every input dtype, one fixed
summation order per logit, so a token's log-prob is the same bits in any batch and with any thread
count; AMX tiles for bf16 where the CPU has them, an AVX-512 / AVX2 loop with packed operands
otherwise), folded by ``lm_fold``; the backward recomputes each tile (MKL for fp32), turns it into
d logits with ``lm_grad`` and runs the gradient GEMMs through ATen (MKL sgemm for fp32,
oneDNN/AMX for bf16/fp16). GPU: kernels/lm_head.py, a Triton GEMM with the epilogue fused; both
are called the same way (rlkern/ops/lm_tiles.py). Oracle: rlkern.reference.linear_logprobs.

Precision: logits are fp32 sums of exact products (bf16 / fp16 products are exact in fp32) and are
never rounded to the input dtype (fp16 logits near 3e4 would be 16 apart), on both backends. The
softmax statistics are fp32. Backward rounds d logits to the input dtype for the two gradient
GEMMs (fp32 accumulation inside them); the sums of the per-tile products over tiles are fp32.

Non-finite inputs (every backend): a NaN in hidden, weight or bias makes the log-prob and entropy
of every token whose logits it reaches NaN (and their gradients NaN); a +inf logit (e.g. from an
inf in hidden) makes its token NaN too (its softmax is undefined in floating point); a -inf bias
entry bans that token (p = 0, no gradient), and a token whose logits are all -inf gets log-prob
-inf and entropy 0. ``nan_check=True`` raises instead, naming the argument and the first index.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlkern import reference
from rlkern.ops._common import (
    check_int,
    check_label_range,
    check_no_nan,
    check_number,
    check_tensor,
    new_output,
    pick_backend,
    raise_at_first,
    token_mask,
)
from rlkern.ops._registry import kernel_op
from rlkern.ops.lm_tiles import (
    check_precision,
    label_logprobs,
    row_inv_temperatures,
    shard_grads,
    shard_stats,
    validate,
)
from rlkern.ops.vocab_parallel import vocab_parallel_linear_outputs

__all__ = ["linear_logprobs", "linear_policy_loss"]


@kernel_op("linear_logprobs_fwd")
def _linear_logprobs_fwd(
    hidden: Tensor, want_entropy: bool, weight: Tensor, bias: Tensor | None, labels: Tensor,
    temperature: float, ignore_index: int, chunk_size: int, backend: str, precision: str,
    inv_rows: Tensor | None, want_sum_p2: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, H] contiguous, labels flat int64 [N]; chunk_size 0 = automatic; precision "ieee" or
    "tf32" (already checked); inv_rows: fp32 [N] per-row inverse temperatures (replacing
    1 / temperature) or None. Returns fp32 (logp [N], lse [N], entropy [N] or [0], sum p^2 [N] or [0])."""
    n = hidden.shape[0]
    p2 = new_output((n,), device=hidden.device, dtype=torch.float64 if hidden.dtype == torch.float64
                    else torch.float32) if want_sum_p2 else None
    lse, ent, zy = shard_stats(
        hidden, weight, bias, labels, temperature, ignore_index, 0, want_entropy, chunk_size or None, backend,
        precision, inv_rows, p2,
    )
    logp = label_logprobs(zy, lse, labels, ignore_index)
    # Each absent output is its own empty tensor: a custom op's outputs may not alias one another.
    return logp, lse, ent if ent is not None else lse.new_empty(0), p2 if p2 is not None else lse.new_empty(0)


@_linear_logprobs_fwd.register_fake
def _(hidden, want_entropy, weight, bias, labels, temperature, ignore_index, chunk_size, backend, precision,
      inv_rows, want_sum_p2):
    n = hidden.shape[0]
    new = lambda shape: hidden.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return new((n,)), new((n,)), new((n,) if want_entropy else (0,)), new((n,) if want_sum_p2 else (0,))


@kernel_op("linear_logprobs_bwd")
def _linear_logprobs_bwd(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, grad_logp: Tensor | None, grad_ent: Tensor | None,
    labels: Tensor, lse: Tensor, ent: Tensor | None, temperature: float, ignore_index: int, chunk_size: int,
    backend: str, precision: str, inv_rows: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d hidden in hidden's dtype, d weight in weight's dtype, d bias fp32 [V] or [0]); grad_logp /
    grad_ent fp32 [N] or None, ent given with grad_ent."""
    gh, gw, gb = shard_grads(
        grad_logp, grad_ent, hidden, weight, bias, labels, lse, ent, temperature, ignore_index, 0,
        chunk_size or None, backend, precision, inv_rows,
    )
    return gh.to(hidden.dtype), gw, gb if gb is not None else gh.new_empty(0)


@_linear_logprobs_bwd.register_fake
def _(hidden, weight, bias, *_):
    gb = hidden.new_empty(bias.shape if bias is not None else (0,), dtype=torch.float32)
    return torch.empty_like(hidden), torch.empty_like(weight), gb


def _setup_context(ctx, inputs, output):
    (hidden, want_entropy, weight, bias, labels, temperature, ignore_index, chunk_size, backend, precision,
     inv_rows, _) = inputs
    _, lse, ent, p2 = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, ent, inv_rows)
    # precision too: backward recomputes the logits, with the GEMMs of the forward.
    ctx.args = (want_entropy, temperature, ignore_index, chunk_size, backend, precision)
    # sum p^2 has no gradient (TRL's log_sum_sq_probs and verl's sum_pi_squared are used under no_grad).
    ctx.mark_non_differentiable(lse, p2)


def _backward(ctx, grad_logp, grad_lse, grad_ent, grad_p2):
    hidden, weight, bias, labels, lse, ent, inv_rows = ctx.saved_tensors
    want_entropy, *args = ctx.args
    grad_logp = grad_logp.float().contiguous() if grad_logp is not None else None
    grad_ent = grad_ent.float().contiguous() if want_entropy and grad_ent is not None else None
    gh, gw, gb = _linear_logprobs_bwd(
        hidden, weight, bias, grad_logp, grad_ent, labels, lse, ent if grad_ent is not None else None, *args,
        inv_rows,
    )
    gb = gb.to(bias.dtype) if bias is not None else None
    return gh, None, gw, gb, None, None, None, None, None, None, None, None


_linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_finite_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """nan_check=True: a NaN anywhere, or an inf in hidden / weight or a +inf bias (each can give a
    +inf logit, which makes its token NaN), raises naming the argument and the first index."""
    for t, name in ((hidden, "hidden"), (weight, "weight"), (bias, "bias")):
        check_no_nan(t, name)
    if torch.compiler.is_compiling():
        return
    for name, bad in (
        ("hidden", hidden.detach().isinf()),
        ("weight", weight.detach().isinf()),
        ("bias", None if bias is None else bias.detach() == math.inf),
    ):
        if bad is not None:
            raise_at_first(bad, name, "inf (nan_check=True; it can make a logit +inf and its token NaN)")


def _row_index(rows, lead: torch.Size, device, check: bool) -> Tensor | None:
    """``rows`` as flat int64 indices into the N = prod(lead) tokens (None: all tokens). A bool
    tensor of the tokens' shape selects its True entries (``nonzero``: one host sync on a GPU).
    Indices are checked (in range, distinct) when ``check`` (CPU tensors, or ``nan_check=True``)."""
    if rows is None:
        return None
    if not isinstance(rows, Tensor):
        raise TypeError(f"rows must be None or a tensor of token indices, got {type(rows).__name__}")
    if rows.device != device:
        raise ValueError(f"rows must be on the hidden states' device {device}, got {rows.device}")
    n = math.prod(lead)
    if rows.dtype == torch.bool:
        if tuple(rows.shape) not in (tuple(lead), (n,)):
            raise ValueError(f"a bool rows mask must have the tokens' shape {tuple(lead)}, got "
                             f"{tuple(rows.shape)}")
        return rows.reshape(-1).nonzero().squeeze(1)
    if rows.dtype not in (torch.int32, torch.int64) or rows.dim() != 1:
        raise TypeError(f"rows must be a 1-d int32 / int64 tensor of flat token indices (or a bool mask), "
                        f"got {rows.dtype} of shape {tuple(rows.shape)}")
    idx = rows.to(torch.int64).contiguous()
    if check and idx.numel() and not torch.compiler.is_compiling():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"rows must index the {n} tokens (0 <= i < {n}), got values in [{lo}, {hi}]")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("rows must not repeat an index (a repeated row would get its gradient twice)")
    return idx


def linear_logprobs(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
    temperature: float | Tensor = 1.0,
    ignore_index: int = -100, return_entropy: bool = False, chunk_size: int | None = None,
    process_group=None,
    nan_check: bool = False,
    precision: str = "ieee",
    rows: Tensor | None = None,
    return_sum_p2: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Log-probability of each label under softmax((hidden @ weight.T + bias) / temperature),
    without materialising the ``[..., V]`` logits.

    Args:
        hidden: ``[..., H]`` float32 / bfloat16 / float16 (float64 runs the reference), e.g. the
            last hidden state already shifted to align with ``labels``.
        weight: ``[V, H]`` LM head in hidden's dtype (``[V_shard, H]`` with ``process_group``).
        labels: ``[...]`` int32 / int64 token ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` (``[V_shard]`` with ``process_group``); ``-inf`` entries ban tokens.
        temperature: > 0 with a finite float32 reciprocal; the logits are multiplied by
            float32(1 / temperature) first. A Python / numpy number, or a float tensor that
            broadcasts to the tokens' shape ``[...]``: one temperature per token (``[B, T]``) or per
            sequence (``[B, 1]``; verl's per-sample temperature), used as float32, on hidden's
            device, not differentiated. A tensor's values are checked on CPU (a few ns a token); on
            a GPU only with ``nan_check=True`` (a sync), otherwise an invalid value gives its
            tokens meaningless (NaN / inf) results.
        ignore_index: an int (Python or numpy; 5.5 or True are refused): label value whose
            log-prob (and gradient) is 0.
        return_entropy: also return the entropy (nats) of the full distribution.
        chunk_size: vocabulary rows per tile of the CPU path; by default chosen from N, V and a
            memory budget (:func:`rlkern.ops.lm_tiles.tile_sizes`). The Triton kernels keep
            64 x 64 tiles in registers and ignore it.
        process_group: a ``torch.distributed`` group over which ``weight`` (and ``bias``) are
            sharded by vocabulary: rank r holds rows ``[r*ceil(V/world), (r+1)*ceil(V/world))``;
            every rank gets the full-vocabulary result and the gradient for its shard and hidden
            (see :mod:`rlkern.ops.vocab_parallel`), with every option here (``rows``, a
            temperature tensor, ``return_sum_p2``, combined exactly across the shards).
        nan_check: raise a ValueError naming the argument and the first index of a NaN (or of an
            inf in hidden / weight, a +inf in bias) instead of returning NaN (an extra pass over
            the inputs and a device sync; eager only); also checks a temperature tensor and
            ``rows`` on a GPU.
        precision: ``"ieee"`` (default) or ``"tf32"``: how the Triton (CUDA) backend multiplies
            fp32 hidden / weight. ``"ieee"`` gives fp32-accurate logits, so that the log-probs of an
            fp32 LM head agree between rollout and training (TRL #4303, NeMo-RL #3936); ``"tf32"``
            runs the GEMMs on the tensor cores with 10-bit mantissas, faster but ~1e-3 relative
            error in the logits. bf16 / fp16 inputs always use the tensor cores with fp32
            accumulation (their products are exact in fp32); the cpp backend computes fp32 in IEEE
            and the torch backend follows torch's matmul settings (IEEE by default) whatever this
            says, so there it changes nothing.
        rows: the tokens to compute, e.g. the response tokens of packed prompt + response
            sequences (prompt and tool tokens then cost nothing): a 1-d int32 / int64 tensor of
            distinct flat indices into the tokens ``[...]`` (``labels.reshape(-1)`` order), or a
            bool tensor of the tokens' shape (its True entries; one host sync on a GPU). Only these
            rows are gathered and run through the GEMMs, forward and backward, on every backend.
            The outputs keep the full shape ``[...]`` (so masks, ``[:, -T:]`` slices and verl's
            ``pad_input`` apply unchanged); the skipped tokens hold 0 in every output, as ignored
            labels do, and their hidden states get an exactly-0 gradient. On CPU (or with
            ``nan_check``) the indices are checked to be in range and distinct.
        return_sum_p2: also return ``sum_v p_v^2`` per token (float32 ``[...]``, in ``[1/V, 1]``),
            from the same vocabulary sweep: verl's ``sum_pi_squared`` (optimal token baseline),
            TRL's ``log_sum_sq_probs`` is its log. Not differentiable (both use it under no_grad);
            0 for a token whose logits are all -inf.

    Returns:
        float32 ``[...]`` log-probs ``z_y - logsumexp(z)`` (always <= 0), then float32 ``[...]``
        entropy in ``[0, ln V]`` when ``return_entropy``, then ``sum_v p_v^2`` when
        ``return_sum_p2``: a tensor alone when neither is asked for, else a tuple in that order.
        Gradients flow to hidden, weight and bias (in their dtypes). Non-finite inputs: see the
        module docstring (NaN in, NaN out).
    """
    temp_scalar = validate(hidden, weight, labels, bias, temperature, chunk_size)
    ignore_index = check_int(ignore_index, "ignore_index")
    precision = check_precision(precision)
    lead = hidden.shape[:-1]
    on_cpu = hidden.device.type == "cpu"
    inv_rows = row_inv_temperatures(temperature, lead, hidden.device, check_values=nan_check or on_cpu)
    idx = _row_index(rows, lead, hidden.device, check=nan_check or on_cpu)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    if idx is not None:  # the selected tokens only, compact; their results are scattered back below
        flat_hidden, flat_labels = flat_hidden.index_select(0, idx), flat_labels.index_select(0, idx)
        inv_rows = inv_rows.index_select(0, idx) if inv_rows is not None else None
    if nan_check:
        _check_finite_inputs(flat_hidden, weight, bias)
    if process_group is not None:
        outs = vocab_parallel_linear_outputs(
            flat_hidden, weight, flat_labels, process_group, bias, temp_scalar, inv_rows, ignore_index,
            return_entropy, return_sum_p2, chunk_size, precision,
        )
    else:
        tensors = (hidden, weight) if bias is None else (hidden, weight, bias)
        backend = pick_backend(*tensors, labels)
        check_label_range(flat_labels, weight.shape[0], ignore_index)
        if backend == "torch":
            outs = reference.linear_logprobs_options(
                flat_hidden, weight, flat_labels, bias=bias,
                temperature=temp_scalar if inv_rows is None else 1.0 / inv_rows.double(),
                ignore_index=ignore_index, return_entropy=return_entropy, return_sum_p2=return_sum_p2,
            )
            outs = outs if isinstance(outs, tuple) else (outs,)
            if return_sum_p2:  # not differentiable, as on the kernel backends
                outs = (*outs[:-1], outs[-1].detach())
        else:
            logp, _, ent, p2 = _linear_logprobs_fwd(
                flat_hidden.contiguous(), bool(return_entropy), weight.contiguous(), bias,
                flat_labels.to(torch.int64).contiguous(), temp_scalar, ignore_index, int(chunk_size or 0),
                backend, precision, inv_rows, bool(return_sum_p2),
            )
            outs = (logp,) + ((ent,) if return_entropy else ()) + ((p2,) if return_sum_p2 else ())
    if idx is not None:
        full = labels.numel()
        outs = tuple(o.new_zeros(full).index_copy(0, idx, o) for o in outs)
    outs = tuple(o.view(lead) for o in outs)
    return outs[0] if len(outs) == 1 else outs


class _AttachGradients(torch.autograd.Function):
    """Gives a loss computed without autograd the gradients already computed for its inputs:
    backward returns them scaled by the upstream gradient (the loss is a scalar, so this is exact).

    The gradients are kept as ctx attributes rather than saved tensors and handed over (scaled in
    place) on the one backward, so that autograd can take them as ``.grad`` without a copy: the
    d weight of an LM head is [V, H], a copy would double the op's peak memory."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, grad_hidden, grad_weight):
        ctx.grads = (grad_hidden, grad_weight)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "linear_policy_loss supports a single backward pass (its gradients are computed in the "
                "forward and handed over once); recompute the loss to differentiate it again"
            )
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return None, grad_hidden, grad_weight, None, None


def _check_policy_inputs(labels: Tensor, old_logp, advantages, mask, ref_logp) -> Tensor:
    """Shapes of the per-token inputs against labels' ``[..., T]``, with the argument's name (the
    kernels would fail later with a bare reshape error). Returns the mask in its own dtype
    (:func:`token_mask`: no conversion pass; the loss kernels read it natively)."""
    shape = tuple(labels.shape)
    if len(shape) == 0:
        raise ValueError("labels must have shape [..., T] for linear_policy_loss, got a 0-d tensor")
    mask = token_mask(mask, "mask", labels.shape)
    for t, name in ((old_logp, "old_logp"), (ref_logp, "ref_logp")):
        if t is None:
            continue
        check_tensor(t, name)
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name} must have labels' shape {shape} (one entry per token), got {tuple(t.shape)}"
            )
    check_tensor(advantages, "advantages")
    if tuple(advantages.shape) not in (shape, shape[:-1]):
        raise ValueError(
            f"advantages must have shape {shape[:-1]} (one per sequence) or {shape} (one per token), "
            f"got {tuple(advantages.shape)}"
        )
    return mask


def linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    loss_type: str = "grpo",
    temperature: float | Tensor = 1.0,
    chunk_size: int | None = None,
    precision: str = "ieee",
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO / PPO clipped policy loss straight from the last hidden state: the log-probs of
    :func:`linear_logprobs` fed to :func:`rlkern.ops.losses.grpo_loss` (same maths, same code:
    ``grpo_loss_and_grad``), without the ``[B, T, V]`` logits.

    Args:
        hidden: ``[B, T, H]`` (any leading dims ``[..., T, H]``), float32 / bfloat16 / float16.
        weight: ``[V, H]`` LM head in hidden's dtype.
        labels: ``[B, T]`` token ids (positions outside ``mask`` may hold ``-100``).
        old_logp, mask: ``[B, T]``; advantages: ``[B]`` or ``[B, T]``; ref_logp: ``[B, T]``, needed
            when ``beta > 0``. The mask may be bool or 0/1 of any real dtype (nonzero = valid), read
            in its own dtype.
        beta, clip_low, clip_high, loss_type: as for ``grpo_loss`` (``grpo``, ``bnpo``, ``dr_grpo``,
            ``dapo``).
        temperature: as for :func:`linear_logprobs`: a number, or a float tensor that broadcasts to
            ``labels``' shape (one temperature per token, or ``[B, 1]`` per sequence; not
            differentiated, checked on CPU).
        chunk_size: vocabulary rows per tile, as for :func:`linear_logprobs`.
        precision: ``"ieee"`` (default) or ``"tf32"``, as for :func:`linear_logprobs`: fp32 on the
            Triton backend only; IEEE keeps the training log-probs (and so the importance ratio
            against ``old_logp``) consistent with an fp32 rollout.

    The per-token inputs are checked against ``labels``' shape (a ValueError naming the argument).
    A NaN or +inf logit makes that token's log-prob NaN, as in :func:`linear_logprobs`; the loss is
    then what ``grpo_loss`` makes of a NaN log-prob.

    Returns:
        ``(loss, stats)`` as from ``grpo_loss``; the gradient reaches ``hidden`` and ``weight``.
        The gradients are computed during the forward (d loss / d logp is known once the log-probs
        are, because the output is a scalar) and only scaled in backward.
    """
    from rlkern.ops.losses import grpo_loss, grpo_loss_and_grad

    temp_tensor = temperature
    temperature = validate(hidden, weight, labels, None, temperature, chunk_size)
    precision = check_precision(precision)
    mask = _check_policy_inputs(labels, old_logp, advantages, mask, ref_logp)
    inv_rows = row_inv_temperatures(temp_tensor, labels.shape, hidden.device,
                                    check_values=hidden.device.type == "cpu")
    if ref_logp is None:
        if check_number(beta, "beta") != 0.0:
            raise ValueError(f"ref_logp is required when beta > 0 (got beta={beta})")
    backend = pick_backend(hidden, weight, labels)
    check_label_range(labels, weight.shape[0], -100)
    kwargs = dict(beta=beta, clip_low=clip_low, clip_high=clip_high, loss_type=loss_type)
    if backend == "torch":
        t = temperature if inv_rows is None else 1.0 / inv_rows.double().view(labels.shape)
        logp = reference.linear_logprobs(hidden, weight, labels, temperature=t)
        ref = ref_logp if ref_logp is not None else logp.detach()
        return grpo_loss(logp, old_logp, ref, advantages, mask, **kwargs)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    w = weight.contiguous()
    # Log-probs first (linear_logprobs' forward, so the same bits), then one backward pass, vocabulary-outer,
    # that writes d weight tile by tile in the weight's dtype. A single pass that keeps each [tile, V]
    # fp32 logits tile between its fold and its gradient saves one GEMM but streams the tile through
    # memory four times: at N=1024, H=512, V=32768 fp32 on this 2-core CPU it took 1213 ms against
    # 1094 ms for linear_logprobs' forward + backward (1 thread, one run, 2026-12-01), so it was removed.
    with torch.no_grad():
        lse, _, zy = shard_stats(
            flat_hidden, w, None, flat_labels, temperature, -100, 0, False, chunk_size, backend, precision,
            inv_rows,
        )
        logp = label_logprobs(zy, lse, flat_labels, -100).view(labels.shape)
        ref = ref_logp if ref_logp is not None else logp
        loss, grad_logp, stats = grpo_loss_and_grad(logp, old_logp, ref, advantages, mask, **kwargs)
        gh, gw, _ = shard_grads(
            grad_logp.reshape(-1), None, flat_hidden, w, None, flat_labels, lse, None, temperature, -100, 0,
            chunk_size, backend, precision, inv_rows,
        )
    loss = _AttachGradients.apply(loss, hidden, weight, gh.to(hidden.dtype).view(hidden.shape), gw)
    return loss, stats
