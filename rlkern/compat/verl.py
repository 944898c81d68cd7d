"""verl's names, signatures, defaults and numerics on rlkern.ops.

Mirrors volcengine/verl 0.9.1 ``verl/trainer/ppo/core_algos.py`` and ``verl/utils/torch_functional.py``
(the ``register_adv_est`` / ``register_policy_loss`` registries; ``agg_loss`` with five modes and the
global-batch arguments ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size`` /
``loss_scale_factor``; ``compute_policy_loss_vanilla`` returning ``(loss, metrics)``), and tested
against that installed release by tests/test_compat_verl_installed.py. ``rlkern.compat.patch("verl")`` swaps
these into an installed verl, registries included, and the actor's log-prob / entropy path:
``logprobs_from_logits`` (and its ``_v2`` / ``_naive`` variants), ``entropy_from_logits`` and
``entropy_from_logits_with_chunking``, and with ``use_fused_kernels`` the fused head
``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (verl imports it inside its model
forwards at call time, so patching the module attribute reaches every caller).

verl-specific numerics reproduced here (each cited where it is used):
- ``masked_mean`` divides by ``mask.sum() + 1e-8`` (so an empty mask gives 0, not NaN);
  ``masked_var`` is unbiased by default and raises on a mask with fewer than two elements;
  ``masked_whiten`` multiplies by ``rsqrt(var + 1e-8)``.
- GAE carries the next value and the running advantage through masked positions (multi-turn gaps),
  then whitens the advantages over the mask.
- GRPO divides by ``std + 1e-6`` (unbiased std); a group of one has mean 0 and std 1.
- Every entry of ``ADV_ESTIMATOR_REGISTRY`` (14 in 0.9.1) is replaced. The group estimators (grpo,
  grpo_vectorized, gdpo, grpo_passk, reinforce_plus_plus_baseline, rloo, rloo_vectorized, opo, gpg)
  run on rlkern.ops.outcome_advantages with each one's own conventions (singleton groups, epsilons,
  config fields, grouping of uids); the optimal token baselines on rlkern.ops.optimal_token_baseline;
  remax's reward-to-go on rlkern.ops.gae. verl's Python loops over responses and groups, and its
  ``.item()`` / ``nonzero`` per group, are gone: group ids are built once on the host from verl's
  numpy uids. What still reads the device: verl's masked_whiten check (fewer than two valid tokens
  raises), used by gdpo and the REINFORCE++ estimators.
- Rollout correction (``verl.trainer.ppo.rollout_corr_helper``): ``compute_rollout_correction_weights``,
  ``compute_rollout_rejection_mask``, ``compute_rollout_correction_and_rejection_mask`` (which
  ``compute_rollout_correction_and_add_to_batch`` and the ``bypass_mode`` loss look up at call time),
  ``compute_offpolicy_metrics`` and ``compute_rollout_corr_metrics_from_logprobs`` run on one
  rlkern.ops.rollout_correction call each, with verl's thresholds parsing, ±20 clamps, mask semantics,
  messages and metric names; the metrics are read back in one transfer instead of one ``.item()`` each.
  ``apply_bypass_mode`` (config plumbing, no maths) and the metric helpers ``compute_is_metrics`` /
  ``compute_rs_metrics`` (which take verl's intermediate tensors) are left as they are.
- ``low_var_kl``/``k3`` clamps the log-ratio to [-20, 20] before exp and the result to [-10, 10].
- The policy loss clamps the log-ratio to [-20, 20] and always applies dual-clip (``clip_ratio_c=3``).
- Every entry of ``POLICY_LOSS_REGISTRY`` (12 in 0.9.1) is replaced: ``vanilla`` here, the other 11
  (and bypass_mode's ``compute_policy_loss_reinforce``) in rlkern/compat/verl_policy.py, re-exported
  here; KL-Cov / Clip-Cov select their tokens with rlkern.ops.kl_cov_mask / clip_cov_mask (no sync).
Tensors that verl returns in the input dtype (log-probs, entropy, advantages, returns) keep it here
too; scalar losses and statistics are fp32 (rlkern accumulates in fp32 whatever the input dtype).
Masks must be bool or 0/1 (rlkern.ops rejects other values); verl's masked_mean would also take
fractional weights.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from rlkern import ops
from rlkern.ops.rollout_correction import parse_is_threshold, parse_rs

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "logprobs_from_logits",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "logprobs_from_logits_v2",
    "logprobs_from_logits_naive",
    "linear_cross_entropy",
    "kl_penalty",
    "agg_loss",
    "compute_gae_advantage_return",
    "compute_grpo_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_reinforce_plus_plus_outcome_advantage",
    "compute_grpo_vectorized_outcome_advantage",
    "compute_gdpo_outcome_advantage",
    "compute_grpo_passk_outcome_advantage",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_opo_outcome_advantage",
    "compute_remax_outcome_advantage",
    "compute_gpg_outcome_advantage",
    "compute_rloo_vectorized_outcome_advantage",
    "compute_optimal_token_baseline_advantage",
    "compute_multi_turn_optimal_token_baseline_advantage",
    "compute_policy_loss",
    "compute_policy_loss_vanilla",
    "compute_value_loss",
    "compute_rollout_correction_weights",
    "compute_rollout_rejection_mask",
    "compute_rollout_correction_and_rejection_mask",
    "compute_offpolicy_metrics",
    "compute_rollout_corr_metrics_from_logprobs",
]

_CORE = "verl.trainer.ppo.core_algos"
_F = "verl.utils.torch_functional"
_RC = "verl.trainer.ppo.rollout_corr_helper"

# (module, attribute, shim name) swapped in by rlkern.compat.patch("verl").
PATCH_TARGETS = (
    (_F, "masked_sum", "masked_sum"),
    (_F, "masked_mean", "masked_mean"),
    (_F, "masked_var", "masked_var"),
    (_F, "masked_whiten", "masked_whiten"),
    (_F, "logprobs_from_logits", "logprobs_from_logits"),
    (_F, "entropy_from_logits", "entropy_from_logits"),
    (_F, "entropy_from_logits_with_chunking", "entropy_from_logits_with_chunking"),
    (_F, "logprobs_from_logits_v2", "logprobs_from_logits_v2"),
    (_F, "logprobs_from_logits_naive", "logprobs_from_logits_naive"),
    ("verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy", "linear_cross_entropy"),
    (_CORE, "kl_penalty", "kl_penalty"),
    (_CORE, "agg_loss", "agg_loss"),
    (_CORE, "compute_gae_advantage_return", "compute_gae_advantage_return"),
    (_CORE, "compute_grpo_outcome_advantage", "compute_grpo_outcome_advantage"),
    (_CORE, "compute_rloo_outcome_advantage", "compute_rloo_outcome_advantage"),
    (_CORE, "compute_reinforce_plus_plus_outcome_advantage", "compute_reinforce_plus_plus_outcome_advantage"),
    (_CORE, "compute_grpo_vectorized_outcome_advantage", "compute_grpo_vectorized_outcome_advantage"),
    (_CORE, "compute_gdpo_outcome_advantage", "compute_gdpo_outcome_advantage"),
    (_CORE, "compute_grpo_passk_outcome_advantage", "compute_grpo_passk_outcome_advantage"),
    (_CORE, "compute_reinforce_plus_plus_baseline_outcome_advantage",
     "compute_reinforce_plus_plus_baseline_outcome_advantage"),
    (_CORE, "compute_opo_outcome_advantage", "compute_opo_outcome_advantage"),
    (_CORE, "compute_remax_outcome_advantage", "compute_remax_outcome_advantage"),
    (_CORE, "compute_gpg_outcome_advantage", "compute_gpg_outcome_advantage"),
    (_CORE, "compute_rloo_vectorized_outcome_advantage", "compute_rloo_vectorized_outcome_advantage"),
    (_CORE, "compute_optimal_token_baseline_advantage", "compute_optimal_token_baseline_advantage"),
    (_CORE, "compute_multi_turn_optimal_token_baseline_advantage",
     "compute_multi_turn_optimal_token_baseline_advantage"),
    (_CORE, "compute_policy_loss", "compute_policy_loss"),
    (_CORE, "compute_policy_loss_vanilla", "compute_policy_loss_vanilla"),
    (_CORE, "compute_value_loss", "compute_value_loss"),
    (_RC, "compute_rollout_correction_weights", "compute_rollout_correction_weights"),
    (_RC, "compute_rollout_rejection_mask", "compute_rollout_rejection_mask"),
    (_RC, "compute_rollout_correction_and_rejection_mask", "compute_rollout_correction_and_rejection_mask"),
    (_RC, "compute_offpolicy_metrics", "compute_offpolicy_metrics"),
    (_RC, "compute_rollout_corr_metrics_from_logprobs", "compute_rollout_corr_metrics_from_logprobs"),
)
# verl's trainers look estimators and policy losses up by name in these dicts.
PATCH_REGISTRIES = ((_CORE, "ADV_ESTIMATOR_REGISTRY"), (_CORE, "POLICY_LOSS_REGISTRY"))

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm")
_KL_BASE = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
KL_PENALTIES = _KL_BASE + tuple(name + "+" for name in _KL_BASE)

# verl's masked_mean epsilon (verl/utils/torch_functional.py::masked_mean) and whitening epsilon
# (::masked_whiten).
_MEAN_EPS = 1e-8
_WHITEN_EPS = 1e-8


def _same_dtype(result: Tensor, like: Tensor) -> Tensor:
    return result.to(like.dtype) if like.dtype.is_floating_point else result


def _count(mask: Tensor, axis=None) -> Tensor:
    return mask.sum(dim=axis).to(torch.float32) if axis is not None else mask.sum().to(torch.float32)


def masked_sum(values: Tensor, mask: Tensor, axis=None) -> Tensor:
    """Sum of ``values`` where ``mask`` is set (all elements, or along ``axis``); masked-out entries
    never enter, even when NaN (verl ``torch_functional.masked_sum``)."""
    return _same_dtype(ops.masked_sum(values, mask, dim=axis), values)


def masked_mean(values: Tensor, mask: Tensor, axis=None) -> Tensor:
    """``masked_sum / (mask.sum() + 1e-8)`` (verl ``torch_functional.masked_mean``).

    The ``+ 1e-8`` is verl's: it vanishes in fp32 whenever the mask holds at least one element and
    makes an empty mask (or an empty row along ``axis``) give 0 instead of NaN, so the division is done
    here on rlkern's masked sum rather than with rlkern's masked_mean, which refuses an empty mask.
    """
    total = ops.masked_sum(values, mask, dim=axis)
    return _same_dtype(total / (_count(mask, axis) + _MEAN_EPS), values)


def _check_var_count(mask: Tensor) -> None:
    # verl's masked_var checks and messages (verl/utils/torch_functional.py::masked_var).
    n = int(mask.sum().item())
    if n == 0:
        raise ValueError("At least one element in the mask has to be 1.")
    if n == 1:
        raise ValueError("The sum of the mask is one, which can cause a division by zero.")


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``values`` over the whole mask; Bessel-corrected when ``unbiased`` (verl
    ``torch_functional.masked_var``). Unbiased on fewer than two elements raises ValueError, as verl
    does; biased on an empty mask gives 0 (verl's ``+ 1e-8`` denominator)."""
    if unbiased:
        _check_var_count(mask)
    elif not bool(mask.any()):
        return values.new_zeros(())
    return _same_dtype(ops.masked_var(values, mask, unbiased=unbiased), values)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``(values - mean) * rsqrt(var + 1e-8)`` with the masked mean and unbiased masked variance,
    applied to every element (masked-out ones too); ``shift_mean=False`` adds the mean back
    (verl ``torch_functional.masked_whiten``)."""
    _check_var_count(mask)
    return _same_dtype(ops.masked_whiten(values, mask, shift_mean=shift_mean, eps=_WHITEN_EPS), values)


def logprobs_from_logits(logits: Tensor, labels: Tensor, inplace_backward: bool = True) -> Tensor:
    """Log-probability of ``labels`` under ``softmax(logits)``, in the logits' dtype (verl
    ``torch_functional.logprobs_from_logits``). ``inplace_backward=True`` writes d logits into the
    logits' storage during backward, as verl's flash-attn path does."""
    return ops.logprobs(logits, labels, inplace_backward=inplace_backward).to(logits.dtype)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` along the last dim, in the logits' dtype (verl
    ``torch_functional.entropy_from_logits``: ``logsumexp(z) - sum(softmax(z) * z)``)."""
    return ops.entropy(logits).to(logits.dtype)


