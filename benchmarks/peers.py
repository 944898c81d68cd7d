"""The peers' formulations that rlkern is benchmarked against, transcribed (re-typed, same maths and
op order) from their sources, plus the "same maths" functions handed to torch.compile.

Where the peer ships in an installed package we call the real thing instead (TRL's
``selective_log_softmax``, ``entropy_from_logits`` and ``ChunkedLogProbFunction``, see
``trl_*`` below). Sources transcribed:

* TRL ``trl/trainer/ppo_trainer.py`` (removed from TRL in v1.13; last seen at huggingface/trl
  be8a0874): the GAE loop over T.
* verl ``verl/trainer/ppo/core_algos.py`` (volcengine/verl 012be9d9): ``compute_gae_advantage_return``,
  ``compute_policy_loss_vanilla``, ``agg_loss``, ``compute_value_loss``, ``kl_penalty``; and
  ``verl/utils/torch_functional.py``: ``masked_mean`` / ``masked_var`` / ``masked_whiten``,
  ``entropy_from_logits``, ``clip_by_value``. verl's ``logprobs_from_logits_v2`` is the same row
  loop as TRL's ``selective_log_softmax`` CPU path (a logsumexp per row for fp32, a log_softmax +
  gather per row for bf16; TRL adds only temperature and row-mask handling, unused here), so the
  TRL call stands for both.
* TRL ``trl/trainer/grpo_trainer.py`` ``GRPOTrainer._compute_loss`` (installed TRL 1.16): the GRPO
  token loss with k3 KL, ``loss_type="grpo"`` normalisation.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# logprobs family
# ---------------------------------------------------------------------------------------------


def naive_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """The plain formulation found in TRL, verl and OpenRLHF: the full log-softmax [N, V] in the
    logits' dtype, then a gather."""
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def naive_entropy(logits: Tensor) -> Tensor:
    """verl ``entropy_from_logits``: logsumexp(z) - sum(softmax(z) * z), all of it [N, V] at once."""
    pd = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)


@functools.cache
def _trl_utils():
    from trl.trainer import utils

    return utils


def trl_selective_log_softmax(logits: Tensor, labels: Tensor) -> Tensor:
    """TRL's real ``selective_log_softmax`` (on CPU: fp32 -> a logsumexp per row in a Python loop;
    bf16 -> log_softmax + gather per row). verl's ``logprobs_from_logits_v2`` is the same code."""
    return _trl_utils().selective_log_softmax(logits, labels)


def trl_entropy_from_logits(logits: Tensor) -> Tensor:
    """TRL's real ``entropy_from_logits`` (log_softmax over chunks of 128 rows)."""
    return _trl_utils().entropy_from_logits(logits)


def math_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """gather - logsumexp in fp32: the maths rlkern fuses, for torch.compile."""
    z = logits.float()
    return z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def math_entropy(logits: Tensor) -> Tensor:
    """logsumexp(z) - sum(softmax(z) * z) in fp32, for torch.compile."""
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# rlmath family: GAE
# ---------------------------------------------------------------------------------------------


