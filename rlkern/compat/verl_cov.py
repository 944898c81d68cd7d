"""verl 0.9.1's Clip-Cov and KL-Cov policy losses (``POLICY_LOSS_REGISTRY`` entries ``clip_cov`` and
``kl_cov``, from the Entropy-Mechanism-of-RL paper) on rlkern's sync-free token selection
(rlkern.ops.clip_cov_mask, rlkern.ops.kl_cov_mask). Same signature, return and config reading as the
other shims of rlkern/compat/verl_policy.py (whose helpers these use); rlkern.compat.verl adds
:data:`PATCH_TARGETS` to its own. The documented differences from verl are in verl_policy's docstring.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern import ops
from rlkern.compat.verl_policy import (
    _CORE,
    _agg,
    _clip_range,
    _field,
    _fused,
    _mean,
    _metrics,
    _need,
    _policy_config,
    _weighted,
)

__all__ = ["compute_policy_loss_clip_cov", "compute_policy_loss_kl_cov"]
PATCH_TARGETS = tuple((_CORE, name, name) for name in __all__)

# verl's defaults (core_algos.py) where a config field is None.
_CLIP_COV_RATIO, _CLIP_COV_LB, _CLIP_COV_UB = 0.0002, 1.0, 5.0
_KL_COV_RATIO, _PPO_KL_COEF = 0.0002, 1.0



def compute_policy_loss_clip_cov(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                                 response_mask: Tensor, loss_agg_mode: str = "token-mean", config=None,
                                 rollout_is_weights: Tensor | None = None):
    """verl 0.9.1 ``core_algos.compute_policy_loss_clip_cov``: the PPO clip
    ``max(-A r, -A clip(r, 1 - low, 1 + high))`` (no dual clip), with the loss of a random subset of
    ``max(int(clip_cov_ratio * n), 1)`` tokens set to 0: tokens not already clipped whose centred
    covariance lies in ``(clip_cov_lb, clip_cov_ub)`` (rlkern.ops.clip_cov_mask: no host sync; verl's
    distribution, not its draw). The loss is rlkern.ops.policy_loss with those tokens' weight 0.
    Metrics: pg_clipfrac (share of valid tokens selected), ppo_kl."""
    config = _need(config)
    policy = _policy_config(config)
    ratio_k = _field(policy, "clip_cov_ratio", _CLIP_COV_RATIO)
    if not ratio_k > 0:
        raise ValueError("clip_ratio should be larger than 0.")  # verl's assertion message
    low, high = _clip_range(config)
    lb = _field(policy, "clip_cov_lb", _CLIP_COV_LB)
    ub = _field(policy, "clip_cov_ub", _CLIP_COV_UB)
    with torch.no_grad():
        neg_kl = log_prob - old_log_prob
        ratio = torch.exp(neg_kl)
        pg1 = -advantages * ratio
        pg2 = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
        chosen = ops.clip_cov_mask(advantages, log_prob, response_mask, ratio_k, lb, ub, exclude=pg2 > pg1)
        keep = (~chosen).to(torch.float32)
        weights = keep if rollout_is_weights is None else keep * rollout_is_weights
    loss, _ = _fused(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode, config, weights,
                     clip_low=float(low), clip_high=float(high))
    return loss, _metrics({"pg_clipfrac": _mean(chosen.float(), response_mask),
                           "ppo_kl": _mean(-neg_kl, response_mask)})


def compute_policy_loss_kl_cov(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                               response_mask: Tensor, loss_agg_mode: str = "token-mean", config=None,
                               rollout_is_weights: Tensor | None = None):
    """verl 0.9.1 ``core_algos.compute_policy_loss_kl_cov``: the unclipped surrogate ``-A r``
    (``r = exp(logp - old)``, no clamp), plus ``ppo_kl_coef * |logp - old|`` at the
    ``max(1, int(kl_cov_ratio * n))`` valid tokens of largest centred covariance
    (rlkern.ops.kl_cov_mask: no host sync). The token terms are plain torch with the gradient
    written out (:class:`_KlCovTokens`; rlkern has no fused unclipped-ratio loss), aggregated by
    rlkern's agg_loss. Metrics: ppo_kl = mean ``|logp - old|``."""
    config = _need(config)
    policy = _policy_config(config)
    ratio_k = _field(policy, "kl_cov_ratio", _KL_COV_RATIO)
    coef = _field(policy, "ppo_kl_coef", _PPO_KL_COEF)
    if not ratio_k > 0:
        raise ValueError("kl_cov_ratio should be larger than 0.")  # verl's assertion message
    valid = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    chosen = ops.kl_cov_mask(advantages, log_prob, valid, ratio_k)
    pg_losses, abs_kl = _KlCovTokens.apply(log_prob, old_log_prob, advantages.detach(), valid, chosen,
                                           float(coef))
    weights = None if rollout_is_weights is None else torch.where(valid, rollout_is_weights, 0)
    loss = _agg(_weighted(pg_losses, weights), response_mask, loss_agg_mode, config)
    return loss, _metrics({"ppo_kl": _mean(abs_kl, response_mask)})


class _KlCovTokens(torch.autograd.Function):
    """KL-Cov's token losses ``-A r`` and ``-A r + coef |d|`` at the chosen tokens (verl's exact
    expressions, ``d = logp - old``, ``r = exp(d)``), with the gradient written out:
    ``-A r + coef sign(d)`` at the chosen tokens, ``-A r`` elsewhere, 0 at masked-out ones (whose
    inputs are zeroed first, so padding NaN / inf reaches nothing). About half the passes of the
    same maths through autograd. Returns ``(token losses, |d|)``; the second has no gradient."""

    @staticmethod
    def forward(ctx, log_prob, old_log_prob, advantages, valid, chosen, coef):
        neg_kl = torch.where(valid, log_prob.detach() - old_log_prob, 0)
        surrogate = torch.where(valid, advantages, 0).neg_() * torch.exp(neg_kl)  # verl's -A * r
        abs_kl = neg_kl.abs()
        pg_losses = torch.where(chosen, surrogate + coef * abs_kl, surrogate)
        ctx.save_for_backward(surrogate, neg_kl, chosen)
        ctx.coef = coef
        ctx.mark_non_differentiable(abs_kl)
        return pg_losses, abs_kl

    @staticmethod
    def backward(ctx, grad, _grad_abs):
        surrogate, neg_kl, chosen = ctx.saved_tensors
        local = torch.where(chosen, surrogate + ctx.coef * torch.sign(neg_kl), surrogate)
        return grad * local, None, None, None, None, None
