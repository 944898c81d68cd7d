"""rlkern.compat: each peer's shims against that peer's own numerics, and patch / unpatch.

- TRL shims are compared with the real installed ``trl`` (1.16): its module-level functions, and its
  GRPO / DPO losses by calling ``GRPOTrainer._compute_loss`` / ``DPOTrainer._compute_loss`` on a
  stand-in trainer object that carries only the attributes those methods read.
- verl and OpenRLHF are not installed here: their shims are compared with straight transcriptions of
  the published functions, written below with the file they come from.
- patch / unpatch for verl and OpenRLHF run against fake module trees inserted in ``sys.modules`` at the
  peers' real module paths.
- Shims whose op has kernels run once per backend available here (torch, cpp, and triton through the
  interpreter: small shapes), through the ``backend`` fixture; outputs are NaN-poisoned (conftest).

Tolerances: inputs are fp32 and both sides compute in fp32, but in different orders (fused kernels,
tree reductions vs the peers' ``.sum()``), so values agree to fp32 rounding: ``atol = rtol = 1e-5``
unless a test says otherwise (GAE and returns over T <= 40 steps accumulate a few more ulps:
``2e-5``).
"""

from __future__ import annotations

import collections
import sys
import types

import numpy as np
import pytest
import torch

import rlkern.compat as compat
from rlkern.compat import openrlhf as orl_shim
from rlkern.compat import trl as trl_shim
from rlkern.compat import verl as verl_shim
from tests.conftest import assert_close_to_oracle

trl_utils = pytest.importorskip("trl.trainer.utils")

ATOL = RTOL = 1e-5


def close(actual, expected, *, atol=ATOL, rtol=RTOL, what="value"):
    actual = torch.as_tensor(actual).detach().double()
    expected = torch.as_tensor(expected).detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_ok = not actual.isnan().any() or torch.equal(actual.isnan(), expected.isnan())
    assert nan_ok, f"{what}: NaN where the peer has none"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def rand_mask(b, t, p=0.75, *, ensure=True):
    """Right-padded masks of random lengths (>= 1 when ``ensure``) plus a few interior gaps, like
    multi-turn data with observation tokens."""
    lengths = torch.randint(1 if ensure else 0, t + 1, (b,))
    mask = torch.arange(t)[None, :] < lengths[:, None]
    gaps = torch.rand(b, t) > p
    gaps[:, 0] = False
    return mask & ~gaps


# ---------------------------------------------------------------------------------------------
# Transcriptions of verl (volcengine/verl), fp32, written from the published source.
# ---------------------------------------------------------------------------------------------

def verl_masked_sum(values, mask, axis=None):  # verl/utils/torch_functional.py::masked_sum
    valid_values = torch.where(mask.bool(), values, 0.0)
    return (valid_values * mask).sum(axis=axis)


def verl_masked_mean(values, mask, axis=None):  # verl/utils/torch_functional.py::masked_mean
    return verl_masked_sum(values, mask, axis) / (mask.sum(axis=axis) + 1e-8)


def verl_masked_var(values, mask, unbiased=True):  # verl/utils/torch_functional.py::masked_var
    mean = verl_masked_mean(values, mask)
    centered_values = values - mean
    variance = verl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError("At least one element in the mask has to be 1.")
        if mask_sum == 1:
            raise ValueError("The sum of the mask is one, which can cause a division by zero.")
        variance = variance * (mask_sum / (mask_sum - 1))
    return variance


def verl_masked_whiten(values, mask, shift_mean=True):  # verl/utils/torch_functional.py::masked_whiten
    mean, var = verl_masked_mean(values, mask), verl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def verl_kl_penalty(logprob, ref_logprob, kl_penalty):  # verl/trainer/ppo/core_algos.py::kl_penalty
    if kl_penalty in ("kl", "k1"):
        return logprob - ref_logprob
    if kl_penalty == "abs":
        return (logprob - ref_logprob).abs()
    if kl_penalty in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    if kl_penalty in ("low_var_kl", "k3"):
        kl = ref_logprob - logprob
        kl = torch.clamp(kl, min=-20, max=20)
        ratio = torch.exp(kl)
        kld = (ratio - kl - 1).contiguous()
        return torch.clamp(kld, min=-10, max=10)
    raise NotImplementedError


def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode):  # verl/trainer/ppo/core_algos.py::agg_loss
    # verl 0.9.1 with dp_size=1 and no global counts (tests/test_compat_verl_installed.py runs verl's own
    # code, global counts included).
    if loss_agg_mode == "token-mean":
        return verl_masked_mean(loss_mat, loss_mask)
    if loss_agg_mode == "token-sum":
        return (loss_mat * loss_mask).sum()
    if loss_agg_mode == "seq-mean-token-sum":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()  # exclude fully masked sequences
        return verl_masked_mean(seq_losses, seq_mask)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_mask = torch.sum(loss_mask, dim=-1)
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
        seq_mask = (seq_mask > 0).float()
        return verl_masked_mean(seq_losses, seq_mask)
    if loss_agg_mode == "seq-mean-token-sum-norm":  # 0.9.1: seq-mean-token-sum / T (older: the sum / T)
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()
        return verl_masked_mean(seq_losses, seq_mask) / loss_mask.shape[-1]
    raise ValueError(loss_agg_mode)


def verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    # verl/trainer/ppo/core_algos.py::compute_gae_advantage_return
    with torch.no_grad():
        nextvalues = 0
        lastgaelam = 0
        advantages_reversed = []
        for t in reversed(range(token_level_rewards.shape[-1])):
            delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam_ = delta + gamma * lam * lastgaelam
            nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
            lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        returns = advantages + values
        advantages = verl_masked_whiten(advantages, response_mask)
    return advantages, returns