def trl_gae_loop(rewards: Tensor, values: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """TRL PPOTrainer's GAE: a Python loop over T with no mask (TRL zeroes padding afterwards).
    Returns (advantages, returns) before TRL's whitening, which is benchmarked on its own."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def _one_minus(mask: Tensor) -> Tensor:
    """``1 - mask`` as the peers write it; for a bool mask (which torch refuses to subtract) its
    logical complement, the same 0/1 values, so the peers' code runs on every mask dtype."""
    return ~mask if mask.dtype == torch.bool else 1 - mask


def verl_gae_loop(token_level_rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float,
                  lam: float) -> tuple[Tensor, Tensor]:
    """verl ``compute_gae_advantage_return``: the masked loop that carries the next value and the
    running advantage through masked positions. Returns (advantages, returns) before verl's final
    ``masked_whiten`` (benchmarked on its own), so it computes what ``rlkern.ops.gae`` computes."""
    with torch.no_grad():
        nextvalues = 0
        lastgaelam = 0
        advantages_reversed = []
        gen_len = token_level_rewards.shape[-1]
        for t in reversed(range(gen_len)):
            delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam_ = delta + gamma * lam * lastgaelam
            nextvalues = values[:, t] * response_mask[:, t] + _one_minus(response_mask[:, t]) * nextvalues
            lastgaelam = lastgaelam_ * response_mask[:, t] + _one_minus(response_mask[:, t]) * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        returns = advantages + values
    return advantages, returns


def _affine_combine(earlier, later):
    # Element t of the reversed sequence is the map a -> b_t + c_t * a (a_t from a_{t+1}). Composing
    # "apply `earlier` first, then `later`" gives a -> b_l + c_l * (b_e + c_e * a).
    c_e, b_e = earlier
    c_l, b_l = later
    return c_e * c_l, b_l + c_l * b_e


def _reverse_affine_scan(coef: Tensor, offset: Tensor) -> Tensor:
    """x_t = offset_t + coef_t * x_{t+1} along dim 1 with x_T = 0, as a parallel associative scan."""
    from torch._higher_order_ops.associative_scan import associative_scan

    _, x = associative_scan(_affine_combine, (coef.flip(1), offset.flip(1)), dim=1, combine_mode="generic")
    return x.flip(1)


def math_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float,
             lam: float) -> tuple[Tensor, Tensor]:
    """verl's masked GAE as two linear recurrences, for torch.compile (a Python loop over T = 4096
    would unroll into a 4096-step graph). With m the mask:
        nv_t   = m_t * V_t + (1 - m_t) * nv_{t+1}               (next valid value, carried through gaps)
        A_t    = m_t * (delta_t + gamma*lam*A_{t+1}) + (1 - m_t) * A_{t+1},
        delta_t = r_t + gamma * nv_{t+1} - V_t.
    Both are x_t = b_t + c_t * x_{t+1}, i.e. an associative scan over affine maps."""
    m = mask.to(values.dtype)
    nv = _reverse_affine_scan(1 - m, m * values)
    nv_next = torch.cat([nv[:, 1:], nv.new_zeros(nv.shape[0], 1)], dim=1)
    delta = rewards + gamma * nv_next - values
    adv = _reverse_affine_scan(m * (gamma * lam) + (1 - m), m * delta)
    return adv, adv + values


def verl_reinforce_returns_loop(token_level_rewards: Tensor, response_mask: Tensor, gamma: float) -> Tensor:
    """verl ``compute_reinforce_plus_plus_outcome_advantage`` before 0.9 (the form
    ``rlkern.ops.discounted_returns`` computes), without its final whitening: a loop over T whose
    running return is reset after the end of each sequence."""
    with torch.no_grad():
        returns = torch.zeros_like(token_level_rewards)
        running_return = 0
        for t in reversed(range(token_level_rewards.shape[1])):
            running_return = token_level_rewards[:, t] + gamma * running_return
            returns[:, t] = running_return
            running_return = running_return * response_mask[:, t]  # reset after EOS
    return returns


def math_discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """The reset recursion of ``verl_reinforce_returns_loop`` as one associative scan, for
    torch.compile: R_t = r_t + gamma * m_{t+1} * R_{t+1} (m_T = 0)."""
    m = mask.to(rewards.dtype)
    m_next = torch.cat([m[:, 1:], m.new_zeros(m.shape[0], 1)], dim=1)
    return _reverse_affine_scan(gamma * m_next, rewards)


def verl_token_rewards(scores: Tensor, old_log_prob: Tensor, ref_log_prob: Tensor, response_mask: Tensor,
                       kl_coef: float) -> Tensor:
    """verl ``apply_kl_penalty`` with ``kl_penalty="kl"`` (k1 = logp - ref, masked) on token scores
    that hold each sequence's score at its last valid token, placed as OpenRLHF's ``compute_reward``
    does (a scatter at ``T - 1 - argmax(fliplr(mask))``; verl's reward manager writes it with a
    Python loop over the batch). The maths of ``rlkern.ops.token_rewards(..., estimator="k1")``."""
    kld = old_log_prob - ref_log_prob
    kld = kld * response_mask
    eos = response_mask.size(1) - 1 - response_mask.long().fliplr().argmax(dim=1, keepdim=True)
    token_level_scores = torch.zeros_like(kld).scatter_(1, eos, scores.unsqueeze(1).to(kld.dtype))
    return token_level_scores - kl_coef * kld


# ---------------------------------------------------------------------------------------------
# rlmath family: masked statistics, KL, losses (verl / TRL eager chains)
# ---------------------------------------------------------------------------------------------


def verl_masked_sum(values: Tensor, mask: Tensor, axis=None) -> Tensor:
    # verl's form before 0.9 (0.9 adds a torch.where(mask.bool(), values, 0) for NaN padding).
    return (values * mask).sum(axis=axis)


