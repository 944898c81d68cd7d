"""rlkern's public ops: validated, dispatched to the C++ / Triton / reference backend, differentiable."""

from rlkern.ops.linear_logprobs import linear_logprobs, linear_policy_loss
from rlkern.ops.logprobs import entropy, logprobs, logprobs_and_entropy
from rlkern.ops.advantages import group_advantages
from rlkern.ops.dpo import dpo_loss
from rlkern.ops.kl_control import AdaptiveKLController, FixedKLController, PenaltyKLController
from rlkern.ops.losses import grpo_loss, policy_loss, value_loss
from rlkern.ops.gae import discounted_returns, gae
from rlkern.ops.kl import kl, token_rewards
from rlkern.ops.masked import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = ["logprobs", "entropy", "logprobs_and_entropy", "policy_loss", "value_loss", "grpo_loss", "group_advantages", "dpo_loss", "FixedKLController", "AdaptiveKLController",
           "PenaltyKLController", "kl", "token_rewards", "gae", "discounted_returns", "masked_sum", "masked_mean",
           "masked_var", "masked_whiten", "linear_logprobs", "linear_policy_loss"]