def verl_grpo(token_level_rewards, response_mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    # verl/trainer/ppo/core_algos.py::compute_grpo_outcome_advantage
    scores = token_level_rewards.sum(dim=-1)
    id2score, id2mean, id2std = collections.defaultdict(list), {}, {}
    with torch.no_grad():
        for i in range(scores.shape[0]):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
            else:
                stacked = torch.stack(id2score[idx])
                id2mean[idx], id2std[idx] = torch.mean(stacked), torch.std(stacked)
        for i in range(scores.shape[0]):
            if norm_adv_by_std_in_grpo:
                scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
            else:
                scores[i] = scores[i] - id2mean[index[i]]
        scores = scores.unsqueeze(-1) * response_mask
    return scores, scores


def verl_rloo(token_level_rewards, response_mask, index):
    # verl/trainer/ppo/core_algos.py::compute_rloo_outcome_advantage
    scores = token_level_rewards.sum(dim=-1)
    id2score, id2mean = collections.defaultdict(list), {}
    with torch.no_grad():
        for i in range(scores.shape[0]):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            group = id2score[idx]
            id2mean[idx] = torch.tensor(0.0) if len(group) == 1 else torch.mean(torch.stack(group))
        for i in range(scores.shape[0]):
            n = len(id2score[index[i]])
            if n > 1:
                scores[i] = scores[i] * n / (n - 1) - id2mean[index[i]] * n / (n - 1)
        scores = scores.unsqueeze(-1) * response_mask
    return scores, scores


def verl_reinforce_pp(token_level_rewards, response_mask, gamma):
    # verl/trainer/ppo/core_algos.py::compute_reinforce_plus_plus_outcome_advantage
    with torch.no_grad():
        returns = torch.zeros_like(token_level_rewards)
        running_return = 0
        for t in reversed(range(token_level_rewards.shape[1])):  # 0.9.1: masked steps carry it through
            new_running_return = token_level_rewards[:, t] + gamma * running_return
            returns[:, t] = new_running_return * response_mask[:, t]
            m = response_mask[:, t]
            running_return = new_running_return * m + running_return * (1 - m)
        advantages = verl_masked_whiten(returns, response_mask) * response_mask
    return advantages, returns


def verl_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange_low, cliprange_high,
                     clip_ratio_c=3.0, loss_agg_mode="token-mean"):
    # verl/trainer/ppo/core_algos.py::compute_policy_loss / compute_policy_loss_vanilla
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(),
                                         response_mask)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def verl_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean"):
    # verl/trainer/ppo/core_algos.py::compute_value_loss (clip_by_value from torch_functional.py)
    vpredclipped = torch.max(torch.min(vpreds, values + cliprange_value), values - cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    clipped_vf_losses = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * verl_agg_loss(clipped_vf_losses, response_mask, loss_agg_mode)
    vf_clipfrac = verl_masked_mean(torch.gt(vf_losses2, vf_losses1).float(), response_mask)
    return vf_loss, vf_clipfrac


# ---------------------------------------------------------------------------------------------
# Transcriptions of OpenRLHF (OpenRLHF/OpenRLHF), fp32.
# ---------------------------------------------------------------------------------------------

def orl_compute_approx_kl(log_probs, log_probs_base, kl_estimator="k1"):  # openrlhf/models/utils.py
    if kl_estimator == "k1":
        log_ratio = log_probs.float() - log_probs_base.float()
    if kl_estimator == "k2":
        log_ratio = (log_probs.float() - log_probs_base.float()) ** 2 / 2.0
    if kl_estimator == "k3":
        log_ratio = -(log_probs.float() - log_probs_base.float())
        log_ratio = log_ratio.exp() - 1 - log_ratio
    return log_ratio.clamp(min=-10, max=10)


def orl_compute_reward(r, kl_coef, kl, action_mask, reward_clip_range=None):  # openrlhf/models/utils.py
    if kl_coef <= 0.0:
        kl_coef = 0.0
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    kl_reward = -kl_coef * kl
    eos_indices = action_mask.size(1) - 1 - action_mask.long().fliplr().argmax(dim=1, keepdim=True)
    last_reward = torch.zeros_like(kl).scatter_(dim=1, index=eos_indices, src=r.unsqueeze(1).to(kl.dtype))
    return last_reward + kl_reward


def orl_masked_mean(tensor, mask, dim=None):  # openrlhf/models/utils.py::masked_mean
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


def orl_aggregate(loss, action_mask, token_level_loss):
    # openrlhf/models/loss.py, the loss aggregation of PolicyLoss / ValueLoss on one process
    # (batch_num_tokens = global_batch_size = None): per-sample mode excludes fully masked sequences.
    if token_level_loss:
        return orl_masked_mean(loss, action_mask, dim=None)
    token_counts = action_mask.sum(dim=-1)
    seq_loss = (loss * action_mask).sum(dim=-1) / (token_counts + 1e-8)
    return orl_masked_mean(seq_loss, (token_counts > 0).float(), dim=None)


def orl_policy_loss(log_probs, old_log_probs, advantages, action_mask, clip_eps_low=0.2, clip_eps_high=0.2,
                    dual_clip=None, token_level_loss=True):  # openrlhf/models/loss.py::PolicyLoss.forward
    log_ratio = log_probs - old_log_probs
    ratio = log_ratio.exp()
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * advantages
    if dual_clip is None:
        loss = -torch.min(surr1, surr2)
    else:
        clip1 = torch.min(surr1, surr2)
        clip2 = torch.max(clip1, dual_clip * advantages)
        loss = -torch.where(advantages < 0, clip2, clip1)
    loss = orl_aggregate(loss, action_mask, token_level_loss)
    clip_ratio = orl_masked_mean(torch.lt(surr2, surr1).float(), action_mask, dim=None)
    ppo_kl = orl_masked_mean(-log_ratio.detach(), action_mask, dim=None)
    return loss, clip_ratio, ppo_kl


def orl_value_loss(values, old_values, returns, action_mask, clip_eps=None, token_level_loss=True):
    # openrlhf/models/loss.py::ValueLoss.forward
    if clip_eps is not None:
        values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        loss = torch.max((values_clipped - returns) ** 2, (values - returns) ** 2)
    else:
        loss = (values - returns) ** 2
    return 0.5 * orl_aggregate(loss, action_mask, token_level_loss)


def orl_gae(values, rewards, action_mask, gamma, lambd):
    # openrlhf/trainer/ppo_utils/experience_maker.py::get_advantages_and_returns
    lastgaelam = 0
    advantages_reversed = []
    response_length = rewards.size(1)
    if action_mask is not None:
        values = action_mask * values
        rewards = action_mask * rewards
    for t in reversed(range(response_length)):
        nextvalues = values[:, t + 1] if t < response_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lambd * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages.detach(), advantages + values


def orl_cumulative_returns(rewards, action_mask, gamma):
    # openrlhf/trainer/ppo_utils/experience_maker.py::get_cumulative_returns
    returns = torch.zeros_like(rewards)
    cumulative_return = torch.zeros(rewards.size(0))
    if action_mask is not None:
        rewards = action_mask * rewards
    for t in reversed(range(rewards.size(1))):
        cumulative_return = rewards[:, t] + gamma * cumulative_return
        returns[:, t] = cumulative_return
    return returns


def orl_shape_group_rewards(rewards, n, estimator):
    # openrlhf/trainer/ppo_utils/experience_maker.py::compute_advantages_and_returns, "reward shaping"
    rewards = rewards.reshape(-1, n)
    if estimator == "rloo":
        rewards = rewards - (rewards.sum(-1, keepdim=True) - rewards) / (n - 1)
    elif estimator in ["reinforce_baseline", "dr_grpo"]:
        rewards = rewards - rewards.mean(-1, keepdim=True)
    elif estimator == "group_norm":
        rewards = (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-9)
    return rewards.reshape(-1)


# ---------------------------------------------------------------------------------------------
# TRL: the real installed package
# ---------------------------------------------------------------------------------------------

trl_real = types.SimpleNamespace(
    selective_log_softmax=trl_utils.selective_log_softmax,
    entropy_from_logits=trl_utils.entropy_from_logits,
    selective_log_softmax_and_entropy=trl_utils.selective_log_softmax_and_entropy,
    nanstd=trl_utils.nanstd,
)

# Triton through the interpreter is slow: logits for the backend sweep stay small.
LOGIT_SHAPES = [(1, 1, 7), (2, 5, 33), (3, 4, 130)]


@pytest.mark.parametrize("shape", LOGIT_SHAPES)
def test_trl_selective_log_softmax_matches_trl(backend, shape):
    logits = torch.randn(shape) * 3
    index = torch.randint(0, shape[-1], shape[:-1])
    row_mask = torch.rand(shape[:-1]) > 0.3
    for temperature in (1.0, 0.7):
        got = trl_shim.selective_log_softmax(logits, index, temperature=temperature, row_mask=row_mask)
        want = trl_real.selective_log_softmax(logits, index, temperature=temperature, row_mask=row_mask)
        assert got.dtype == want.dtype
        close(got, want, what=f"selective_log_softmax T={temperature}")


def test_trl_selective_log_softmax_topk_index_and_grad():
    logits = torch.randn(2, 3, 50, requires_grad=True)
    index = torch.randint(0, 50, (2, 3, 4))
    got = trl_shim.selective_log_softmax(logits, index, temperature=1.3)
    want = trl_real.selective_log_softmax(logits, index, temperature=1.3)
    close(got, want, what="top-K log-probs")
    w = torch.randn_like(want)
    (g_got,) = torch.autograd.grad((got * w).sum(), logits)
    (g_want,) = torch.autograd.grad((want * w).sum(), logits)
    close(g_got, g_want, what="d logits")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_trl_selective_log_softmax_low_precision_is_at_least_as_accurate(dtype):
    """TRL runs log_softmax in bf16/fp16; rlkern computes in fp32 and rounds once, so it is never
    further from the fp64 value than TRL (plus one rounding of the output: 1 ulp of |logp| <= ~8)."""
    logits = (torch.randn(4, 6, 301) * 4).to(dtype)
    index = torch.randint(0, 301, (4, 6))
    got = trl_shim.selective_log_softmax(logits, index)
    want = trl_real.selective_log_softmax(logits, index)
    oracle = torch.log_softmax(logits.double(), -1).gather(-1, index[..., None]).squeeze(-1)
    assert got.dtype == dtype
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    assert_close_to_oracle(got, oracle, want, atol=0.0, rtol=ulp, what=f"{dtype} log-probs")


@pytest.mark.parametrize("shape", LOGIT_SHAPES)
def test_trl_entropy_matches_trl(backend, shape):
    logits = (torch.randn(shape) * 2).requires_grad_()
    got = trl_shim.entropy_from_logits(logits, chunk_size=2)
    want = trl_real.entropy_from_logits(logits, chunk_size=2)
    close(got, want, what="entropy")
    w = torch.randn_like(want)
    (g_got,) = torch.autograd.grad((got * w).sum(), logits)
    (g_want,) = torch.autograd.grad((want * w).sum(), logits)
    close(g_got, g_want, what="d logits")


@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_trl_logprobs_and_entropy_matches_trl(backend, entropy_requires_grad):
    logits = (torch.randn(3, 5, 37) * 2).requires_grad_()
    index = torch.randint(0, 37, (3, 5))
    row_mask = torch.rand(3, 5) > 0.3
    lp, ent = trl_shim.selective_log_softmax_and_entropy(logits, index, entropy_requires_grad, 0.9, row_mask)
    lp_t, ent_t = trl_real.selective_log_softmax_and_entropy(logits, index, entropy_requires_grad, 0.9,
                                                             row_mask)
    close(lp, lp_t, what="log-probs")
    close(ent, ent_t, what="entropy")
    assert ent.requires_grad == ent_t.requires_grad == entropy_requires_grad
    loss = lp.sum() + (ent.sum() if entropy_requires_grad else 0)
    loss_t = lp_t.sum() + (ent_t.sum() if entropy_requires_grad else 0)
    close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(loss_t, logits)[0], what="d logits")


def test_trl_bad_input():
    logits = torch.randn(2, 3, 11)
    with pytest.raises(ValueError, match="temperature must be positive"):
        trl_shim.selective_log_softmax(logits, torch.zeros(2, 3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="index must have shape"):
        trl_shim.selective_log_softmax(logits, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="row_mask"):
        trl_shim.selective_log_softmax(logits, torch.zeros(2, 3, dtype=torch.long), row_mask=torch.ones(3, 2))
    with pytest.raises(ValueError, match="chunk_size"):
        trl_shim.entropy_from_logits(logits, chunk_size=0)
    with pytest.raises(ValueError, match=r"scale_rewards must be one of \('group', 'batch', 'none'\)"):
        trl_shim.grpo_advantages(torch.zeros(4), 2, scale_rewards="std")
    with pytest.raises(ValueError, match="finite"):
        trl_shim.grpo_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match=r"loss_type must be one of \('grpo', 'bnpo', 'dr_grpo', 'dapo', "
                       r"'cispo', 'sapo', 'luspo', 'vespo'\)"):
        trl_shim.grpo_loss(torch.zeros(1, 2), None, None, torch.zeros(1), torch.ones(1, 2), loss_type="ppo")
    with pytest.raises(ValueError, match=r"importance_sampling_level must be one of \('token', 'sequence'\)"):
        trl_shim.grpo_loss(torch.zeros(1, 2), None, None, torch.zeros(1), torch.ones(1, 2),
                           importance_sampling_level="sequence_token")
    with pytest.raises(ValueError, match=r"loss_type must be one of \('sigmoid', 'hinge', 'ipo', 'robust'\)"):
        trl_shim.dpo_loss(*torch.zeros(4, 2), loss_type="exo_pair")
    with pytest.raises(ValueError, match="chosen_lengths"):
        trl_shim.dpo_loss(*torch.zeros(4, 2), loss_type="ipo")


