"""verl 0.9.1's DPPO policy losses (``POLICY_LOSS_REGISTRY`` entries ``dppo_tv`` and ``dppo_kl``: binary
TV / binary KL trust regions, arXiv 2602.04879). Same signature, return and config reading as the other
shims of rlkern/compat/verl_policy.py (whose helpers these use); rlkern.compat.verl adds
:data:`PATCH_TARGETS` to its own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern import ops
from rlkern.compat.verl_policy import _CORE, _clip_range, _fused, _get, _metrics, _need, _weighted

__all__ = ["compute_policy_loss_dppo_tv", "compute_policy_loss_dppo_kl"]
PATCH_TARGETS = tuple((_CORE, name, name) for name in __all__)

_DPPO_CLIP_C = 20.0  # config.get("clip_ratio_c", 20.0) in dppo_tv / dppo_kl (ActorConfig has 3.0)


def _dppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
          divergence: str):
    config = _need(config)
    low, high = _clip_range(config)
    clip_c = _get(config, "clip_ratio_c", _DPPO_CLIP_C)
    # sg(min(r, c)) * valid and both clip fractions in one fused, sync-free pass (no gradient)
    gate = ops.trust_region_gate(log_prob, old_log_prob, response_mask, advantages, divergence=divergence,
                                 low=low, high=high, clip_c=clip_c, convention="verl")
    with torch.no_grad():
        weights = _weighted(gate.weights, rollout_is_weights)
    # -A * sg(min(r, c)) * logp * valid: the policy gradient with those constant weights
    loss, stats = _fused(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode, config, weights,
                         variant="gpg")
    return loss, _metrics({
        "pg_clipfrac": gate.metrics["pg_clipfrac"],
        "ppo_kl": stats["approx_kl"],
        "pg_clipfrac_lower": gate.metrics["pg_clipfrac_lower"],
    })


def compute_policy_loss_dppo_tv(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                                response_mask: Tensor, loss_agg_mode: str = "token-mean", config=None,
                                rollout_is_weights: Tensor | None = None):
    """verl 0.9.1 ``core_algos.compute_policy_loss_dppo_tv`` (DPPO-Binary-TV): per token
    ``-A * sg(min(r, c)) * logp * valid``, ``valid`` = ``p - p_old <= clip_ratio_high`` where A > 0,
    ``p - p_old >= -clip_ratio_low`` elsewhere (``p = exp(logp)``), ``c = config.clip_ratio_c``
    (20 when absent), ``r = exp(clamp(logp - old, -20, 20))``. Metrics: pg_clipfrac (share not
    valid), ppo_kl, pg_clipfrac_lower (share valid with ``r > c``). The mask, truncation and clip
    fractions by rlkern.ops.trust_region_gate (one fused pass, fp32), the loss by
    rlkern.ops.policy_loss ``variant="gpg"`` with them as weights."""
    return _dppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
                 "tv")


def compute_policy_loss_dppo_kl(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                                response_mask: Tensor, loss_agg_mode: str = "token-mean", config=None,
                                rollout_is_weights: Tensor | None = None):
    """verl 0.9.1 ``core_algos.compute_policy_loss_dppo_kl`` (DPPO-Binary-KL): as
    :func:`compute_policy_loss_dppo_tv` with the trust region on the binary KL
    ``p_old (logp_old - logp) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8))``
    (``<= clip_ratio_high`` or ``p <= p_old`` where A > 0; ``<= clip_ratio_low`` or ``p >= p_old``
    elsewhere)."""
    return _dppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
                 "kl")