def entropy_from_logits_with_chunking(logits: Tensor, chunk_size: int = 2048) -> Tensor:
    """verl ``torch_functional.entropy_from_logits_with_chunking``: the entropy of each row of
    ``logits [N, V]`` as float32 (verl upcasts each chunk); ``chunk_size`` only bounded verl's
    memory (rlkern never materialises the softmax) and must be positive."""
    if int(chunk_size) <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    return ops.entropy(logits)


def logprobs_from_logits_v2(logits: Tensor, labels: Tensor) -> Tensor:
    """verl ``torch_functional.logprobs_from_logits_v2`` (its row-by-row fallback), in the logits'
    dtype; for bf16 verl takes a bf16 log_softmax, rlkern computes in fp32 and rounds once."""
    return ops.logprobs(logits, labels).to(logits.dtype)


def logprobs_from_logits_naive(logits: Tensor, labels: Tensor) -> Tensor:
    """verl ``torch_functional.logprobs_from_logits_naive`` (``log_softmax`` then gather), in the
    logits' dtype."""
    return ops.logprobs(logits, labels).to(logits.dtype)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0,
                         reduction: str = "none", dist_process_group=None) -> tuple[Tensor, Tensor]:
    """verl ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (its fused Triton head,
    used with ``use_fused_kernels``): ``(hidden [..., H], weight [V, H], labels [...])`` to
    ``(logprobs, entropy [N])`` float32, flattened as verl returns them, from
    ``rlkern.ops.linear_logprobs``. The log-probs are ``z_y / T - logsumexp(z / T)`` per token for
    ``reduction="none"``, their sum or mean (a 0-d tensor) for ``"sum"`` / ``"mean"``; the entropy is
    always per token (verl/utils/kernel/kernels.py, ``efficient_entropy_forward``). verl's labels are
    all in range (no ignore index). ``dist_process_group`` (a vocabulary-parallel head) is passed on
    as rlkern's ``process_group``: both split the vocabulary into equal contiguous shards by rank."""
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"Invalid reduction: {reduction}")  # verl's get_entropy_reduction_enum_number
    logp, ent = ops.linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                    temperature=float(temperature), return_entropy=True,
                                    process_group=dist_process_group)
    if reduction == "sum":
        logp = logp.sum()
    elif reduction == "mean":
        logp = logp.mean()
    return logp, ent


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kl_penalty: str) -> Tensor:
    """verl ``core_algos.kl_penalty``: ``kl``/``k1`` = logp - ref; ``abs``; ``mse``/``k2`` = ½ (logp -
    ref)²; ``low_var_kl``/``k3`` = exp(ref - logp) - (ref - logp) - 1 with the log-ratio clamped to
    [-20, 20] and the result to [-10, 10]; a ``+`` suffix (``low_var_kl+``) gives that estimator's
    value with the k2 gradient (straight-through, verl's ``kl_penalty`` for names ending in ``+``).
    ``full`` needs the whole distribution and is not implemented, as in verl. rlkern.ops.kl knows
    verl's names and its k3 clamps (``clamp=True``), so this is a direct call."""
    if kl_penalty == "full":
        raise NotImplementedError("kl_penalty='full' needs the logits of every token; "
                                  "verl does not implement it")
    if kl_penalty not in KL_PENALTIES:
        raise ValueError(f"kl_penalty must be one of {KL_PENALTIES} (or 'full', not implemented), "
                         f"got {kl_penalty!r}")
    k3 = kl_penalty.rstrip("+") in ("low_var_kl", "k3")
    return ops.kl(logprob, ref_logprob, kl_penalty, clamp=True if k3 else None)