def verl_masked_mean(values: Tensor, mask: Tensor, axis=None) -> Tensor:
    # verl's current form; older releases divide by mask.sum() without the 1e-8 (same cost).
    return (values * mask).sum(axis=axis) / (mask.sum(axis=axis) + 1e-8)


def verl_masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    mean = verl_masked_mean(values, mask)
    centered_values = values - mean
    variance = verl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def verl_masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """verl/TRL ``masked_whiten``: (x - mean) * rsqrt(var + 1e-8) with the unbiased masked variance.
    (verl raises on a mask sum of 0; that host sync is left out, it does not change the timing.)"""
    mean, var = verl_masked_mean(values, mask), verl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def verl_kl_k3(logprob: Tensor, ref_logprob: Tensor) -> Tensor:
    """verl ``kl_penalty(..., "low_var_kl")``: k3 with the log-ratio clamped to [-20, 20] and the
    result to [-10, 10]."""
    kl = ref_logprob - logprob
    kl = torch.clamp(kl, min=-20, max=20)
    ratio = torch.exp(kl)
    kld = (ratio - kl - 1).contiguous()
    return torch.clamp(kld, min=-10, max=10)


def verl_agg_token_mean(loss_mat: Tensor, loss_mask: Tensor) -> Tensor:
    return verl_masked_mean(loss_mat, loss_mask)


def verl_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                     clip_low: float = 0.2, clip_high: float = 0.2, clip_ratio_c: float = 3.0):
    """verl ``compute_policy_loss_vanilla`` (dual-clip always on, c = 3), token-mean aggregation.
    Returns (loss, clipfrac, ppo_kl, clipfrac_lower)."""
    negative_approx_kl = log_prob - old_log_prob
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(),
                                         response_mask)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = verl_agg_token_mean(pg_losses, response_mask)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def verl_value_loss(vpreds: Tensor, returns: Tensor, values: Tensor, response_mask: Tensor,
                    cliprange_value: float = 0.2):
    """verl ``compute_value_loss`` (token-mean). Returns (loss, clipfrac)."""
    vpredclipped = torch.max(torch.min(vpreds, values + cliprange_value), values - cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    clipped_vf_losses = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * verl_agg_token_mean(clipped_vf_losses, response_mask)
    vf_clipfrac = verl_masked_mean(torch.gt(vf_losses2, vf_losses1).float(), response_mask)
    return vf_loss, vf_clipfrac


def trl_grpo_loss(per_token_logps: Tensor, old_per_token_logps: Tensor, ref_per_token_logps: Tensor,
                  advantages: Tensor, mask: Tensor, beta: float = 0.04, epsilon_low: float = 0.2,
                  epsilon_high: float = 0.2) -> Tensor:
    """TRL ``GRPOTrainer._compute_loss``, loss_type "grpo", token-level importance sampling:
    -min(r A, clip(r) A) + beta * k3, per-sequence token mean, then the batch mean. ``advantages``
    is [B] (one per completion) as in TRL."""
    advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    coef_1 = torch.exp(log_ratio)
    per_token_kl = (torch.exp(ref_per_token_logps - per_token_logps)
                    - (ref_per_token_logps - per_token_logps) - 1)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    per_token_loss = per_token_loss + beta * per_token_kl
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


# ---------------------------------------------------------------------------------------------
# linear family
# ---------------------------------------------------------------------------------------------


def naive_linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """The naive path: logits = hidden @ weight^T materialised [N, V], upcast to fp32 (as TRL and
    verl do before the log-softmax), then log_softmax + gather."""
    logits = hidden @ weight.t()
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def trl_chunked_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """TRL's real ``ChunkedLogProbFunction`` with the chunk size TRL's ``get_per_token_logps`` passes
    (``_CHUNKED_LOGPROB_CHUNK_SIZE``), log-probs only."""
    from trl.kernels import ChunkedLogProbFunction

    chunk = getattr(_trl_utils(), "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
    return ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, chunk, None, 1.0, ())[0]


def trl_chunked_available() -> str | None:
    """None when TRL's ChunkedLogProbFunction can be imported, else why not."""
    try:
        from trl.kernels import ChunkedLogProbFunction  # noqa: F401
    except ImportError as err:
        return f"trl.kernels.ChunkedLogProbFunction is not importable ({err})"
    return None


def trl_available() -> str | None:
    try:
        _trl_utils()
    except ImportError as err:
        return f"trl is not installed ({err}); install the bench extra: pip install -e '.[bench]'"
    return None