def trl_grpo_advantages(rewards, num_generations, scale_rewards):
    """trl/trainer/grpo_trainer.py::_generate_and_score_completions, sum_then_normalize branch, with
    TRL's own nanstd."""
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        if num_generations > 1:
            std_rewards = trl_real.nanstd(rewards.view(-1, num_generations), dim=1)
            std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        else:
            std_rewards = torch.zeros_like(rewards)
    else:
        one = rewards.numel() == 1
        std_rewards = torch.zeros_like(rewards) if one else trl_real.nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("num_generations", [1, 3, 8])
def test_trl_grpo_advantages_match_trl(scale_rewards, num_generations):
    rewards = torch.randn(num_generations * 5)
    got = trl_shim.grpo_advantages(rewards, num_generations, scale_rewards)
    close(got, trl_grpo_advantages(rewards, num_generations, scale_rewards), what="advantages")


def test_trl_grpo_advantages_zero_variance_group_is_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.5])
    got = trl_shim.grpo_advantages(rewards, 3)
    assert torch.equal(got[:3], torch.zeros(3))
    # TRL gives (r - mean) / 1e-4: 0 up to the rounding of the mean, at most a few ulps / 1e-4.
    close(got, trl_grpo_advantages(rewards, 3, "group"), atol=2e-3, what="advantages")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("num_generations", [1, 4])
def test_trl_rloo_advantages_match_trl(normalize, num_generations):
    rewards = torch.randn(num_generations * 6)
    # trl/trainer/rloo_trainer.py, RLOO advantages (finite rewards: every completion scorable)
    grouped = rewards.view(-1, num_generations)
    if num_generations > 1:
        baselines = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)
        want = rewards - baselines.view(-1)
    else:
        want = torch.zeros_like(rewards)
    if normalize:
        want = (want - torch.nanmean(want)) / (trl_real.nanstd(want) + 1e-4)
    close(trl_shim.rloo_advantages(rewards, num_generations, normalize), torch.nan_to_num(want, nan=0.0))


class _Accelerator:
    """What GRPOTrainer/DPOTrainer._compute_loss read from accelerate on one process."""
    num_processes = 1
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _metrics():
    return {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}


def trl_grpo_trainer_loss(logp, old, ref, advantages, mask, *, beta, eps_low, eps_high, loss_type,
                          max_completion_length, num_items_in_batch, use_bias_correction_kl=True,
                          gradient_accumulation_steps=1, steps_per_generation=1,
                          importance_sampling_level="token", delta=None):
    """The real GRPOTrainer._compute_loss on a stand-in trainer holding only what it reads."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    b, t = logp.shape
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros(b, t), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=importance_sampling_level, beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=use_bias_correction_kl, delta=delta,
                                   steps_per_generation=steps_per_generation,
                                   sapo_temperature_pos=1.0, sapo_temperature_neg=1.05),
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=gradient_accumulation_steps,
        accelerator=_Accelerator(), _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=_metrics(),
        max_completion_length=max_completion_length)
    inputs = dict(prompt_ids=torch.zeros(b, 2, dtype=torch.long),
                  prompt_mask=torch.ones(b, 2, dtype=torch.long),
                  completion_ids=torch.zeros(b, t, dtype=torch.long), completion_mask=mask.long(),
                  advantages=advantages, old_per_token_logps=old, ref_per_token_logps=ref,
                  num_items_in_batch=torch.as_tensor(float(num_items_in_batch)))
    return GRPOTrainer._compute_loss(trainer, None, inputs)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,bias_correction", [(0.0, True), (0.04, True), (0.04, False)])
def test_trl_grpo_loss_matches_trl_trainer(backend, loss_type, beta, bias_correction):
    """Off-policy (old != logp, as with num_iterations > 1) with clip-higher: TRL 1.16's default
    use_bias_correction_kl=True weights the KL term by the ratio."""
    b, t = 5, 9
    logp = (-torch.rand(b, t) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(b, t)
    ref = logp.detach() + 0.3 * torch.randn(b, t)
    adv = torch.randn(b)
    mask = rand_mask(b, t)
    kw = dict(beta=beta, loss_type=loss_type, max_completion_length=12,
              num_items_in_batch=int(mask.sum()) + 7, use_bias_correction_kl=bias_correction)
    got = trl_shim.grpo_loss(logp, old, ref, adv, mask, epsilon=0.2, epsilon_high=0.28, **kw)
    want = trl_grpo_trainer_loss(logp, old, ref, adv, mask, eps_low=0.2, eps_high=0.28, **kw)
    close(got, want, what=f"{loss_type} loss")
    close(torch.autograd.grad(got, logp)[0], torch.autograd.grad(want, logp)[0], what=f"{loss_type} d logp")


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo", "luspo"])
@pytest.mark.parametrize("level,delta", [("token", None), ("token", 1.3), ("sequence", None)])
def test_trl_grpo_loss_variants_match_trl_trainer(backend, loss_type, level, delta):
    """The standalone helper with TRL 1.16's newer loss types, GSPO's sequence-level ratio and
    INTELLECT-2's delta, vs the real _compute_loss (cispo: epsilon_high is TRL's absolute cap)."""
    b, t = 5, 9
    logp = (-torch.rand(b, t) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(b, t)
    ref = logp.detach() + 0.3 * torch.randn(b, t)
    adv, mask = torch.randn(b), rand_mask(b, t)
    eps_high = 1.4 if loss_type == "cispo" else 0.28
    kw = dict(beta=0.04, loss_type=loss_type, max_completion_length=12,
              num_items_in_batch=int(mask.sum()) + 3, importance_sampling_level=level, delta=delta)
    got = trl_shim.grpo_loss(logp, old, ref, adv, mask, epsilon=0.2, epsilon_high=eps_high, **kw)
    want = trl_grpo_trainer_loss(logp, old, ref, adv, mask, eps_low=0.2, eps_high=eps_high, **kw)
    close(got, want, what=f"{loss_type} {level} loss")
    close(torch.autograd.grad(got, logp)[0], torch.autograd.grad(want, logp)[0], what=f"{loss_type} d logp")


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("accumulation,steps_per_generation", [(2, 1), (2, 2), (4, 2), (1, 2)])
def test_trl_grpo_loss_normalisers_match_trl_trainer(loss_type, accumulation, steps_per_generation):
    """Gradient accumulation and steps_per_generation: TRL divides grpo/bnpo/dr_grpo by the
    accumulation steps and dapo by N * accumulation / steps_per_generation (was 2x off at 2)."""
    b, t = 4, 7
    logp = (-torch.rand(b, t) * 3).requires_grad_()
    old, ref = logp.detach() + 0.2 * torch.randn(b, t), logp.detach() + 0.2 * torch.randn(b, t)
    adv, mask = torch.randn(b), rand_mask(b, t)
    kw = dict(beta=0.04, loss_type=loss_type, max_completion_length=9, num_items_in_batch=int(mask.sum()) * 3)
    got = trl_shim.grpo_loss(logp, old, ref, adv, mask, gradient_accumulation_steps=accumulation,
                             steps_per_generation=steps_per_generation, **kw)
    want = trl_grpo_trainer_loss(logp, old, ref, adv, mask, eps_low=0.2, eps_high=0.2,
                                 gradient_accumulation_steps=accumulation,
                                 steps_per_generation=steps_per_generation, **kw)
    close(got, want, what=f"{loss_type} loss")
    close(torch.autograd.grad(got, logp)[0], torch.autograd.grad(want, logp)[0], what=f"{loss_type} d logp")


# vespo folds the ratios into its gamma weights instead (TRL allows it with the token modes only).
@pytest.mark.parametrize("loss_type, is_shape", [("dapo", "token"), ("dapo", "sequence"), ("vespo", "token")])
def test_trl_grpo_compute_loss_with_vllm_is_ratio_matches_trl(loss_type, is_shape):
    """GRPOTrainer._compute_loss patched vs TRL's, with vLLM importance-sampling correction (dapo: the
    ratio multiplies the surrogate, not the KL; vespo: its log, summed per row, enters log w of the
    gamma weights): loss, gradient and every logged metric."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    from rlkern.compat._trl_fused import calls, wrap_grpo_compute_loss

    fused_before = calls["grpo_loss"]
    b, t = 4, 7
    logp = (-torch.rand(b, t) * 3).requires_grad_()
    old, ref = logp.detach() + 0.3 * torch.randn(b, t), logp.detach() + 0.3 * torch.randn(b, t)
    ratio = torch.rand(b, t if is_shape == "token" else 1) * 2
    results = []
    for compute_loss in (GRPOTrainer._compute_loss, wrap_grpo_compute_loss(GRPOTrainer._compute_loss)):
        trainer = types.SimpleNamespace(
            _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.rand(b, t), None),
            top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
            beta=0.05,
            args=types.SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=1,
                                       vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=3.0,
                                       vespo_lambda_neg=2.0),
            loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=True,
            vllm_importance_sampling_correction=True, model=types.SimpleNamespace(training=True),
            current_gradient_accumulation_steps=1, accelerator=_Accelerator(), _entropy_bonus_enabled=False,
            aux_loss_enabled=False, _metrics=_metrics(), max_completion_length=t,
            get_gamma_weights=GRPOTrainer.get_gamma_weights)  # a staticmethod
        torch.manual_seed(3)  # the same entropies for both
        mask = rand_mask(b, t)
        inputs = dict(prompt_ids=torch.zeros(b, 2, dtype=torch.long),
                      prompt_mask=torch.ones(b, 2, dtype=torch.long),
                      completion_ids=torch.zeros(b, t, dtype=torch.long), completion_mask=mask.long(),
                      advantages=torch.linspace(-1, 1, b), old_per_token_logps=old, ref_per_token_logps=ref,
                      importance_sampling_ratio=ratio, num_items_in_batch=torch.tensor(float(mask.sum())))
        loss = compute_loss(trainer, None, inputs)
        results.append((loss, torch.autograd.grad(loss, logp)[0], trainer._metrics["train"]))
    (want, want_grad, want_metrics), (got, got_grad, got_metrics) = results
    assert calls["grpo_loss"] == fused_before + 1  # the wrapped call ran on rlkern, not TRL's fallback
    assert float(want) != 0.0 and bool(want_grad.abs().sum() > 0)  # the ratios did not zero every weight
    close(got, want, what="loss")
    close(got_grad, want_grad, what="d logp")
    assert set(got_metrics) == set(want_metrics)
    for key in want_metrics:
        close(torch.tensor(got_metrics[key]), torch.tensor(want_metrics[key]), what=key)