def _check_global(loss_agg_mode: str, dp_size, batch_num_tokens, global_batch_size) -> None:
    # verl 0.9.1 core_algos.agg_loss: with dp_size > 1 the local counts are not the global ones.
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode!r}; valid modes are {AGG_MODES}")
    if dp_size > 1 and loss_agg_mode == "token-mean" and batch_num_tokens is None:
        raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
    if dp_size > 1 and loss_agg_mode.startswith("seq-mean") and global_batch_size is None:
        raise ValueError("global_batch_size is required when dp_size > 1")


def agg_loss(loss_mat: Tensor, loss_mask: Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None) -> Tensor:
    """Reduce a ``[B, T]`` loss to a scalar (verl 0.9.1 ``core_algos.agg_loss``), normalised over the
    global batch so that data-parallel ranks average to the global value:
    ``token-mean`` masked sum / ``batch_num_tokens`` (default: this batch's valid tokens) * dp_size;
    ``token-sum`` masked sum * dp_size;
    ``seq-mean-token-sum`` per-row masked sums summed over the rows with a valid token,
    / ``global_batch_size`` (default: the number of such rows) * dp_size;
    ``seq-mean-token-mean`` the same over per-row ``sum / (count + 1e-8)``;
    ``seq-mean-token-sum-norm`` ``seq-mean-token-sum`` / ``loss_scale_factor`` (default T, Dr. GRPO).
    As in verl, an empty mask gives 0/0 = NaN in the mean modes (only releases before 0.9 added
    1e-8 to the token count). Unlike verl's ``torch.sum(loss_mat * loss_mask)`` in the seq modes, a NaN
    at a masked-out position does not leak into the result."""
    _check_global(loss_agg_mode, dp_size, batch_num_tokens, global_batch_size)
    seq = ops.masked_sum(loss_mat, loss_mask, dim=-1)
    count = _count(loss_mask, -1)
    if loss_agg_mode == "token-mean":
        loss = seq.sum() / (count.sum() if batch_num_tokens is None else batch_num_tokens) * dp_size
    elif loss_agg_mode == "token-sum":
        loss = seq.sum() * dp_size
    else:
        if loss_agg_mode == "seq-mean-token-mean":
            seq = seq / (count + _MEAN_EPS)
        live = count > 0
        rows = live.sum().to(torch.float32) if global_batch_size is None else global_batch_size
        loss = ops.masked_sum(seq, live) / rows * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return _same_dtype(loss, loss_mat)


def _ops_agg(loss_agg_mode: str) -> str:
    """The rlkern.ops aggregation from which :func:`_global_scale` rebuilds verl's: rlkern's
    ``seq-mean-token-sum-norm`` is the plain masked sum / T, and its ``seq-mean-token-mean`` the sum of
    the per-row means over the rows with a valid token."""
    return "seq-mean-token-mean" if loss_agg_mode == "seq-mean-token-mean" else "seq-mean-token-sum-norm"


def _global_scale(loss: Tensor, mask: Tensor, loss_agg_mode: str, dp_size: int = 1, batch_num_tokens=None,
                  global_batch_size=None, loss_scale_factor=None) -> Tensor:
    """verl 0.9.1 ``agg_loss`` (see :func:`agg_loss`) from a loss that rlkern.ops aggregated with
    ``_ops_agg(loss_agg_mode)``: every mode is that value times a constant, so gradients scale alike."""
    _check_global(loss_agg_mode, dp_size, batch_num_tokens, global_batch_size)
    count = _count(mask, -1)
    live = (count > 0).sum().to(torch.float32)
    if loss_agg_mode == "seq-mean-token-mean":
        if global_batch_size is None:  # no live row: verl's 0 / 0 = NaN (live / live is exactly 1 otherwise)
            return loss * dp_size / (live / live)
        return loss * live / global_batch_size * dp_size
    total = loss * max(mask.shape[-1], 1)  # undo rlkern's / T: the masked sum
    if loss_agg_mode == "token-mean":
        return total / (count.sum() if batch_num_tokens is None else batch_num_tokens) * dp_size
    if loss_agg_mode == "token-sum":
        return total * dp_size
    total = total / (live if global_batch_size is None else global_batch_size) * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        total = total / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return total


