"""Every rlkern op in plain PyTorch, written for clarity rather than speed.

This module is the oracle: tests run it in float64 and compare every kernel against it, and
benchmarks use it as the eager baseline. Inputs in bf16/fp16 are upcast to fp32; float64 inputs
stay float64. Each function documents only what differs from its public twin in ``rlkern.ops``.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEG_INF = float("-inf")


def _upcast(x: Tensor) -> Tensor:
    return x.double() if x.dtype == torch.float64 else x.float()


# ---------------------------------------------------------------------------------------------
# logprobs family: log-softmax at labels and entropy
# ---------------------------------------------------------------------------------------------


def _scaled_logits(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """z = logits / temperature, with rows whose every logit is -inf ("dead") zeroed out so that
    softmax stays finite; the caller overwrites their results. Returns (z, banned, dead)."""
    z = _upcast(logits) / temperature
    banned = z == NEG_INF
    dead = banned.all(dim=-1, keepdim=True)
    return z.masked_fill(dead, 0.0), banned, dead.squeeze(-1)


def logprobs(logits: Tensor, labels: Tensor, *, temperature: float = 1.0, ignore_index: int = -100) -> Tensor:
    """log_softmax(logits / temperature)[..., label]; 0 where label == ignore_index, -inf where the
    label's logit is -inf (and for every label of a row whose logits are all -inf)."""
    z, _, dead = _scaled_logits(logits, temperature)
    valid = labels != ignore_index
    picked = torch.log_softmax(z, dim=-1).gather(-1, torch.where(valid, labels, 0).long().unsqueeze(-1))
    picked = picked.squeeze(-1).masked_fill(dead, NEG_INF)
    return torch.where(valid, picked, torch.zeros_like(picked))


def entropy(logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """-sum p log p of softmax(logits / temperature) in nats; -inf logits contribute 0 (p = 0);
    a row whose logits are all -inf has entropy 0."""
    z, banned, dead = _scaled_logits(logits, temperature)
    log_p = torch.log_softmax(z, dim=-1)
    h = -(log_p.exp() * log_p.masked_fill(banned, 0.0)).sum(dim=-1)
    return h.masked_fill(dead, 0.0)


def logprobs_and_entropy(
    logits: Tensor, labels: Tensor, *, temperature: float = 1.0, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    return (
        logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index),
        entropy(logits, temperature=temperature),
    )


# ---------------------------------------------------------------------------------------------
# kl family: token KL estimators and reward shaping (kl, token_rewards)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# gae family: reverse scans (gae, discounted_returns)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# masked family: masked_sum, masked_mean, masked_var, masked_whiten
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# losses family: policy_loss, value_loss, grpo_loss
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# advantages family: group_advantages; dpo family: dpo_loss
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# linear_logprobs family: log-probs and entropy from hidden states and the LM head
# ---------------------------------------------------------------------------------------------


def _lm_head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """hidden @ weight.T (+ bias) in the reference precision, materialising the full logits."""
    logits = _upcast(hidden) @ _upcast(weight).T
    return logits if bias is None else logits + _upcast(bias)


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """logprobs(hidden @ weight.T + bias, labels) (and the entropy): the fused op's definition,
    computed the naive way with the [..., V] logits in memory."""
    logits = _lm_head_logits(hidden, weight, bias)
    logp = logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index)
    return (logp, entropy(logits, temperature=temperature)) if return_entropy else logp