def test_trl_grpo_loss_dapo_all_masked_is_zero_like_trl():
    """A batch whose completions are all masked (mask_truncated_completions with every completion
    truncated: num_items_in_batch = 0): TRL returns 0, and so does the shim (it used to raise)."""
    logp = (-torch.rand(3, 5)).requires_grad_()
    mask = torch.zeros(3, 5, dtype=torch.long)
    kw = dict(beta=0.04, loss_type="dapo", max_completion_length=5, num_items_in_batch=0)
    got = trl_shim.grpo_loss(logp, logp.detach() - 0.1, logp.detach() + 0.1, torch.randn(3), mask, **kw)
    want = trl_grpo_trainer_loss(logp, logp.detach() - 0.1, logp.detach() + 0.1, torch.randn(3), mask,
                                 eps_low=0.2, eps_high=0.2, **kw)
    assert float(got.detach()) == float(want.detach()) == 0.0


def test_trl_grpo_loss_on_policy_default():
    """old_per_token_logps=None is TRL's on-policy case (old = logp.detach())."""
    logp = (-torch.rand(3, 4)).requires_grad_()
    adv, mask = torch.randn(3), rand_mask(3, 4)
    got = trl_shim.grpo_loss(logp, None, None, adv, mask, loss_type="bnpo")
    want = trl_grpo_trainer_loss(logp, logp.detach(), None, adv, mask, beta=0.0, eps_low=0.2, eps_high=0.2,
                                 loss_type="bnpo", max_completion_length=4, num_items_in_batch=1)
    close(got, want, what="on-policy loss")