def compute_gae_advantage_return(token_level_rewards: Tensor, values: Tensor, response_mask: Tensor,
                                 gamma, lam) -> tuple[Tensor, Tensor]:
    """verl ``core_algos.compute_gae_advantage_return``: one reverse GAE scan in which masked
    positions (observation tokens, padding) carry the next value and the running advantage through;
    ``returns = advantages + values``; the advantages are then whitened over the mask. No gradient."""
    dtype = torch.promote_types(token_level_rewards.dtype, values.dtype)
    with torch.no_grad():
        advantages, returns = ops.gae(token_level_rewards, values, response_mask, gamma=float(gamma),
                                      lam=float(lam))
        # Whitened from rlkern's fp32 advantages, then both returned in verl's dtype (its loop runs
        # in the dtype of rewards and values).
        advantages = masked_whiten(advantages, response_mask).to(dtype)
    return advantages, returns.to(dtype)


def _host_group_ids(index, n: int) -> np.ndarray:
    """verl passes the prompt uid of every response; rlkern wants dense int64 group ids.

    verl groups with a dict keyed by ``index[i]`` (core_algos.py, ``id2score = defaultdict(list)``),
    so any hashable uid works there, including a numpy object array mixing ints and strings, which
    cannot be sorted. Object arrays are therefore grouped the same way (ids in order of first
    appearance, one dict lookup per response); numeric and string arrays, which sort, go through
    np.unique without a Python loop. Either way equal uids get equal ids and nothing else matters.
    The uids live on the host (a numpy array), so this reads nothing back from the device."""
    if isinstance(index, Tensor):
        index = index.detach().cpu()  # a uid tensor (rare; verl passes numpy): one copy to the host
    arr = np.asarray(index)
    if arr.shape != (n,):
        raise ValueError(f"index must hold one group id per response, shape ({n},), got {arr.shape}")
    if arr.dtype == object:
        first_seen: dict = {}
        try:
            ids = [first_seen.setdefault(uid, len(first_seen)) for uid in arr.tolist()]
        except TypeError as err:
            raise TypeError(f"index must hold hashable uids (verl groups them in a dict): {err}") from err
        return np.asarray(ids, dtype=np.int64).reshape(n)
    return np.unique(arr, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _group_ids(index, n: int, device) -> Tensor:
    return torch.as_tensor(_host_group_ids(index, n), dtype=torch.int64, device=device)


def _groups(index, n: int, device) -> tuple[Tensor, int, np.ndarray]:
    """(dense ids on ``device``, number of groups, host group sizes) for verl's dict grouping."""
    host = _host_group_ids(index, n)
    counts = np.bincount(host) if n else np.zeros(0, dtype=np.int64)
    return torch.as_tensor(host, dtype=torch.int64, device=device), len(counts), counts


def _as_torch_index_ids(index, n: int) -> np.ndarray:
    """Dense ids with ``verl.utils.groupwise.as_torch_index``'s grouping (grpo_vectorized), which differs
    from the dict's: integer labels as they are; floats within 1e-6 of integers rounded; anything else
    that numpy can cast to int64 is cast (numeric strings, and floats, truncated); the rest is
    factorised by value, or by ``str`` when the values do not sort. Equal ids, equal groups."""
    if isinstance(index, Tensor):
        t = index.detach().reshape(-1).cpu()
        if t.dtype.is_floating_point:
            t64 = t.double()
            labels = (t64.round().long().numpy() if torch.allclose(t64, t64.round(), rtol=0.0, atol=1e-6)
                      else np.array([str(x.item()) for x in t], dtype=object))
        else:
            labels = t.long().numpy()
    else:
        labels = np.asarray(index).reshape(-1)
        if labels.dtype != object and np.issubdtype(labels.dtype, np.floating):
            rounded = np.rint(labels.astype(np.float64))
            if np.allclose(labels.astype(np.float64), rounded, rtol=0.0, atol=1e-6):
                labels = rounded.astype(np.int64)
        if labels.dtype == object or not np.issubdtype(labels.dtype, np.integer):
            try:
                labels = labels.astype(np.int64)
            except (TypeError, ValueError, OverflowError):
                labels = labels.astype(object)
    if labels.shape != (n,):
        raise ValueError(f"index must hold one group id per response, shape ({n},), got {labels.shape}")
    try:
        return np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int64)
    except TypeError:  # mixed types: verl factorises their str()
        return np.unique(np.array([str(x) for x in labels], dtype=object),
                         return_inverse=True)[1].reshape(-1).astype(np.int64)


def _outcome(token_level_rewards: Tensor, index, method: str, *, ids=None, **kwargs) -> Tensor:
    """``rlkern.ops.outcome_advantages`` of the row sums of the token rewards, in their dtype;
    ``ids`` = (dense ids, number of groups) when the caller grouped already."""
    scores = token_level_rewards.sum(dim=-1)
    if ids is None:
        ids, groups, _ = _groups(index, scores.shape[0], scores.device)
    else:
        ids, groups = ids
    return ops.outcome_advantages(scores, ids, groups, method=method, **kwargs).to(scores.dtype)


def compute_grpo_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index,
                                   epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
                                   config=None) -> tuple[Tensor, Tensor]:
    """verl ``core_algos.compute_grpo_outcome_advantage``: score = row sum of the token rewards;
    ``(score - mean_g) / (std_g + epsilon)`` with the unbiased group std (or ``score - mean_g`` when
    ``norm_adv_by_std_in_grpo=False``, Dr. GRPO); broadcast over the response mask. Returns
    ``(advantages, advantages)``.

    As in verl, a group of one has mean 0 and std 1, so its advantage is ``score / (1 + epsilon)``
    (or the score). A group whose scores are all equal gets exactly 0 (verl: the rounding error of
    its mean / epsilon, which is also exactly 0 for 0/1 rewards). rlkern.ops.outcome_advantages
    computes the group statistics in float64 without a Python loop or a host sync.
    """
    with torch.no_grad():
        adv = _outcome(token_level_rewards, index, "grpo", eps=epsilon, scale_by_std=norm_adv_by_std_in_grpo)
        adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


