"""rlkern's public ops: validated, dispatched to the C++ / Triton / reference backend, differentiable."""

from rlkern.ops.linear_logprobs import linear_logprobs, linear_policy_loss
from rlkern.ops.logprobs import entropy, logprobs, logprobs_and_entropy
from rlkern.ops.losses import grpo_loss, policy_loss, value_loss

__all__ = ["logprobs", "entropy", "logprobs_and_entropy", "linear_logprobs", "linear_policy_loss", "policy_loss", "value_loss", "grpo_loss"]
