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
    _clip_range,
    _field,
    _fused,
    _get,
    _mean,
    _metrics,
    _need,
    _policy_config,
    _verl,
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
    ``max(1, int(kl_cov_ratio * n))`` valid tokens of largest centred covariance, times
    ``rollout_is_weights``, aggregated as verl's ``agg_loss``. One rlkern.ops.kl_cov_rows call (the
    selection of rlkern.ops.kl_cov_mask, no host sync, and the token losses summed per row in one
    fused pass; one pass for the gradient); verl's aggregation is rebuilt from the row sums and counts.
    Metrics: ppo_kl = mean ``|logp - old|`` over the valid tokens."""
    config = _need(config)
    policy = _policy_config(config)
    ratio_k = _field(policy, "kl_cov_ratio", _KL_COV_RATIO)
    coef = _field(policy, "ppo_kl_coef", _PPO_KL_COEF)
    if not ratio_k > 0:
        raise ValueError("kl_cov_ratio should be larger than 0.")  # verl's assertion message
    info = dict(_get(config, "global_batch_info", None) or {})
    verl = _verl()
    verl._check_global(loss_agg_mode, info.get("dp_size", 1), info.get("batch_num_tokens"),
                       info.get("global_batch_size"))
    sums, abs_kl, counts, _ = ops.kl_cov_rows(log_prob, old_log_prob, advantages, response_mask,
                                              ratio=ratio_k, coef=coef, weights=rollout_is_weights)
    loss = _agg_rows(sums, counts, response_mask.shape[-1], loss_agg_mode, **info)
    ppo_kl = abs_kl.sum() / (counts.sum() + verl._MEAN_EPS)  # verl's masked_mean(|d|, mask)
    return loss.to(torch.promote_types(log_prob.dtype, advantages.dtype)), _metrics({"ppo_kl": ppo_kl})


def _agg_rows(sums: Tensor, counts: Tensor, length: int, loss_agg_mode: str, dp_size: int = 1,
              batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None) -> Tensor:
    """verl 0.9.1 ``core_algos.agg_loss`` (rlkern.compat.verl.agg_loss) from the per-row masked sums
    of the token losses and the per-row valid counts (float32 ``[...]``); ``length`` is T."""
    if loss_agg_mode == "token-mean":
        return sums.sum() / (counts.sum() if batch_num_tokens is None else batch_num_tokens) * dp_size
    if loss_agg_mode == "token-sum":
        return sums.sum() * dp_size
    if loss_agg_mode == "seq-mean-token-mean":
        sums = sums / (counts + _verl()._MEAN_EPS)
    live = counts > 0
    rows = live.sum().to(torch.float32) if global_batch_size is None else global_batch_size
    loss = torch.where(live, sums, 0).sum() / rows * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (length if loss_scale_factor is None else loss_scale_factor)
    return loss