def compute_grpo_vectorized_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index,
                                              epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
                                              config=None) -> tuple[Tensor, Tensor]:
    """verl ``core_algos.compute_grpo_vectorized_outcome_advantage``: GRPO's numbers with the groups of
    ``verl.utils.as_torch_index`` (see :func:`_as_torch_index_ids`); verl's group statistics are
    float32 (``group_mean_std``), so the result is float32 for bf16/fp16/fp32 rewards."""
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        host = _as_torch_index_ids(index, scores.shape[0])
        ids = (torch.as_tensor(host, device=scores.device), int(host.max()) + 1 if host.size else 0)
        adv = ops.outcome_advantages(scores, *ids, method="grpo", eps=epsilon,
                                     scale_by_std=norm_adv_by_std_in_grpo)
        adv = adv.to(torch.promote_types(scores.dtype, torch.float32)).unsqueeze(-1) * response_mask
    return adv, adv


def compute_gdpo_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index,
                                   epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True, config=None,
                                   non_tensor_batch=None, batch=None, **kwargs) -> tuple[Tensor, Tensor]:
    """verl ``core_algos.compute_gdpo_outcome_advantage`` (GDPO): GRPO advantages of each reward
    component separately, summed with ``config.gdpo_reward_weights`` (default 1 each), broadcast over
    the mask, whitened over the mask (:func:`masked_whiten`) and zeroed outside it.

    With ``config``, ``non_tensor_batch`` and ``batch`` all given, the components are the float32
    arrays ``non_tensor_batch[k]`` for ``k`` in ``config.gdpo_reward_keys`` (verl writes each at the
    row's last response token and sums the row, which gives the same score); otherwise the single
    component is the row sum of ``token_level_rewards``. All components share one call of
    rlkern.ops.outcome_advantages ([K, B] scores)."""
    with torch.no_grad():
        device = token_level_rewards.device
        weights = None
        if config is not None and non_tensor_batch is not None and batch is not None:
            keys = _config_value(config, "gdpo_reward_keys")
            if not keys:
                raise AssertionError("GDPO requires 'algorithm.gdpo_reward_keys' listing the individual "
                                     "reward component keys returned by compute_score (e.g. "
                                     "['format_reward', 'accuracy_reward']).")
            for key in keys:
                if key not in non_tensor_batch:
                    raise AssertionError(f"GDPO reward key '{key}' not found in non_tensor_batch. Available "
                                         f"keys: {list(non_tensor_batch.keys())}.")
            parts = [np.asarray(non_tensor_batch[k], dtype=np.float32) for k in keys]
            scores = torch.as_tensor(np.stack(parts), device=device)
            reward_weights = _config_value(config, "gdpo_reward_weights")
            if reward_weights is not None:
                weights = torch.tensor(list(reward_weights), dtype=torch.float32, device=device)
        else:
            scores = token_level_rewards.sum(dim=-1)[None]
        ids, groups, _ = _groups(index, scores.shape[-1], device)
        adv = ops.outcome_advantages(scores, ids, groups, method="grpo", eps=epsilon,
                                     scale_by_std=norm_adv_by_std_in_grpo).to(scores.dtype)
        if weights is not None:
            adv = weights[:, None] * adv
        adv = adv.sum(0).unsqueeze(-1) * response_mask
        adv = masked_whiten(adv, response_mask) * response_mask
    return adv, adv


def compute_grpo_passk_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index,
                                         epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
                                         config=None, **kwargs) -> tuple[Tensor, Tensor]:
    """verl ``core_algos.compute_grpo_passk_outcome_advantage`` (Pass@k): the unique best response
    of a group gets ``best - second best`` (divided by ``std + epsilon`` when
    ``config.norm_adv_by_std_in_grpo``, default True: verl reads the config, not the argument), all
    others 0. Groups of one raise ValueError as in verl (checked on the host uids, no device sync)."""
    if config is None:
        raise AssertionError("config is required (verl asserts it)")
    norm = _config_value(config, "norm_adv_by_std_in_grpo", True)
    with torch.no_grad():
        rows = token_level_rewards.shape[0]
        host = _host_group_ids(index, rows)
        counts = np.bincount(host) if rows else np.zeros(0, dtype=np.int64)
        if (counts < 2).any():
            g = int(np.argmax(counts < 2))
            uid = np.asarray(index, dtype=object)[int(np.argmax(host == g))]
            raise ValueError(f"Pass@k requires at least 2 samples per group. Got {counts[g]} for group "
                             f"{uid}.")
        ids = (torch.as_tensor(host, device=token_level_rewards.device), len(counts))
        adv = _outcome(token_level_rewards, None, "passk", ids=ids, eps=epsilon, scale_by_std=norm)
        adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


def compute_reinforce_plus_plus_baseline_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor,
                                                           index, epsilon: float = 1e-6, config=None,
                                                           **kwargs) -> tuple[Tensor, Tensor]:
    """verl ``core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage``: score minus its
    group's mean (0 for a group of one), broadcast over the mask, whitened over the mask and zeroed
    outside it."""
    with torch.no_grad():
        adv = _outcome(token_level_rewards, index, "mean").unsqueeze(-1) * response_mask
        adv = masked_whiten(adv, response_mask) * response_mask
    return adv, adv


def compute_rloo_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index,
                                   epsilon: float = 1e-6, config=None, **kwargs) -> tuple[Tensor, Tensor]:
    """verl ``core_algos.compute_rloo_outcome_advantage``: score minus the mean of the other
    responses of its group (``n/(n-1) * (score - mean_g)``); a group of one keeps its raw score, as in
    verl. Returns ``(adv, adv)``."""
    with torch.no_grad():
        adv = _outcome(token_level_rewards, index, "rloo").unsqueeze(-1) * response_mask
    return adv, adv


def compute_rloo_vectorized_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index,
                                              epsilon: float = 1e-6, config=None,
                                              **kwargs) -> tuple[Tensor, Tensor]:
    """verl ``core_algos.compute_rloo_vectorized_outcome_advantage``: RLOO, except that a group of
    one gets 0 (verl's ``rloo`` keeps its score)."""
    with torch.no_grad():
        adv = _outcome(token_level_rewards, index, "rloo_vectorized").unsqueeze(-1) * response_mask
    return adv, adv


def compute_opo_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index,
                                  epsilon: float = 1e-6, config=None, **kwargs) -> tuple[Tensor, Tensor]:
    """verl ``core_algos.compute_opo_outcome_advantage`` (OPO): score minus the length-weighted mean
    score of its group (lengths = valid tokens; baseline 0 for a group of one, NaN for a group whose
    responses are all empty, as in verl)."""
    with torch.no_grad():
        adv = _outcome(token_level_rewards, index, "opo", weights=response_mask.sum(dim=-1))
        adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


def compute_gpg_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index,
                                  epsilon: float = 1e-6, f_norm: float = 1.0, alpha: float = 1.0, config=None,
                                  **kwargs):
    """verl ``core_algos.compute_gpg_outcome_advantage`` (GPG): ``alpha (score - mean_g) / f_norm``
    with ``alpha = B / max(#nonzero scores, 1)`` (the argument ``alpha`` is ignored, as in verl) and
    mean 0 for a group of one."""
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        alpha = scores.shape[0] / torch.count_nonzero(scores).clamp(min=1)
        adv = (alpha * _outcome(token_level_rewards, index, "mean") / f_norm).to(scores.dtype)
        adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


