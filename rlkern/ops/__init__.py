"""rlkern's public ops: validated, dispatched to the C++ / Triton / reference backend, differentiable."""

from rlkern.ops.linear_logprobs import linear_logprobs, linear_policy_loss
from rlkern.ops.logprobs import entropy, logprobs, logprobs_and_entropy
from rlkern.ops.losses import grpo_loss, policy_loss, value_loss
from rlkern.ops.advantages import group_advantages
from rlkern.ops.dpo import dpo_loss
from rlkern.ops.kl_control import AdaptiveKLController, FixedKLController, PenaltyKLController

__all__ = ["logprobs", "entropy", "logprobs_and_entropy", "linear_logprobs", "linear_policy_loss", "policy_loss", "value_loss", "grpo_loss", "group_advantages", "dpo_loss", "FixedKLController", "AdaptiveKLController", "PenaltyKLController"]