def trl_dpo_trainer_loss(chosen_tok, rejected_tok, ref_chosen, ref_rejected, completion_mask, *, beta,
                         loss_type,
                         label_smoothing):
    """The real DPOTrainer._compute_loss on a stand-in trainer and a stand-in model whose
    per-token log-probs are given (zero outside the completion, as the fused LM head returns them)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    tok = torch.cat([chosen_tok, rejected_tok])
    n, length = completion_mask.shape

    def model(**kwargs):
        z = torch.zeros(n, length - 1)
        return types.SimpleNamespace(log_probs=tok, entropy=z, mean_logits=z, is_top1=z.bool(), aux_loss=None)

    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False, _total_train_tokens=0, _tp_size=1,
        _metrics=_metrics())
    inputs = dict(input_ids=torch.zeros(n, length, dtype=torch.long),
                  attention_mask=torch.ones(n, length, dtype=torch.long), completion_mask=completion_mask,
                  ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
    return DPOTrainer._compute_loss(trainer, model, inputs, False)


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0),
                                                        ("ipo", 0.0), ("robust", 0.1)])
def test_trl_dpo_loss_matches_trl_trainer(loss_type, label_smoothing):
    b, length = 4, 8
    completion_mask = torch.zeros(2 * b, length, dtype=torch.long)
    starts, ends = torch.randint(1, 4, (2 * b,)), torch.randint(5, length + 1, (2 * b,))
    for i in range(2 * b):
        completion_mask[i, starts[i]:ends[i]] = 1
    shifted = completion_mask[:, 1:]
    tok = (-torch.rand(2 * b, length - 1) * 2 * shifted).requires_grad_()
    ref_c, ref_r = -torch.rand(b) * 8, -torch.rand(b) * 8
    want = trl_dpo_trainer_loss(tok[:b], tok[b:], ref_c, ref_r, completion_mask, beta=0.1,
                                loss_type=loss_type,
                                label_smoothing=label_smoothing)
    logps = tok.sum(dim=1)
    lengths = completion_mask.sum(dim=1)
    got, chosen_rewards, rejected_rewards = trl_shim.dpo_loss(
        logps[:b], logps[b:], ref_c, ref_r, beta=0.1, loss_type=loss_type, label_smoothing=label_smoothing,
        chosen_lengths=lengths[:b], rejected_lengths=lengths[b:])
    close(got, want, what=f"{loss_type} loss")
    close(torch.autograd.grad(got, tok)[0], torch.autograd.grad(want, tok)[0], what=f"{loss_type} d logps")
    close(chosen_rewards, 0.1 * (logps[:b] - ref_c), what="chosen rewards")
    close(rejected_rewards, 0.1 * (logps[b:] - ref_r), what="rejected rewards")
    assert not chosen_rewards.requires_grad


# ---------------------------------------------------------------------------------------------
# verl
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("axis", [None, -1])
def test_verl_masked_mean_sum(backend, axis):
    x = torch.randn(6, 23)
    mask = rand_mask(6, 23)
    mask[2] = False  # an empty row: verl's + 1e-8 makes its mean 0
    x[~mask] = float("nan")  # masked-out entries never enter
    close(verl_shim.masked_sum(x, mask, axis), verl_masked_sum(x, mask, axis), what="masked_sum")
    close(verl_shim.masked_mean(x, mask, axis), verl_masked_mean(x, mask, axis), what="masked_mean")
    empty = torch.zeros(6, 23, dtype=torch.bool)
    close(verl_shim.masked_mean(x, empty, axis), verl_masked_mean(x, empty, axis), what="empty mask")


@pytest.mark.parametrize("unbiased", [True, False])
def test_verl_masked_var_and_whiten(backend, unbiased):
    x = torch.randn(5, 31) * 3 + 1
    mask = rand_mask(5, 31)
    close(verl_shim.masked_var(x, mask, unbiased), verl_masked_var(x, mask, unbiased), what="masked_var")
    for shift_mean in (True, False):
        close(verl_shim.masked_whiten(x, mask, shift_mean), verl_masked_whiten(x, mask, shift_mean),
              what=f"masked_whiten shift_mean={shift_mean}")


def test_verl_masked_var_errors_like_verl():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="At least one element in the mask has to be 1"):
        verl_shim.masked_var(x, torch.zeros(2, 4))
    one = torch.zeros(2, 4)
    one[1, 2] = 1
    with pytest.raises(ValueError, match="The sum of the mask is one"):
        verl_shim.masked_whiten(x, one)
    assert float(verl_shim.masked_var(x, torch.zeros(2, 4), unbiased=False)) == 0.0


def test_verl_logprobs_entropy(backend):
    logits = (torch.randn(3, 5, 40) * 2).requires_grad_()
    labels = torch.randint(0, 40, (3, 5))
    lp = verl_shim.logprobs_from_logits(logits, labels, inplace_backward=False)
    lp_ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    close(lp, lp_ref, what="logprobs")
    pd = torch.softmax(logits, -1)
    ent_ref = torch.logsumexp(logits, -1) - (pd * logits).sum(-1)  # verl torch_functional.entropy_from_logits
    close(verl_shim.entropy_from_logits(logits), ent_ref, what="entropy")
    close(torch.autograd.grad(lp.sum(), logits)[0], torch.autograd.grad(lp_ref.sum(), logits)[0],
          what="d logits")


def test_verl_logprobs_inplace_backward_default():
    """verl's default inplace_backward=True: d logits is written into the logits' own storage."""
    base = torch.randn(2, 7, 33) * 2
    labels = torch.randint(0, 33, (2, 7))
    logits = base.clone().requires_grad_()
    lp = verl_shim.logprobs_from_logits(logits, labels)
    (g,) = torch.autograd.grad(lp.sum(), logits)
    ref = base.clone().requires_grad_()
    lp_ref = torch.log_softmax(ref, -1).gather(-1, labels[..., None]).squeeze(-1)
    close(lp, lp_ref, what="logprobs")
    close(g, torch.autograd.grad(lp_ref.sum(), ref)[0], what="d logits")


@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"])
def test_verl_kl_penalty(backend, name):
    logp = torch.randn(4, 19) * 3
    ref = torch.randn(4, 19) * 3
    logp[0, :4] = torch.tensor([-60.0, 60.0, -15.0, 25.0])  # both k3 clamps engaged
    logp.requires_grad_()
    got = verl_shim.kl_penalty(logp, ref, name)
    want = verl_kl_penalty(logp, ref, name)
    close(got, want, what=name)
    g = torch.autograd.grad(got.sum(), logp)[0]
    assert torch.isfinite(g).all()
    close(g, torch.autograd.grad(want.sum(), logp)[0], what=f"{name} gradient")


def test_verl_kl_penalty_straight_through():
    logp = (torch.randn(3, 7)).requires_grad_()
    ref = torch.randn(3, 7)
    got = verl_shim.kl_penalty(logp, ref, "low_var_kl+")
    close(got, verl_kl_penalty(logp, ref, "k3"), what="k3+ value")
    close(torch.autograd.grad(got.sum(), logp)[0], (logp - ref).detach(), what="k3+ gradient = k2's")


@pytest.mark.parametrize("name", ["k1+", "abs+", "mse+"])
def test_verl_kl_penalty_straight_through_any_estimator(name):
    logp = torch.randn(3, 7).requires_grad_()
    ref = torch.randn(3, 7)
    got = verl_shim.kl_penalty(logp, ref, name)
    close(got, verl_kl_penalty(logp, ref, name[:-1]), what=f"{name} value")
    close(torch.autograd.grad(got.sum(), logp)[0], (logp - ref).detach(), what=f"{name} gradient = k2's")


def test_verl_kl_penalty_bad_names():
    with pytest.raises(NotImplementedError):
        verl_shim.kl_penalty(torch.zeros(1), torch.zeros(1), "full")
    with pytest.raises(ValueError, match="low_var_kl"):
        verl_shim.kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


@pytest.mark.parametrize("mode", verl_shim.AGG_MODES)
def test_verl_agg_loss(mode):
    loss_mat = torch.randn(6, 17, requires_grad=True)
    mask = rand_mask(6, 17)
    mask[4] = False  # a fully masked row: excluded from the seq-mean modes
    got, want = verl_shim.agg_loss(loss_mat, mask, mode), verl_agg_loss(loss_mat, mask, mode)
    close(got, want, what=mode)
    close(torch.autograd.grad(got, loss_mat)[0], torch.autograd.grad(want, loss_mat)[0], what=f"{mode} grad")
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
        verl_shim.agg_loss(loss_mat, mask, "token-avg")


@pytest.mark.parametrize("b,t", [(1, 5), (4, 17), (7, 40)])
def test_verl_gae(backend, b, t):
    rewards, values = torch.randn(b, t), torch.randn(b, t)
    mask = rand_mask(b, t).float()
    mask[0, :2] = 1.0  # verl's whitening needs two valid tokens
    for gamma, lam in ((1.0, 1.0), (0.99, 0.95)):
        adv, ret = verl_shim.compute_gae_advantage_return(rewards, values, mask, torch.tensor(gamma), lam)
        adv_v, ret_v = verl_gae(rewards, values, mask, gamma, lam)
        close(adv, adv_v, atol=2e-5, rtol=2e-5, what="advantages")
        close(ret, ret_v, atol=2e-5, rtol=2e-5, what="returns")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_verl_low_precision_inputs(dtype):
    """bf16/fp16 rewards, values and log-probs: the tensors come back in the input dtype, as verl's,
    and rlkern (fp32 inside, one rounding at the end) is never further from the fp64 value than verl
    run in that dtype, up to one rounding of the output (rtol = 1 ulp) and, for the whitened
    advantages, 1e-2 absolute for the fp32 vs low-precision statistics."""
    b, t = 4, 33
    rewards, values = torch.randn(b, t).to(dtype), torch.randn(b, t).to(dtype)
    mask = rand_mask(b, t).float()
    mask[0, :2] = 1.0
    adv, ret = verl_shim.compute_gae_advantage_return(rewards, values, mask, 1.0, 0.95)
    assert adv.dtype == ret.dtype == dtype
    adv64, ret64 = verl_gae(rewards.double(), values.double(), mask.double(), 1.0, 0.95)
    adv_lo, ret_lo = verl_gae(rewards, values, mask.to(dtype), 1.0, 0.95)
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    assert_close_to_oracle(ret, ret64, ret_lo, atol=0.0, rtol=ulp, what=f"{dtype} returns")
    assert_close_to_oracle(adv, adv64, adv_lo, atol=1e-2, rtol=ulp, what=f"{dtype} advantages")
    logp, old, a, m = _ppo_inputs()
    loss = verl_shim.compute_policy_loss(old.to(dtype), logp.detach().to(dtype), a.to(dtype), m,
                                         cliprange=0.2)[0]
    loss64 = verl_policy_loss(old.double().to(dtype).double(), logp.detach().to(dtype).double(),
                              a.to(dtype).double(), m.double(), 0.2, 0.2)[0]
    close(loss, loss64, atol=1e-5, rtol=1e-5, what=f"{dtype} policy loss vs fp64 on the same rounded inputs")


def test_verl_gae_one_token_raises_like_verl():
    with pytest.raises(ValueError, match="The sum of the mask is one"):
        verl_shim.compute_gae_advantage_return(torch.randn(1, 1), torch.randn(1, 1), torch.ones(1, 1),
                                               1.0, 1.0)


@pytest.mark.parametrize("norm", [True, False])
def test_verl_grpo_and_rloo(norm):
    uids = np.array(["a", "b", "a", "c", "b", "a", "d", "d", "b"], dtype=object)  # "c" is a group of one
    t = 6
    rewards = torch.zeros(len(uids), t)
    rewards[:, -1] = torch.randn(len(uids))
    rewards[:, 2] = torch.randn(len(uids))
    mask = rand_mask(len(uids), t).float()
    adv, ret = verl_shim.compute_grpo_outcome_advantage(rewards, mask, uids, norm_adv_by_std_in_grpo=norm)
    want, _ = verl_grpo(rewards.clone(), mask, uids, norm_adv_by_std_in_grpo=norm)
    close(adv, want, what="grpo")
    assert adv is ret or torch.equal(adv, ret)
    adv, _ = verl_shim.compute_rloo_outcome_advantage(rewards, mask, uids)
    close(adv, verl_rloo(rewards.clone(), mask, uids)[0], what="rloo")


def test_verl_grpo_integer_index_and_bad_index():
    ids = np.array([3, 3, 7, 7, 7])
    rewards, mask = torch.randn(5, 4), torch.ones(5, 4)
    close(verl_shim.compute_grpo_outcome_advantage(rewards, mask, ids)[0],
          verl_grpo(rewards.clone(), mask, ids)[0], what="int uids")
    with pytest.raises(ValueError, match=r"index must hold one group id per response, shape \(5,\)"):
        verl_shim.compute_grpo_outcome_advantage(rewards, mask, ids[:4])


@pytest.mark.parametrize("uids", [
    np.array([7, "a", 7, ("t", 1), "a", 7, ("t", 1), 2.5], dtype=object),  # mixed ints, strings, tuples
    np.array(["b", "a", "b", "a", "c", "c", "a", "b"], dtype=object),
], ids=["mixed", "strings"])
def test_verl_grpo_and_rloo_any_hashable_uid(uids):
    """verl groups by a dict keyed by the uid, so any hashable uid works, even a numpy object array
    mixing ints and strings (which cannot be sorted: the shims used to raise TypeError)."""
    rewards, mask = torch.randn(len(uids), 5), torch.ones(len(uids), 5)
    close(verl_shim.compute_grpo_outcome_advantage(rewards, mask, uids)[0],
          verl_grpo(rewards.clone(), mask, uids)[0], what="grpo mixed uids")
    close(verl_shim.compute_rloo_outcome_advantage(rewards, mask, uids)[0],
          verl_rloo(rewards.clone(), mask, uids)[0], what="rloo mixed uids")
    unhashable = np.empty(2, dtype=object)
    unhashable[0], unhashable[1] = [1], 2
    with pytest.raises(TypeError, match="index must hold hashable uids"):
        verl_shim.compute_grpo_outcome_advantage(rewards[:2], mask[:2], unhashable)


def test_verl_reinforce_plus_plus():
    b, t = 5, 21
    rewards = torch.randn(b, t) * 0.1
    mask = rand_mask(b, t).float()
    for config in ({"gamma": 0.97}, types.SimpleNamespace(gamma=1.0)):
        adv, ret = verl_shim.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config=config)
        gamma = config["gamma"] if isinstance(config, dict) else config.gamma
        adv_v, ret_v = verl_reinforce_pp(rewards, mask, gamma)
        close(ret, ret_v, atol=2e-5, rtol=2e-5, what="returns")
        close(adv, adv_v, atol=2e-5, rtol=2e-5, what="advantages")
    with pytest.raises(ValueError, match="config.gamma"):
        verl_shim.compute_reinforce_plus_plus_outcome_advantage(rewards, mask)


def _ppo_inputs(b=6, t=23):
    logp = (-torch.rand(b, t) * 4).requires_grad_()
    old = logp.detach() + 0.4 * torch.randn(b, t)
    # the ±20 log-ratio clamp and the dual clip engaged
    old[0, :3] = logp.detach()[0, :3] + torch.tensor([30.0, -30.0, 3.0])
    adv = torch.randn(b, t)
    adv[0, 2] = -2.0
    mask = rand_mask(b, t).float()
    mask[-1] = 0.0  # a fully masked row (excluded from the seq-mean aggregations)
    return logp, old, adv, mask


@pytest.mark.parametrize("mode", verl_shim.AGG_MODES)
def test_verl_compute_policy_loss(backend, mode):
    logp, old, adv, mask = _ppo_inputs()
    got = verl_shim.compute_policy_loss(old, logp, adv, mask, cliprange=0.2, cliprange_high=0.28,
                                        loss_agg_mode=mode)
    want = verl_policy_loss(old, logp, adv, mask, 0.2, 0.28, 3.0, mode)
    for name, g, w in zip(("pg_loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"), got, want):
        close(g, w, what=name)
    close(torch.autograd.grad(got[0], logp)[0], torch.autograd.grad(want[0], logp)[0], what="d logp")


def test_verl_policy_loss_vanilla_reads_config():
    logp, old, adv, mask = _ppo_inputs()
    config = {"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": 0.3, "clip_ratio_c": 2.5}
    got, metrics = verl_shim.compute_policy_loss_vanilla(old, logp, adv, mask, "seq-mean-token-mean", config)
    want = verl_policy_loss(old, logp, adv, mask, 0.2, 0.3, 2.5, "seq-mean-token-mean")
    close(got, want[0])
    # verl 0.9.1 returns (pg_loss, pg_metrics) with the statistics as Python floats.
    for name, w in zip(("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"), want[1:]):
        close(torch.tensor(metrics[name]), w, what=name)
    with pytest.raises(ValueError, match="config is required"):
        verl_shim.compute_policy_loss_vanilla(old, logp, adv, mask)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
def test_verl_value_loss(backend, mode):
    b, t = 5, 13
    vpreds = torch.randn(b, t, requires_grad=True)
    values = vpreds.detach() + 0.3 * torch.randn(b, t)
    returns = torch.randn(b, t)
    mask = rand_mask(b, t).float()
    got = verl_shim.compute_value_loss(vpreds, returns, values, mask, 0.2, mode)
    want = verl_value_loss(vpreds, returns, values, mask, 0.2, mode)
    close(got[0], want[0], what="vf_loss")
    close(got[1], want[1], what="vf_clipfrac")
    close(torch.autograd.grad(got[0], vpreds)[0], torch.autograd.grad(want[0], vpreds)[0], what="d vpreds")


# ---------------------------------------------------------------------------------------------
# OpenRLHF
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_openrlhf_compute_approx_kl(estimator):
    logp = torch.randn(4, 15) * 3
    base = torch.randn(4, 15) * 3
    logp[0, :4] = base[0, :4] + torch.tensor([-12.0, 12.0, 5.0, -30.0])  # the [-10, 10] clamp engaged
    logp.requires_grad_()
    got = orl_shim.compute_approx_kl(logp, base, estimator)
    want = orl_compute_approx_kl(logp, base, estimator)
    close(got, want, what=estimator)
    close(torch.autograd.grad(got.sum(), logp)[0], torch.autograd.grad(want.sum(), logp)[0], what="gradient")


def orl_compute_approx_kl_011(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1",
                              unbiased_gradient=False):
    """openrlhf 0.11.2 models/utils.py::compute_approx_kl, the unbiased_gradient branch (the value is
    the legacy estimator's, transcribed above)."""
    value = orl_compute_approx_kl(log_probs, log_probs_base, kl_estimator)
    if not unbiased_gradient:
        return value
    log_ratio = log_probs.float() - log_probs_base.float()
    w = 1.0 if log_probs_old is None else \
        (log_probs.float() - log_probs_old.float()).exp().clamp(max=10.0).detach()
    grad_surrogate = w * (log_ratio**2 / 2.0)
    return value.detach() + grad_surrogate - grad_surrogate.detach()


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("with_old", [False, True])
def test_openrlhf_compute_approx_kl_unbiased_gradient(estimator, with_old):
    """The call OpenRLHF 0.11's ppo_actor makes (keywords log_probs_old= and unbiased_gradient=): the
    shim used to have the pre-0.11 signature and would have raised TypeError there."""
    logp = (torch.randn(3, 11) * 2).requires_grad_()
    base = torch.randn(3, 11) * 2
    old = logp.detach() + 0.5 * torch.randn(3, 11)
    old[0, 0] = logp[0, 0].detach() - 4.0  # w = e^4 > 10: the weight clamp engaged
    kw = dict(log_probs_old=old if with_old else None, kl_estimator=estimator, unbiased_gradient=True)
    got = orl_shim.compute_approx_kl(logp, base, **kw)
    want = orl_compute_approx_kl_011(logp, base, **kw)
    close(got, want, what=f"{estimator} value")
    close(torch.autograd.grad(got.sum(), logp)[0], torch.autograd.grad(want.sum(), logp)[0], what="gradient")


def test_openrlhf_k3_gradient_finite_where_openrlhf_overflows():
    """OpenRLHF PR #1335: exp(base - logp) overflows to inf and the clamp's zero gradient becomes NaN."""
    logp = torch.tensor([[-120.0, -3.0]], requires_grad=True)
    base = torch.tensor([[-1.0, -3.5]])
    want = orl_compute_approx_kl(logp, base, "k3")
    assert torch.autograd.grad(want.sum(), logp)[0].isnan().any()  # the peer's bug, reproduced
    got = orl_shim.compute_approx_kl(logp, base, "k3")
    close(got, want, what="value")
    g = torch.autograd.grad(got.sum(), logp)[0]
    assert torch.isfinite(g).all() and g[0, 0] == 0.0


def test_openrlhf_compute_reward(backend):
    b, t = 5, 12
    kl = torch.randn(b, t) * 0.1
    mask = torch.arange(t)[None] < torch.randint(1, t + 1, (b, 1))
    mask[3] = False  # OpenRLHF puts an empty row's score on its last position
    r = torch.randn(b) * 3
    for kl_coef, clip in ((0.05, None), (-1.0, (-1.0, 1.0))):
        got = orl_shim.compute_reward(r, kl_coef, kl, action_mask=mask, reward_clip_range=clip)
        close(got, orl_compute_reward(r, kl_coef, kl, mask, clip), what=f"kl_coef={kl_coef}")
    with pytest.raises(TypeError, match="packed list form"):
        orl_shim.compute_reward(r, 0.1, [kl], action_mask=mask)
    with pytest.raises(ValueError, match="action_mask is required"):
        orl_shim.compute_reward(r, 0.1, kl)


def test_openrlhf_log_probs_from_logits_divides_in_place_like_openrlhf(backend):
    logits = torch.randn(2, 6, 45) * 2
    labels = torch.randint(0, 45, (2, 6))
    mine, theirs = logits.clone(), logits.clone()
    got = orl_shim.log_probs_from_logits(mine, labels, temperature=0.5)
    theirs.div_(0.5)  # openrlhf/models/utils.py::log_probs_from_logits: logits.div_(temperature)
    want = torch.log_softmax(theirs, -1).gather(-1, labels[..., None]).squeeze(-1)
    close(got, want, what="log-probs")
    assert torch.equal(mine, theirs), "the caller's logits are scaled in place, as OpenRLHF does"
    ent_ref = torch.logsumexp(theirs, -1) - (torch.softmax(theirs, -1) * theirs).sum(-1)
    close(orl_shim.compute_entropy(theirs), ent_ref, what="entropy")


@pytest.mark.parametrize("dim", [None, -1])
def test_openrlhf_masked_mean(dim):
    x, mask = torch.randn(4, 9), rand_mask(4, 9).float()
    close(orl_shim.masked_mean(x, mask, dim), orl_masked_mean(x, mask, dim))
    close(orl_shim.masked_mean(x, None, dim), x.mean(dim=dim))


@pytest.mark.parametrize("dual_clip,token_level", [(None, True), (3.0, True), (2.0, False)])
def test_openrlhf_policy_loss(backend, dual_clip, token_level):
    logp, old, adv, mask = _ppo_inputs()
    old[0, :2] = logp.detach()[0, :2] + torch.tensor([5.0, -5.0])  # stay inside rlkern's ±20 ratio clamp
    module = orl_shim.PolicyLoss(0.2, 0.28, dual_clip=dual_clip, token_level_loss=token_level)
    got = module(logp, old, adv, action_mask=mask)
    want = orl_policy_loss(logp, old, adv, mask, 0.2, 0.28, dual_clip, token_level)
    for name, g, w in zip(("loss", "clip_ratio", "ppo_kl"), got, want):
        close(g, w, what=name)
    close(torch.autograd.grad(got[0], logp)[0], torch.autograd.grad(want[0], logp)[0], what="d log_probs")
    with pytest.raises(ValueError, match="dual_clip must be > 1.0"):
        orl_shim.PolicyLoss(dual_clip=1.0)
    with pytest.raises(ValueError, match=r"policy_loss_type must be one of \('ppo', 'gspo'\)"):
        orl_shim.PolicyLoss(policy_loss_type="grpo")


@pytest.mark.parametrize("clip_eps,token_level", [(None, True), (0.2, True), (0.2, False)])
def test_openrlhf_value_loss(clip_eps, token_level):
    b, t = 4, 11
    values = torch.randn(b, t, requires_grad=True)
    old = values.detach() + 0.3 * torch.randn(b, t)
    returns = torch.randn(b, t)
    mask = rand_mask(b, t).float()
    mask[1] = 0.0
    got = orl_shim.ValueLoss(clip_eps, token_level)(values, old, returns, action_mask=mask)
    want = orl_value_loss(values, old, returns, mask, clip_eps, token_level)
    close(got, want, what="value loss")
    close(torch.autograd.grad(got, values)[0], torch.autograd.grad(want, values)[0], what="d values")


@pytest.mark.parametrize("b,t", [(1, 1), (3, 17), (6, 40)])
def test_openrlhf_gae_and_returns(backend, b, t):
    values, rewards = torch.randn(b, t), torch.randn(b, t)
    mask = rand_mask(b, t)
    for gamma, lambd in ((1.0, 1.0), (0.99, 0.95)):
        adv, ret = orl_shim.get_advantages_and_returns(values, rewards, mask, gamma, lambd)
        adv_o, ret_o = orl_gae(values, rewards, mask, gamma, lambd)
        close(adv, adv_o, atol=2e-5, rtol=2e-5, what="advantages")
        close(ret, ret_o, atol=2e-5, rtol=2e-5, what="returns")
        close(orl_shim.get_cumulative_returns(rewards, mask, gamma),
              orl_cumulative_returns(rewards, mask, gamma),
              atol=2e-5, rtol=2e-5, what="cumulative returns")


@pytest.mark.parametrize("estimator", orl_shim.GROUP_ESTIMATORS)
def test_openrlhf_group_reward_shaping(estimator):
    rewards = torch.randn(4 * 5)
    close(orl_shim.shape_group_rewards(rewards, 4, estimator), orl_shape_group_rewards(rewards, 4, estimator),
          what=estimator)
    with pytest.raises(ValueError, match="group_norm"):
        orl_shim.shape_group_rewards(rewards, 4, "grpo")


# ---------------------------------------------------------------------------------------------
# patch / unpatch
# ---------------------------------------------------------------------------------------------

def test_patch_rejects_unknown_peer():
    with pytest.raises(ValueError, match=r"name must be one of \('verl', 'trl', 'openrlhf'\)"):
        compat.patch("deepspeed-chat")


@pytest.mark.parametrize("peer", ["verl", "openrlhf"])
def test_patch_missing_peer_raises_import_error_naming_it(monkeypatch, peer):
    for name in [m for m in sys.modules if m == peer or m.startswith(peer + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, peer, None)  # makes `import peer` fail, installed or not
    with pytest.raises(ImportError, match=f"needs the package '{peer}', which is not installed"):
        compat.patch(peer)
    assert not compat.is_patched(peer)


def test_patch_trl_and_unpatch_restores_exactly(monkeypatch):
    originals = {n: getattr(trl_utils, n) for n in
                 ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")}
    # A module of the peer that copied a function with `from trl.trainer.utils import ...`.
    consumer = types.ModuleType("trl._rlkern_test_consumer")
    consumer.selective_log_softmax = originals["selective_log_softmax"]
    monkeypatch.setitem(sys.modules, consumer.__name__, consumer)
    logits, index = torch.randn(2, 3, 29), torch.randint(0, 29, (2, 3))
    expected = trl_real.selective_log_softmax_and_entropy(logits, index)
    try:
        patched = compat.patch("trl")
        assert compat.patch("trl") == patched  # idempotent
        assert "trl.trainer.utils.selective_log_softmax" in patched
        assert "trl._rlkern_test_consumer.selective_log_softmax" in patched
        for name in originals:
            assert getattr(trl_utils, name) is getattr(trl_shim, name)
        assert consumer.selective_log_softmax is trl_shim.selective_log_softmax
        # TRL's own callers now run on rlkern and give TRL's answer.
        got = trl_utils.selective_log_softmax_and_entropy(logits, index)
        close(got[0], expected[0])
        close(got[1], expected[1])
    finally:
        compat.unpatch("trl")
    for name, fn in originals.items():
        assert getattr(trl_utils, name) is fn
    assert consumer.selective_log_softmax is originals["selective_log_softmax"]
    assert not compat.is_patched("trl")
    assert compat.unpatch("trl") == []


def test_unpatch_restores_trl_modules_imported_while_patched(monkeypatch):
    """A TRL module imported during the patch copies the shim with `from trl.trainer.utils import
    ...` (TRL's CPO/ORPO/TPO trainers do); unpatch gives it TRL's function back too."""
    original = trl_utils.selective_log_softmax
    original_head = trl_utils._ChunkedLogProbFunction
    for mod in [m for m in sys.modules if m.startswith("trl.experimental.orpo")]:
        monkeypatch.delitem(sys.modules, mod)
    try:
        compat.patch("trl")
        import importlib

        orpo = importlib.import_module("trl.experimental.orpo.orpo_trainer")
        assert orpo.selective_log_softmax is trl_shim.selective_log_softmax
        late = types.ModuleType("trl._rlkern_test_late")  # a late `from ... import` of the fused head
        late.ChunkedLogProbFunction = trl_utils._ChunkedLogProbFunction
        monkeypatch.setitem(sys.modules, late.__name__, late)
        assert late.ChunkedLogProbFunction is not original_head
    finally:
        restored = compat.unpatch("trl")
    assert orpo.selective_log_softmax is original
    assert late.ChunkedLogProbFunction is original_head
    assert "trl.experimental.orpo.orpo_trainer.selective_log_softmax" in restored
    assert trl_utils._ChunkedLogProbFunction is original_head


def test_patch_returns_what_it_replaced_and_strict(monkeypatch):
    """patch() lists exactly the attributes it replaced (each now holds a replacement, and unpatch
    lists the same); strict=True raises when the installed release has none of the targets."""
    try:
        names = compat.patch("trl")
        assert len(names) == len(set(names))
        for name in names:
            module_path, _, attr = name.rpartition(".")
            owner = sys.modules.get(module_path)
            if owner is None:  # Class.method
                module_path, _, cls = module_path.rpartition(".")
                owner = getattr(sys.modules[module_path], cls)
            assert getattr(owner, attr) is not None
        assert "trl.trainer.utils._ChunkedLogProbFunction" in names
        assert "trl.trainer.grpo_trainer.GRPOTrainer._compute_loss" in names
    finally:
        assert compat.unpatch("trl") == names
    monkeypatch.setattr(trl_shim, "PATCH_TARGETS", (("trl.trainer.utils", "no_such_function", "grpo_loss"),))
    assert compat.patch("trl") == []  # lenient: nothing to replace in this release
    compat.unpatch("trl")
    with pytest.raises(RuntimeError, match=r"strict=True\): the installed trl .* has none of the targets"):
        compat.patch("trl", strict=True)
    assert not compat.is_patched("trl")


def _install_fake_verl(monkeypatch):
    """A verl module tree at verl's real paths, holding the transcribed originals and registries."""
    names = ("verl", "verl.utils", "verl.utils.torch_functional", "verl.trainer", "verl.trainer.ppo",
             "verl.trainer.ppo.core_algos")
    mods = {n: types.ModuleType(n) for n in names}
    tf, core = mods["verl.utils.torch_functional"], mods["verl.trainer.ppo.core_algos"]
    tf.masked_mean, tf.masked_var, tf.masked_whiten = verl_masked_mean, verl_masked_var, verl_masked_whiten
    core.kl_penalty, core.agg_loss = verl_kl_penalty, verl_agg_loss
    core.compute_gae_advantage_return = verl_gae
    core.compute_grpo_outcome_advantage = verl_grpo
    core.ADV_ESTIMATOR_REGISTRY = {"gae": verl_gae, "grpo": verl_grpo, "custom": len}
    core.POLICY_LOSS_REGISTRY = {}
    # an older release: no compute_rloo_outcome_advantage, compute_value_loss, ... -> skipped
    for name, module in mods.items():
        monkeypatch.setitem(sys.modules, name, module)
    mods["verl"].utils, mods["verl"].trainer = mods["verl.utils"], mods["verl.trainer"]
    mods["verl.utils"].torch_functional = tf
    mods["verl.trainer"].ppo, mods["verl.trainer.ppo"].core_algos = mods["verl.trainer.ppo"], core
    user = types.ModuleType("verl.workers.actor")  # `from verl.utils.torch_functional import masked_mean`
    user.masked_mean = verl_masked_mean
    monkeypatch.setitem(sys.modules, user.__name__, user)
    return tf, core, user


def test_patch_verl_on_fake_tree(monkeypatch):
    tf, core, user = _install_fake_verl(monkeypatch)
    registry_before = dict(core.ADV_ESTIMATOR_REGISTRY)
    try:
        patched = compat.patch("verl")
        assert "verl.trainer.ppo.core_algos.compute_gae_advantage_return" in patched
        assert not hasattr(core, "compute_value_loss")  # absent in this release: skipped, not added
        assert tf.masked_whiten is verl_shim.masked_whiten and user.masked_mean is verl_shim.masked_mean
        assert core.ADV_ESTIMATOR_REGISTRY["gae"] is verl_shim.compute_gae_advantage_return
        assert core.ADV_ESTIMATOR_REGISTRY["grpo"] is verl_shim.compute_grpo_outcome_advantage
        assert core.ADV_ESTIMATOR_REGISTRY["custom"] is len
        rewards, values, mask = torch.randn(3, 8), torch.randn(3, 8), torch.ones(3, 8)
        adv, _ = core.ADV_ESTIMATOR_REGISTRY["gae"](rewards, values, mask, 1.0, 0.95)
        close(adv, verl_gae(rewards, values, mask, 1.0, 0.95)[0])
    finally:
        compat.unpatch("verl")
    assert tf.masked_whiten is verl_masked_whiten and user.masked_mean is verl_masked_mean
    assert core.compute_gae_advantage_return is verl_gae and core.kl_penalty is verl_kl_penalty
    assert core.ADV_ESTIMATOR_REGISTRY == registry_before
    assert all(core.ADV_ESTIMATOR_REGISTRY[k] is v for k, v in registry_before.items())


def verl_linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none",
                              dist_process_group=None):
    """verl/utils/kernel/kernels.py::efficient_entropy_forward in plain torch (verl's kernel is Triton
    on CUDA only, and verl does not install here: see README): log-probs z_y/T - lse(z/T), reduced
    per ``reduction``; entropy per token; both fp32 and flattened."""
    z = (hidden.reshape(-1, hidden.shape[-1]).float() @ weight.float().t()) * (1.0 / temperature)
    lse = torch.logsumexp(z, -1)
    logp = z.gather(-1, labels.reshape(-1, 1))[:, 0] - lse
    ent = lse - (torch.softmax(z, -1) * z).sum(-1)
    return (logp if reduction == "none" else logp.sum() if reduction == "sum" else logp.mean()), ent


def verl_entropy_from_logits_with_chunking(logits, chunk_size=2048):  # verl/utils/torch_functional.py
    entropy = torch.zeros(logits.shape[0], device=logits.device)
    for i in range(0, logits.shape[0], chunk_size):
        chunk = logits[i:i + chunk_size].float()
        pd = torch.softmax(chunk, dim=-1)
        entropy[i:i + chunk_size] = torch.logsumexp(chunk, dim=-1) - torch.sum(pd * chunk, dim=-1)
    return entropy


def verl_logprobs_from_logits_v2(logits, labels):  # verl/utils/torch_functional.py (fp32 branch)
    logits_labels = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    return logits_labels - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])