def _reward_to_go(token_level_rewards: Tensor, response_mask: Tensor) -> Tensor:
    """verl's ``(rewards * mask).flip(-1).cumsum(-1).flip(-1)``: at every position the sum of the
    valid rewards from there on, masked positions included (they carry the sum through). That is
    rlkern's GAE scan with values 0 and gamma = lam = 1 (rlkern.ops.discounted_returns would instead
    restart the sum at each masked position)."""
    rewards = token_level_rewards.detach()
    returns, _ = ops.gae(rewards, torch.zeros_like(rewards), response_mask, gamma=1.0, lam=1.0)
    return returns.to(torch.promote_types(rewards.dtype, response_mask.dtype))


def compute_remax_outcome_advantage(token_level_rewards: Tensor, reward_baselines: Tensor,
                                    response_mask: Tensor, config=None, **kwargs) -> tuple[Tensor, Tensor]:
    """verl ``core_algos.compute_remax_outcome_advantage`` (ReMax): returns = reward-to-go of the
    masked rewards; advantages = returns - the greedy response's reward (``reward_baselines [B]``) at
    valid tokens."""
    with torch.no_grad():
        returns = _reward_to_go(token_level_rewards, response_mask)
        advantages = returns - reward_baselines.unsqueeze(-1) * response_mask
    return advantages, returns


def _otb(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared, rollout_is_weights,
         handle_zero_tail, epsilon, multi_turn):
    ids, groups, _ = _groups(index, token_level_rewards.shape[0], token_level_rewards.device)
    adv, returns = ops.optimal_token_baseline(token_level_rewards, response_mask, ids, groups, old_log_probs,
                                              sum_pi_squared, rollout_is_weights=rollout_is_weights,
                                              handle_zero_tail=handle_zero_tail, eps=epsilon,
                                              multi_turn=multi_turn)
    dtype = torch.promote_types(token_level_rewards.dtype, response_mask.dtype)
    return adv.to(dtype), returns.to(dtype)


def compute_optimal_token_baseline_advantage(token_level_rewards: Tensor, response_mask: Tensor, index,
                                             old_log_probs: Tensor, sum_pi_squared: Tensor,
                                             rollout_is_weights: Tensor | None = None,
                                             handle_zero_tail: bool = True, epsilon: float = 1e-8,
                                             **kwargs) -> tuple[Tensor, Tensor]:
    """verl ``core_algos.compute_optimal_token_baseline_advantage`` (``optimal_token_baseline``): a
    baseline per group and token column, ``sum G_t W_t / (sum W_t + epsilon)`` with the path-variance
    weights ``W_t`` from ``old_log_probs``, ``sum_pi_squared`` (Σπ² per token) and, when given, the
    rollout IS weights squared; see rlkern.ops.optimal_token_baseline. Returns ``(advantages,
    reward-to-go)``."""
    return _otb(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared, rollout_is_weights,
                handle_zero_tail, epsilon, multi_turn=False)


def compute_multi_turn_optimal_token_baseline_advantage(token_level_rewards: Tensor, response_mask: Tensor,
                                                        index, old_log_probs: Tensor, sum_pi_squared: Tensor,
                                                        rollout_is_weights: Tensor | None = None,
                                                        handle_zero_tail: bool = True, epsilon: float = 1e-8,
                                                        **kwargs) -> tuple[Tensor, Tensor]:
    """verl ``core_algos.compute_multi_turn_optimal_token_baseline_advantage``
    (``tir_optimal_token_baseline``): the optimal token baseline over each response's valid tokens
    taken in order (tool/observation tokens skipped), responses without a valid token left out of
    their group; see rlkern.ops.optimal_token_baseline with ``multi_turn=True``."""
    return _otb(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared, rollout_is_weights,
                handle_zero_tail, epsilon, multi_turn=True)


def _config_value(config, key: str, default=None):
    if config is None:
        return default
    if isinstance(config, dict) or hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)


def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor,
                                                  config=None,
                                                  **kwargs) -> tuple[Tensor, Tensor]:
    """verl 0.9.1 ``core_algos.compute_reinforce_plus_plus_outcome_advantage``: discounted returns with
    ``config.gamma``; masked positions (observation tokens of a multi-turn response, padding) get
    return 0 and pass the running return through unchanged; the returns are whitened over the mask
    and zeroed outside it. Returns ``(advantages, returns)``."""
    if config is None:
        raise ValueError("config is required: REINFORCE++ reads the discount factor from config.gamma")
    gamma = _config_value(config, "gamma")
    if gamma is None:
        raise ValueError("config must define gamma, the discount factor")
    with torch.no_grad():
        # verl's loop: running' = r_t + gamma * running; return_t = running' * m_t;
        # running = m_t ? running' : running. That is verl's GAE recursion with values = 0 and lam = 1
        # (masked steps carry the running advantage through), so rlkern's GAE scan computes it; its
        # advantages then equal the running return at every valid token. (rlkern.ops.discounted_returns
        # resets the return at masked positions instead, as verl did before the multi-turn change.)
        running, _ = ops.gae(token_level_rewards, torch.zeros_like(token_level_rewards), response_mask,
                             gamma=float(gamma), lam=1.0)
        returns = (running * response_mask).to(token_level_rewards.dtype)
        advantages = masked_whiten(returns, response_mask) * response_mask
    return advantages, returns


def _policy_loss(old_log_prob, log_prob, advantages, response_mask, low, high, clip_ratio_c, loss_agg_mode,
                 rollout_is_weights, global_batch_info):
    if low is None or high is None:
        raise ValueError("cliprange (or both cliprange_low and cliprange_high) must be given")
    info = global_batch_info
    _check_global(loss_agg_mode, info.get("dp_size", 1), info.get("batch_num_tokens"),
                  info.get("global_batch_size"))
    loss, stats = ops.policy_loss(log_prob, old_log_prob, advantages, response_mask, clip_low=float(low),
                                  clip_high=float(high), dual_clip=float(clip_ratio_c),
                                  agg=_ops_agg(loss_agg_mode), weights=rollout_is_weights)
    return _global_scale(loss, response_mask, loss_agg_mode, **global_batch_info), stats


