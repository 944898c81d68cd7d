"""rlkern's public ops: validated, dispatched to the C++ / Triton / reference backend, differentiable."""

from rlkern.ops.advantages import group_advantages
from rlkern.ops.dpo import dpo_loss
from rlkern.ops.kl_control import AdaptiveKLController, FixedKLController, PenaltyKLController
from rlkern.ops.kl_penalty import kl, token_rewards
from rlkern.ops.lm_head import linear_logprobs, linear_policy_loss
from rlkern.ops.logits import entropy, logprobs, logprobs_and_entropy
from rlkern.ops.losses import grpo_loss, policy_loss, value_loss
from rlkern.ops.masked import masked_mean, masked_sum, masked_var, masked_whiten
from rlkern.ops.returns import discounted_returns, gae
from rlkern.ops.rollout_correction import off_policy_sequence_mask, rollout_correction, trust_region_gate
from rlkern.ops.token_selection import (
    clip_cov_mask,
    high_entropy_mask,
    kl_cov_mask,
    kl_cov_rows,
    token_covariance,
)
from rlkern.ops.verl_advantages import optimal_token_baseline, outcome_advantages

__all__ = [
    # log-probs and entropy, from logits or from hidden states and the LM head
    "logprobs", "entropy", "logprobs_and_entropy", "linear_logprobs", "linear_policy_loss",
    # token-level RL maths
    "kl", "token_rewards", "gae", "discounted_returns",
    "masked_sum", "masked_mean", "masked_var", "masked_whiten",
    # losses and advantages
    "policy_loss", "value_loss", "grpo_loss", "group_advantages", "dpo_loss",
    "outcome_advantages", "optimal_token_baseline",
    # rollout/training mismatch correction (TIS, IcePop, MIS, Geo-RS, off-policy sequence mask)
    "rollout_correction", "off_policy_sequence_mask", "trust_region_gate",
    # token selection without host syncs (KL-Cov, Clip-Cov, TRL top-entropy quantile)
    "kl_cov_mask", "kl_cov_rows", "clip_cov_mask", "high_entropy_mask", "token_covariance",
    # KL coefficient controllers
    "FixedKLController", "AdaptiveKLController", "PenaltyKLController",
]