def test_patch_verl_reaches_the_actor_logprob_path(monkeypatch):
    """The actor's log-prob / entropy functions and the fused head used with use_fused_kernels
    (dense_common.py imports linear_cross_entropy inside its forward, at call time)."""
    tf, _, _ = _install_fake_verl(monkeypatch)
    tf.logprobs_from_logits_v2 = verl_logprobs_from_logits_v2
    tf.entropy_from_logits_with_chunking = verl_entropy_from_logits_with_chunking
    kernel_pkg = types.ModuleType("verl.utils.kernel")
    lce = types.ModuleType("verl.utils.kernel.linear_cross_entropy")
    lce.linear_cross_entropy = verl_linear_cross_entropy
    kernel_pkg.linear_cross_entropy = lce
    monkeypatch.setitem(sys.modules, kernel_pkg.__name__, kernel_pkg)
    monkeypatch.setitem(sys.modules, lce.__name__, lce)
    hidden, weight = torch.randn(2, 5, 16), torch.randn(37, 16) * 0.3
    labels = torch.randint(0, 37, (2, 5))
    logits = torch.randn(7, 37)
    try:
        patched = compat.patch("verl")
        for name in ("verl.utils.kernel.linear_cross_entropy.linear_cross_entropy",
                     "verl.utils.torch_functional.entropy_from_logits_with_chunking",
                     "verl.utils.torch_functional.logprobs_from_logits_v2"):
            assert name in patched
        from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy  # as dense_common.py does

        assert linear_cross_entropy is verl_shim.linear_cross_entropy
        for reduction in ("none", "sum", "mean"):
            h = hidden.clone().requires_grad_()
            w = weight.clone().requires_grad_()
            got = linear_cross_entropy(h, w, labels, 0.7, reduction)
            h2 = hidden.clone().requires_grad_()
            w2 = weight.clone().requires_grad_()
            want = verl_linear_cross_entropy(h2, w2, labels, 0.7, reduction)
            close(got[0], want[0], what=f"logprobs {reduction}")
            close(got[1], want[1], what=f"entropy {reduction}")
            (got[0].sum() + got[1].sum()).backward()
            (want[0].sum() + want[1].sum()).backward()
            close(h.grad, h2.grad, what="d hidden")
            close(w.grad, w2.grad, what="d weight")
        with pytest.raises(ValueError, match="Invalid reduction: max"):
            linear_cross_entropy(hidden, weight, labels, 1.0, "max")
        close(tf.entropy_from_logits_with_chunking(logits, 3),
              verl_entropy_from_logits_with_chunking(logits, 3))
        labels1 = torch.randint(0, 37, (7,))
        close(tf.logprobs_from_logits_v2(logits, labels1), verl_logprobs_from_logits_v2(logits, labels1))
    finally:
        compat.unpatch("verl")
    assert lce.linear_cross_entropy is verl_linear_cross_entropy
    assert tf.entropy_from_logits_with_chunking is verl_entropy_from_logits_with_chunking