def compute_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                        cliprange=None, cliprange_low=None, cliprange_high=None, clip_ratio_c: float = 3.0,
                        loss_agg_mode: str = "token-mean", rollout_is_weights: Tensor | None = None):
    """verl ``core_algos.compute_policy_loss`` (PPO-clip with dual-clip; deprecated in verl 0.9 for
    ``compute_policy_loss_vanilla``): log-ratio clamped to [-20, 20];
    ``max(-A r, -A clip(r, 1 - low, 1 + high))``, and for A < 0 additionally at most
    ``-A * clip_ratio_c``; aggregated by ``loss_agg_mode`` over this batch. ``cliprange_low``/``high``
    default to ``cliprange``. Returns ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``: the fraction
    of valid tokens where the clipped term is larger, the masked mean of ``old - new`` log-prob, and the
    fraction where the dual clip bound is active."""
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    loss, stats = _policy_loss(old_log_prob, log_prob, advantages, response_mask, low, high, clip_ratio_c,
                               loss_agg_mode, rollout_is_weights, {})
    return loss, stats["clip_frac"], stats["approx_kl"], stats["clip_frac_lower"]


def compute_policy_loss_vanilla(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                                response_mask: Tensor,
                                loss_agg_mode: str = "token-mean", config=None,
                                rollout_is_weights: Tensor | None = None):
    """verl 0.9.1 ``core_algos.compute_policy_loss_vanilla`` (registered as ``"vanilla"``; what the
    actor's ``ppo_loss`` calls, verl/workers/utils/losses.py): the clip ranges come from
    ``config.clip_ratio`` / ``clip_ratio_low`` / ``clip_ratio_high`` and ``config.clip_ratio_c`` (default
    3.0), the global-batch normalisation from ``config.global_batch_info`` (``dp_size``,
    ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``; see :func:`agg_loss`); the maths
    is :func:`compute_policy_loss`'s. Returns ``(pg_loss, pg_metrics)`` with verl's metric names and
    Python floats."""
    if config is None:
        raise ValueError("config is required: the clip ranges are read from config.clip_ratio*")
    clip_ratio = _config_value(config, "clip_ratio")
    low = _config_value(config, "clip_ratio_low")
    high = _config_value(config, "clip_ratio_high")
    info = dict(_config_value(config, "global_batch_info", None) or {})
    loss, stats = _policy_loss(old_log_prob, log_prob, advantages, response_mask,
                               clip_ratio if low is None else low, clip_ratio if high is None else high,
                               _config_value(config, "clip_ratio_c", 3.0), loss_agg_mode, rollout_is_weights,
                               info)
    metrics = {"actor/pg_clipfrac": stats["clip_frac"], "actor/ppo_kl": stats["approx_kl"],
               "actor/pg_clipfrac_lower": stats["clip_frac_lower"]}
    return loss, {name: float(value.detach().item()) for name, value in metrics.items()}


def compute_value_loss(vpreds: Tensor, returns: Tensor, values: Tensor, response_mask: Tensor,
                       cliprange_value: float, loss_agg_mode: str = "token-mean", dp_size: int = 1,
                       batch_num_tokens=None, global_batch_size=None,
                       loss_scale_factor=None) -> tuple[Tensor, Tensor]:
    """verl 0.9.1 ``core_algos.compute_value_loss``: ``0.5 * agg(max((v - R)², (clip(v, old ± c) -
    R)²))`` with :func:`agg_loss`'s global-batch arguments, and the fraction of valid tokens where the
    clipped term is larger. Note verl's argument order: predictions, returns, then the old values."""
    _check_global(loss_agg_mode, dp_size, batch_num_tokens, global_batch_size)
    loss, stats = ops.value_loss(vpreds, values, returns, response_mask, clip=float(cliprange_value),
                                 agg=_ops_agg(loss_agg_mode))
    loss = _global_scale(loss, response_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size,
                         loss_scale_factor)
    return loss, stats["clip_frac"]


# ------------------------------------------------------------------------------------------------
# rollout correction (verl/trainer/ppo/rollout_corr_helper.py): TIS / IcePop weights, rejection masks
# and the off-policy diagnostics, all from one rlkern.ops.rollout_correction call
# ------------------------------------------------------------------------------------------------

_IS_LEVELS = ("token", "sequence")


def _floats(metrics: dict[str, Tensor], prefix: str = "") -> dict[str, float]:
    """The 0-d metric tensors as Python floats, read back in one transfer (verl calls ``.item()`` on
    each)."""
    if not metrics:
        return {}
    values = torch.stack([v.detach().double().reshape(()) for v in metrics.values()]).tolist()
    return {prefix + name: value for name, value in zip(metrics, values, strict=True)}


def _need_valid(response_mask: Tensor) -> None:
    if not bool(response_mask.any()):
        raise ValueError("response_mask must contain at least one valid token (1).")


def _is_options(rollout_is: str, rollout_is_threshold) -> dict:
    if rollout_is not in _IS_LEVELS:
        raise ValueError(f"Invalid rollout_is: {rollout_is}. Must be one of {set(_IS_LEVELS)}.")
    upper, lower = parse_is_threshold(rollout_is_threshold)
    return {"level": rollout_is, "upper": upper, "lower": lower,
            "mode": "truncate" if lower is None else "mask"}


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _distributed_batch_normalize(weights: Tensor, response_mask: Tensor, level: str, metrics: dict) -> Tensor:
    # verl normalises over every rank with verl_F.distributed_masked_mean when torch.distributed runs.
    from verl.utils.torch_functional import distributed_masked_mean

    mask_float = response_mask.to(weights.dtype)
    if level == "token":
        mean = distributed_masked_mean(weights, mask_float)
    else:
        seq_weights = (torch.where(mask_float.bool(), weights, 0.0) * mask_float).sum(-1) / (
            mask_float.sum(-1) + _MEAN_EPS)
        mean = distributed_masked_mean(seq_weights, (response_mask.sum(dim=-1) > 0).to(weights.dtype))
    big = mean > 1e-8
    metrics["rollout_is_batch_norm_factor"] = torch.where(big, mean, torch.ones_like(mean))
    return torch.where(big, weights / mean, weights)


def compute_rollout_correction_weights(log_ratio: Tensor, response_mask: Tensor, rollout_is: str = "token",
                                       rollout_is_threshold=2.0, rollout_is_batch_normalize: bool = False):
    """verl 0.9.1 ``rollout_corr_helper.compute_rollout_correction_weights``: truncated IS weights
    (``min(exp(clamp(d, ±20)), U)``, per token or per sequence of ``Σd``; ``"L_U"`` thresholds zero
    the weights outside ``[L, U]`` instead: IcePop) with verl's ``rollout_is_*`` metrics, optionally
    normalised to mean 1. Weights come back in ``result_type(log_ratio, response_mask)`` as verl's do."""
    opts = _is_options(rollout_is, rollout_is_threshold)
    _need_valid(response_mask)
    dist = rollout_is_batch_normalize and _distributed()
    res = ops.rollout_correction(log_ratio, None, response_mask, **opts,
                                 batch_normalize=rollout_is_batch_normalize and not dist)
    metrics = dict(res.metrics)
    weights = res.weights
    if dist:
        weights = _distributed_batch_normalize(weights, response_mask, rollout_is, metrics)
    return weights.to(torch.result_type(log_ratio, response_mask)), _floats(metrics)