def test_patch_openrlhf_on_fake_tree(monkeypatch):
    names = ("openrlhf", "openrlhf.models", "openrlhf.models.utils", "openrlhf.models.loss",
             "openrlhf.trainer",
             "openrlhf.trainer.ppo_utils", "openrlhf.trainer.ppo_utils.experience_maker")
    mods = {n: types.ModuleType(n) for n in names}
    for name, module in mods.items():
        monkeypatch.setitem(sys.modules, name, module)
    utils, loss, maker = (mods[n] for n in (names[2], names[3], names[6]))
    utils.compute_approx_kl, utils.masked_mean = orl_compute_approx_kl, orl_masked_mean

    class PolicyLoss(torch.nn.Module):
        pass

    def get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd):
        return orl_gae(values, rewards, action_mask, gamma, lambd)

    class RemoteExperienceMaker:
        pass

    RemoteExperienceMaker.get_advantages_and_returns = get_advantages_and_returns
    loss.PolicyLoss = PolicyLoss
    mods["openrlhf.models"].PolicyLoss = PolicyLoss  # openrlhf/models/__init__.py re-exports it
    maker.RemoteExperienceMaker = RemoteExperienceMaker
    maker.compute_approx_kl = orl_compute_approx_kl
    try:
        patched = compat.patch("openrlhf")
        # a subclass of the installed class, one object for both names
        assert issubclass(loss.PolicyLoss, PolicyLoss) and loss.PolicyLoss is not PolicyLoss
        assert mods["openrlhf.models"].PolicyLoss is loss.PolicyLoss
        assert maker.compute_approx_kl is orl_shim.compute_approx_kl
        assert "openrlhf.trainer.ppo_utils.experience_maker.compute_approx_kl" in patched
        values, rewards, mask = torch.randn(2, 6), torch.randn(2, 6), rand_mask(2, 6)
        adv, ret = RemoteExperienceMaker().get_advantages_and_returns(values, rewards, mask, 0.9, 0.8)
        close(adv, orl_gae(values, rewards, mask, 0.9, 0.8)[0], atol=2e-5, rtol=2e-5)
    finally:
        compat.unpatch("openrlhf")
    assert RemoteExperienceMaker.__dict__["get_advantages_and_returns"] is get_advantages_and_returns
    assert loss.PolicyLoss is PolicyLoss and mods["openrlhf.models"].PolicyLoss is PolicyLoss
    assert utils.compute_approx_kl is orl_compute_approx_kl
    assert maker.compute_approx_kl is orl_compute_approx_kl
    assert not hasattr(utils, "compute_reward")


def _install_fake_openrlhf_loss(monkeypatch, cls):
    """A fake openrlhf.models.loss holding ``cls`` as PolicyLoss (tests/test_compat_openrlhf_variants.py
    patches transcriptions of three releases' PolicyLoss in it)."""
    names = ("openrlhf", "openrlhf.models", "openrlhf.models.loss")
    mods = {n: types.ModuleType(n) for n in names}
    for name, module in mods.items():
        monkeypatch.setitem(sys.modules, name, module)
    mods["openrlhf.models.loss"].PolicyLoss = cls
    return mods["openrlhf.models.loss"]


@pytest.mark.parametrize("clip_eps,token_level,call", [
    (0.2, True, dict(batch_num_tokens=41.0, dp_size=2)),
    (None, False, dict(global_batch_size=7.0, dp_size=4)),
    (0.2, False, dict()),
])
def test_openrlhf_011_value_loss_global_normalisers(clip_eps, token_level, call):
    """openrlhf 0.11.2 ValueLoss.forward(..., dp_size, batch_num_tokens, global_batch_size), transcribed."""
    b, t = 4, 9
    values = torch.randn(b, t).requires_grad_()
    old, returns, m = values.detach() + 0.3 * torch.randn(b, t), torch.randn(b, t), rand_mask(b, t).float()
    if clip_eps is not None:
        clipped = old + (values - old).clamp(-clip_eps, clip_eps)
        per_token = torch.max((clipped - returns) ** 2, (values - returns) ** 2)
    else:
        per_token = (values - returns) ** 2
    if token_level:
        want = (per_token * m).sum() / call["batch_num_tokens"] * call["dp_size"] if call else \
            orl_masked_mean(per_token, m)
    else:
        counts = m.sum(-1)
        seq_loss, seq_mask = (per_token * m).sum(-1) / (counts + 1e-8), (counts > 0).float()
        want = (seq_loss * seq_mask).sum() / call["global_batch_size"] * call["dp_size"] if call else \
            orl_masked_mean(seq_loss, seq_mask)
    want = 0.5 * want
    got = orl_shim.ValueLoss(clip_eps, token_level)(values, old, returns, m, **call)
    close(got, want, what="value loss")
    close(torch.autograd.grad(got, values)[0], torch.autograd.grad(want, values)[0], what="d values")


def test_patch_is_undone_when_a_target_fails(monkeypatch):
    """A failure half-way through patch() leaves the peer exactly as it was."""
    tf, core, _ = _install_fake_verl(monkeypatch)

    class Frozen(dict):
        def __setitem__(self, key, value):
            raise RuntimeError("read-only registry")

    core.ADV_ESTIMATOR_REGISTRY = Frozen(gae=verl_gae)
    with pytest.raises(RuntimeError, match="read-only registry"):
        compat.patch("verl")
    assert not compat.is_patched("verl")
    assert tf.masked_mean is verl_masked_mean and core.compute_gae_advantage_return is verl_gae


def test_shims_compile_fullgraph():
    """One torch.compile(fullgraph=True) through a compat shim: the verl policy loss, whose op is a
    registered custom op, traces without graph breaks."""
    logp, old, adv, mask = _ppo_inputs(3, 9)

    def fn(lp, o, a, m):
        return verl_shim.compute_policy_loss(o, lp, a, m, cliprange=0.2)[0]

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    close(compiled(logp, old, adv, mask), fn(logp, old, adv, mask), what="compiled loss")