def compute_rollout_rejection_mask(log_ratio: Tensor, response_mask: Tensor, rollout_rs: str = "token_k1",
                                   rollout_rs_threshold=None):
    """verl 0.9.1 ``rollout_corr_helper.compute_rollout_rejection_mask``: the response mask with the
    tokens / sequences whose divergence statistic fails any comma-separated option zeroed (token_k*,
    seq_sum_k*, seq_mean_k* (Geo-RS for k1), seq_max_k{2,3}), and verl's ``rollout_rs_*`` metrics."""
    if rollout_rs is None or not isinstance(rollout_rs, str):
        raise ValueError("rollout_rs must be a non-empty string (comma separated for multiple options).")
    if rollout_rs_threshold is None:
        raise ValueError("rollout_rs_threshold must be provided for rejection sampling.")
    if log_ratio.shape[0] == 0:
        return response_mask, {}
    options = parse_rs(rollout_rs, rollout_rs_threshold)
    _need_valid(response_mask)
    res = ops.rollout_correction(log_ratio, None, response_mask, level=None, rs=options)
    return res.mask, _floats(res.metrics)


def compute_rollout_correction_and_rejection_mask(old_log_prob: Tensor, rollout_log_prob: Tensor,
                                                  response_mask: Tensor, rollout_is: str | None = None,
                                                  rollout_is_threshold=2.0,
                                                  rollout_is_batch_normalize: bool = False,
                                                  rollout_rs: str | None = None, rollout_rs_threshold=None):
    """verl 0.9.1 ``rollout_corr_helper.compute_rollout_correction_and_rejection_mask``: IS weights
    (when ``rollout_is`` and its threshold are set), the rejection mask (when ``rollout_rs`` is set) and
    the off-policy diagnostics, from one rlkern.ops.rollout_correction call; returns ``(DataProto with
    "rollout_is_weights" or None, modified response_mask, metrics prefixed "rollout_corr/")``."""
    _need_valid(response_mask)
    if old_log_prob.shape != rollout_log_prob.shape:
        raise ValueError(f"old_log_prob shape {old_log_prob.shape} does not match rollout_log_prob shape "
                         f"{rollout_log_prob.shape}.")
    if old_log_prob.shape != response_mask.shape:
        raise ValueError(f"log_prob shape {old_log_prob.shape} does not match response_mask shape "
                         f"{response_mask.shape}.")
    kwargs: dict = {"level": None}
    use_is = rollout_is is not None and rollout_is_threshold is not None
    if use_is:
        kwargs.update(_is_options(rollout_is, rollout_is_threshold))
    if rollout_rs is not None:
        if rollout_rs_threshold is None:
            raise ValueError("rollout_rs_threshold must be explicitly provided when rollout_rs is enabled. "
                             "Set rollout_rs_threshold to the desired threshold value.")
        if not isinstance(rollout_rs, str):
            raise ValueError("rollout_rs must be a non-empty string (comma separated for multiple options).")
        kwargs["rs"] = parse_rs(rollout_rs, rollout_rs_threshold)
    dist = use_is and rollout_is_batch_normalize and _distributed()
    res = ops.rollout_correction(old_log_prob, rollout_log_prob, response_mask,
                                 batch_normalize=use_is and rollout_is_batch_normalize and not dist, **kwargs)
    metrics = dict(res.metrics)
    proto = None
    if use_is:
        weights = res.weights
        if dist:
            weights = _distributed_batch_normalize(weights, response_mask, rollout_is, metrics)
        from verl.protocol import DataProto

        weights = weights.to(torch.result_type(old_log_prob - rollout_log_prob, response_mask))
        proto = DataProto.from_dict(tensors={"rollout_is_weights": weights})
    new_mask = res.mask if rollout_rs is not None else response_mask.clone()
    return proto, new_mask, _floats(metrics, "rollout_corr/")


def compute_offpolicy_metrics(old_log_prob: Tensor, rollout_log_prob: Tensor | None,
                              response_mask: Tensor) -> dict[str, float]:
    """verl 0.9.1 ``rollout_corr_helper.compute_offpolicy_metrics``: training/rollout perplexities,
    ``kl``, ``k3_kl``, the log-PPL differences, ``ppl_ratio`` and ``chi2_token`` / ``chi2_seq``."""
    assert response_mask.any(), "Expected at least one valid token in response_mask"
    if rollout_log_prob is None:
        mf = response_mask.to(torch.float64 if old_log_prob.dtype == torch.float64 else torch.float32)
        lp = old_log_prob.to(mf.dtype)
        mean = (torch.where(mf.bool(), lp, 0.0) * mf).sum(-1) / (mf.sum(-1) + _MEAN_EPS)
        return _floats({"training_ppl": torch.exp(-mean).mean(), "training_log_ppl": (-mean).mean()})
    res = ops.rollout_correction(old_log_prob, rollout_log_prob, response_mask, level=None)
    return _floats(res.metrics)


def compute_rollout_corr_metrics_from_logprobs(log_prob: Tensor, rollout_log_prob: Tensor,
                                               response_mask: Tensor) -> dict[str, float]:
    """verl 0.9.1 ``rollout_corr_helper.compute_rollout_corr_metrics_from_logprobs``: the off-policy
    diagnostics of the current policy against the rollout, prefixed ``rollout_corr/``."""
    return {f"rollout_corr/{k}": v for k, v in
            compute_offpolicy_metrics(log_prob, rollout_log_prob, response_mask).items()}


# verl's other POLICY_LOSS_REGISTRY entries live in rlkern/compat/verl_policy.py (dppo_tv ... bypass_mode)
# and its siblings verl_cov.py (clip_cov, kl_cov) and verl_dppo.py (dppo_tv, dppo_kl), which read this
# module's helpers at call time; their patch targets join this module's.
from rlkern.compat import verl_cov as _verl_cov  # noqa: E402
from rlkern.compat import verl_dppo as _verl_dppo  # noqa: E402
from rlkern.compat import verl_policy as _verl_policy  # noqa: E402
from rlkern.compat.verl_cov import *  # noqa: E402,F403
from rlkern.compat.verl_dppo import *  # noqa: E402,F403
from rlkern.compat.verl_policy import *  # noqa: E402,F403

for _shims in (_verl_policy, _verl_cov, _verl_dppo):
    PATCH_TARGETS += _shims.PATCH_TARGETS
    __all__ += _shims.__all__
