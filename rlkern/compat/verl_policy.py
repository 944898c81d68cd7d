"""verl 0.9.1's other policy losses (``POLICY_LOSS_REGISTRY`` beyond ``vanilla``) on rlkern.ops.

One shim per registry entry of ``verl/trainer/ppo/core_algos.py``, each with verl's signature
``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights=None)``
and verl's return ``(pg_loss, pg_metrics)`` (verl's metric names, Python floats):
``gspo``, ``sapo``, ``gpg``, ``geo_mean``, ``dro``, ``cispo``, ``bypass_mode`` (and the unregistered
``compute_policy_loss_reinforce`` that bypass_mode calls); ``clip_cov`` and ``kl_cov`` are in
rlkern/compat/verl_cov.py, ``dppo_tv`` and ``dppo_kl`` in rlkern/compat/verl_dppo.py, on these helpers.
``vanilla`` is rlkern.compat.verl.compute_policy_loss_vanilla. rlkern.compat.verl lists
:data:`PATCH_TARGETS` (and verl_cov's and verl_dppo's) with its own, so ``rlkern.compat.patch("verl")``
swaps all twelve registry entries.
Tested against the installed verl by tests/test_verl_policy.py.

What each runs on:

* ``clip_cov`` (verl_cov.py): rlkern.ops.clip_cov_mask (the sync-free selection) and
  rlkern.ops.policy_loss (the clipped surrogate, with the selected tokens' weight set to 0).
* ``kl_cov`` (verl_cov.py): one rlkern.ops.kl_cov_rows call (selection, token losses and row sums in
  the KL-Cov kernels), aggregated from its row sums.
* ``gspo``, ``sapo``, ``gpg``, ``cispo``: one rlkern.ops.policy_loss call each (the fused kernel's
  ``ratio_level="sequence_token"`` / ``variant="sapo"`` / ``"gpg"`` / ``"cispo"``); ``dppo_tv``,
  ``dppo_kl`` (verl_dppo.py) and bypass_mode's REINFORCE: its ``variant="gpg"`` with constant weights
  (for DPPO the trust-region weights of rlkern.ops.trust_region_gate, computed without gradient).
* ``geo_mean`` and ``dro``: one rlkern.ops.policy_loss call each (``variant="gmpo"``: the row pass
  of the fused kernel; ``variant="dro"``: the quadratic penalty fused into the token pass); geo_mean
  with a ``clip_ratio_low`` outside [0, 1) (rlkern's clip_low range) runs in plain torch with
  rlkern.ops.masked_sum row means.
* ``bypass_mode``: rlkern.compat.verl's rollout correction (one rlkern.ops.rollout_correction call),
  then the REINFORCE loss here or rlkern's vanilla PPO loss.

Host syncs: verl's ``clip_cov`` / ``kl_cov`` move the valid tokens to the host and size ``topk`` /
``randperm`` with ``.item()`` counts; here nothing is read back until the metrics, which come back in
one transfer (verl: one ``.item()`` each).

Numerics: verl's formulas, operation for operation where the dtype matters, in the inputs' dtype; the
aggregation is verl's ``agg_loss`` with ``config.global_batch_info`` (``dp_size``,
``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``). Documented differences:

* a NaN (or inf) at a masked-out position reaches neither the loss nor the gradient (rlkern's masked
  sums select and the plain-torch terms zero the padding first; verl's ``loss * mask`` turns 0 * NaN
  into NaN);
* with no valid token verl's mean modes give 0 / 0 = NaN, and so do these shims (rlkern.ops alone
  would give 0);
* ``clip_cov`` runs rlkern's PPO kernel, which clamps the log-ratio to [-20, 20] like verl's vanilla
  (verl's clip_cov does not): the same loss wherever ``log r <= 20`` (r <= 4.85e8);
* ``clip_cov`` draws its random subset differently (same distribution, see rlkern.ops.clip_cov_mask),
  and ``kl_cov`` may pick other tokens among those tied at the k-th covariance (see
  rlkern.ops.kl_cov_mask);
* ``config`` may be verl's ActorConfig or any mapping / object with its fields (verl asserts the
  ActorConfig type for gspo, sapo and cispo); a missing config raises ValueError.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern import ops

__all__ = [
    "compute_policy_loss_gspo",
    "compute_policy_loss_sapo",
    "compute_policy_loss_gpg",
    "compute_policy_loss_geo_mean",
    "compute_policy_loss_dro",
    "compute_policy_loss_cispo",
    "compute_policy_loss_reinforce",
    "compute_policy_loss_bypass_mode",
]

_CORE = "verl.trainer.ppo.core_algos"
# (module, attribute, shim name), added to rlkern.compat.verl.PATCH_TARGETS.
PATCH_TARGETS = tuple((_CORE, name, name) for name in __all__)

# verl's defaults (core_algos.py) where a config field is None.


def _verl():
    # rlkern.compat.verl imports this module at its end (to list the targets), so this module reaches
    # the shared helpers (agg_loss, masked_mean, _floats, ...) at call time.
    from rlkern.compat import verl

    return verl


def _need(config):
    if config is None:
        raise ValueError("config is required (verl asserts it): the loss reads its fields")
    return config


def _get(config, key: str, default=None):
    return _verl()._config_value(config, key, default)


def _clip_range(config) -> tuple[float, float]:
    """verl: clip_ratio_low / clip_ratio_high, each defaulting to clip_ratio."""
    ratio = _get(config, "clip_ratio")
    low, high = _get(config, "clip_ratio_low"), _get(config, "clip_ratio_high")
    return (ratio if low is None else low), (ratio if high is None else high)


def _policy_config(config):
    policy = _get(config, "policy_loss")
    if policy is None:
        raise ValueError("config.policy_loss is required (verl asserts it is not None)")
    return policy


def _field(policy, key: str, default):
    value = _get(policy, key)
    return default if value is None else value


def _agg(loss_mat: Tensor, mask: Tensor, loss_agg_mode: str, config) -> Tensor:
    info = dict(_get(config, "global_batch_info", None) or {})
    return _verl().agg_loss(loss_mat, mask, loss_agg_mode, **info)


def _mean(values: Tensor, mask: Tensor) -> Tensor:
    return _verl().masked_mean(values, mask)


def _metrics(tensors: dict[str, Tensor], zeros: tuple[str, ...] = ()) -> dict[str, float]:
    """verl's ``{"actor/...": float}``: the tensors read back in one transfer, in verl's key order
    (``zeros`` are verl's constant-0 metrics, appended in the order given)."""
    out = _verl()._floats({f"actor/{k}": v for k, v in tensors.items()})
    out.update({f"actor/{k}": 0.0 for k in zeros})
    return out


def _weighted(pg_losses: Tensor, rollout_is_weights: Tensor | None) -> Tensor:
    return pg_losses if rollout_is_weights is None else pg_losses * rollout_is_weights


def _padding_zeroed(mask: Tensor, *tensors):
    """The tensors with masked-out positions set to 0 (None stays None), so that a NaN or inf in the
    padding reaches neither the loss nor, through 0 * NaN, the gradient (rlkern's rule, as in its
    kernels; verl's ``loss * mask`` lets it through). Values at valid tokens are untouched."""
    valid = mask if mask.dtype == torch.bool else mask != 0
    return [None if t is None else torch.where(valid, t, 0) for t in tensors]


# ------------------------------------------------------------------------------------------------
# GSPO, SAPO, GPG, CISPO
# ------------------------------------------------------------------------------------------------


def _fused(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode, config, weights, **variant):
    """One rlkern.ops.policy_loss call (the fused kernel: token terms, aggregation and statistics in
    one pass, its gradient in another), rescaled to verl's agg_loss with config.global_batch_info."""
    info = dict(_get(config, "global_batch_info", None) or {})
    verl = _verl()
    verl._check_global(loss_agg_mode, info.get("dp_size", 1), info.get("batch_num_tokens"),
                       info.get("global_batch_size"))
    loss, stats = ops.policy_loss(log_prob, old_log_prob, advantages, response_mask,
                                  agg=verl._ops_agg(loss_agg_mode), weights=weights, **variant)
    return verl._global_scale(loss, response_mask, loss_agg_mode, **info), stats


def compute_policy_loss_gspo(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                             response_mask: Tensor, loss_agg_mode: str = "seq-mean-token-mean", config=None,
                             rollout_is_weights: Tensor | None = None):
    """verl 0.9.1 ``core_algos.compute_policy_loss_gspo``: sequence ratio
    ``s = exp(min(sg(mean_row(logp - old)) + logp - sg(logp), 10))`` (row mean over valid tokens,
    length clamped to >= 1; the gradient per token is ``s``), then the PPO clip
    ``max(-A s, -A clip(s, 1 - low, 1 + high))``. Metrics: pg_clipfrac, ppo_kl (unclamped),
    pg_clipfrac_lower = 0. rlkern.ops.policy_loss, ``ratio_level="sequence_token"``."""
    config = _need(config)
    low, high = _clip_range(config)
    loss, stats = _fused(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode, config,
                         rollout_is_weights, clip_low=float(low), clip_high=float(high), variant="ppo",
                         ratio_level="sequence_token")
    return loss, _metrics({"pg_clipfrac": stats["clip_frac"], "ppo_kl": stats["approx_kl"]},
                          zeros=("pg_clipfrac_lower",))


def compute_policy_loss_sapo(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                             response_mask: Tensor, loss_agg_mode: str = "seq-mean-token-mean", config=None,
                             rollout_is_weights: Tensor | None = None):
    """verl 0.9.1 ``core_algos.compute_policy_loss_sapo``: ``-A * sigmoid(tau (r - 1)) * 4 / tau``,
    ``tau = config.tau_pos`` where A > 0 else ``config.tau_neg``,
    ``r = exp(clamp(logp - old, -20, 20))``; always aggregated ``seq-mean-token-mean`` (verl ignores
    ``loss_agg_mode`` here). Metrics: pg_clipfrac = pg_clipfrac_lower = 0, ppo_kl.
    rlkern.ops.policy_loss, ``variant="sapo"``."""
    config = _need(config)
    loss, stats = _fused(log_prob, old_log_prob, advantages, response_mask, "seq-mean-token-mean",
                                    config, rollout_is_weights, variant="sapo",
                                    sapo_tau_pos=float(_get(config, "tau_pos")),
                                    sapo_tau_neg=float(_get(config, "tau_neg")))
    metrics = _metrics({"ppo_kl": stats["approx_kl"]})
    return loss, {"actor/pg_clipfrac": 0.0, **metrics, "actor/pg_clipfrac_lower": 0.0}


def compute_policy_loss_gpg(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                            loss_agg_mode: str = "token-mean", config=None,
                            rollout_is_weights: Tensor | None = None):
    """verl 0.9.1 ``core_algos.compute_policy_loss_gpg``: ``-logp * A`` (times the rollout weights),
    aggregated; no metrics (``{}``). rlkern.ops.policy_loss, ``variant="gpg"`` (``old_log_prob``
    only feeds its unused approx_kl)."""
    config = _need(config)
    loss, _ = _fused(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode, config,
                     rollout_is_weights, variant="gpg")
    return loss, {}


def compute_policy_loss_cispo(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                              response_mask: Tensor, loss_agg_mode: str = "token-mean", config=None,
                              rollout_is_weights: Tensor | None = None):
    """verl 0.9.1 ``core_algos.compute_policy_loss_cispo``: ``-sg(clip(r, 1 - low, 1 + high)) * A *
    logp`` with ``r = exp(clamp(logp - old, -20, 20))`` (verl's two-sided clip; TRL's absolute cap is
    a different loss). Metrics: pg_clipfrac (share with ``r != clip(r)``), ppo_kl,
    pg_clipfrac_lower = 0. rlkern.ops.policy_loss, ``variant="cispo"``."""
    config = _need(config)
    low, high = _clip_range(config)
    loss, stats = _fused(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode, config,
                         rollout_is_weights, clip_low=float(low), clip_high=float(high), variant="cispo")
    return loss, _metrics({"pg_clipfrac": stats["clip_frac"], "ppo_kl": stats["approx_kl"]},
                          zeros=("pg_clipfrac_lower",))


# ------------------------------------------------------------------------------------------------
# GMPO (geometric mean) and DRO
# ------------------------------------------------------------------------------------------------


def _row_mean(values: Tensor, mask: Tensor, lengths: Tensor) -> Tensor:
    # verl: (values * mask).sum(-1) / (mask.sum(-1) + 1e-8), here over the valid tokens only.
    return ops.masked_sum(values, mask, dim=-1).to(values.dtype) / (lengths + 1e-8)


def compute_policy_loss_geo_mean(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                                 response_mask: Tensor, loss_agg_mode: str = "token-mean", config=None,
                                 rollout_is_weights: Tensor | None = None):
    """verl 0.9.1 ``core_algos.compute_policy_loss_geo_mean`` (GMPO): per row,
    ``-mean_row(A) * exp(mean_row(sgn(A) min(sgn(A) d, sgn(A) clip(d, -low, high))))`` with
    ``d = logp - old`` (unclamped), row means over the valid tokens ``/ (len + 1e-8)``; rollout
    weights enter as their row geometric mean ``exp(mean_row(log(w + 1e-10)))``; the loss is the plain
    mean over rows (``loss_agg_mode`` and the global-batch info are ignored, as in verl). Metrics:
    pg_clipfrac / pg_clipfrac_lower (share of valid tokens with ``d`` clipped and A > 0 / A < 0),
    ppo_kl. rlkern.ops.policy_loss ``variant="gmpo"`` (one row pass, then one token pass for the
    clip flags and ppo_kl, from the same kernel pair)."""
    config = _need(config)
    low, high = _clip_range(config)
    if 0.0 <= low < 1.0:
        loss, stats = ops.policy_loss(log_prob, old_log_prob, advantages, response_mask, clip_low=float(low),
                                      clip_high=float(high), variant="gmpo", weights=rollout_is_weights)
        return loss, _metrics({"pg_clipfrac": stats["clip_frac"], "ppo_kl": stats["approx_kl"],
                               "pg_clipfrac_lower": stats["clip_frac_lower"]})
    return _geo_mean_torch(old_log_prob, log_prob, advantages, response_mask, low, high, rollout_is_weights)


def _geo_mean_torch(old_log_prob, log_prob, advantages, response_mask, low, high, rollout_is_weights):
    """compute_policy_loss_geo_mean in plain torch, for clip_ratio_low outside rlkern's [0, 1)."""
    log_prob, old_log_prob, advantages, rollout_is_weights = _padding_zeroed(
        response_mask, log_prob, old_log_prob, advantages, rollout_is_weights)
    neg_kl = log_prob - old_log_prob
    sign = torch.sign(advantages)
    neg_kl_clamp = torch.clamp(neg_kl, -low, high)
    neg_kl_min = sign * torch.min(sign * neg_kl, sign * neg_kl_clamp)
    lengths = response_mask.sum(dim=-1)
    ratio = torch.exp(_row_mean(neg_kl_min, response_mask, lengths))
    pg_losses = -_row_mean(advantages, response_mask, lengths) * ratio
    if rollout_is_weights is not None:
        pg_losses = pg_losses * torch.exp(_row_mean(torch.log(rollout_is_weights + 1e-10), response_mask,
                                                    lengths))
    clipped = torch.ne(neg_kl, neg_kl_clamp).detach()
    return torch.mean(pg_losses), _metrics({
        "pg_clipfrac": _mean((clipped * (advantages > 0)).float(), response_mask),
        "ppo_kl": _mean(-neg_kl.detach(), response_mask),
        "pg_clipfrac_lower": _mean((clipped * (advantages < 0)).float(), response_mask),
    })


def compute_policy_loss_dro(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                            loss_agg_mode: str = "token-mean", config=None,
                            rollout_is_weights: Tensor | None = None):
    """verl 0.9.1 ``core_algos.compute_policy_loss_dro`` (Direct Reward Optimization):
    ``-(logp * A - beta / 2 * (logp - old)^2)``, ``beta = config.policy_loss.dro_beta`` (> 0, else
    verl's ValueError), times the rollout weights, aggregated per ``loss_agg_mode``. Metrics: ppo_kl
    (unclamped). One rlkern.ops.policy_loss call, ``variant="dro"``."""
    config = _need(config)
    beta = _get(_policy_config(config), "dro_beta")
    if beta is None or beta <= 0:
        raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
    loss, stats = _fused(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode, config,
                         rollout_is_weights, variant="dro", dro_beta=float(beta))
    return loss, _metrics({"ppo_kl": stats["approx_kl"]})


# ------------------------------------------------------------------------------------------------
# bypass mode (old_log_prob = rollout_log_prob): rollout correction, then REINFORCE or PPO-clip
# ------------------------------------------------------------------------------------------------


def compute_policy_loss_reinforce(rollout_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                                  response_mask: Tensor, loss_agg_mode: str = "seq-mean-token-sum",
                                  config=None, rollout_is_weights: Tensor | None = None):
    """verl 0.9.1 ``core_algos.compute_policy_loss_reinforce`` (not registered; bypass_mode's
    ``loss_type="reinforce"``): ``-A * logp`` (times the IS weights), aggregated. Metrics: ppo_kl =
    mean of ``rollout_log_prob - log_prob``. rlkern.ops.policy_loss ``variant="gpg"``."""
    config = _need(config)
    loss, _ = _fused(log_prob, rollout_log_prob, advantages, response_mask, loss_agg_mode, config,
                     rollout_is_weights, variant="gpg")
    return loss, _metrics({"ppo_kl": _mean(-(log_prob - rollout_log_prob).detach(), response_mask)})


def compute_policy_loss_bypass_mode(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                                    response_mask: Tensor, loss_agg_mode: str = "token-mean", config=None,
                                    rollout_is_weights: Tensor | None = None):
    """verl 0.9.1 ``core_algos.compute_policy_loss_bypass_mode``: ``old_log_prob`` is the rollout's;
    the IS weights and rejection mask of ``config.policy_loss.rollout_correction`` come from
    rlkern.compat.verl.compute_rollout_correction_and_rejection_mask (current vs rollout policy,
    no gradient), then ``loss_type="reinforce"`` runs :func:`compute_policy_loss_reinforce` with
    those weights and ``"ppo_clip"`` rlkern's vanilla PPO loss without them (the ratio already is the
    IS ratio), both on the rejection-masked tokens. ``rollout_is_weights`` is ignored, as in verl.
    The rollout-correction metrics are merged into the loss metrics."""
    config = _need(config)
    policy = _get(config, "policy_loss")
    corr = None if policy is None else _get(policy, "rollout_correction")
    if corr is None:
        raise ValueError("rollout_correction config not found in policy_loss. "
                         "When using loss_mode='bypass_mode', ensure rollout_correction config is passed.")
    loss_type = _get(corr, "loss_type", "ppo_clip")
    if loss_type not in ("reinforce", "ppo_clip"):
        raise ValueError(f"Invalid loss_type: {loss_type}. Must be 'reinforce' or 'ppo_clip'.")
    verl = _verl()
    with torch.no_grad():
        proto, mask, corr_metrics = verl.compute_rollout_correction_and_rejection_mask(
            old_log_prob=log_prob, rollout_log_prob=old_log_prob, response_mask=response_mask,
            rollout_is=_get(corr, "rollout_is"), rollout_is_threshold=_get(corr, "rollout_is_threshold", 2.0),
            rollout_is_batch_normalize=_get(corr, "rollout_is_batch_normalize", False),
            rollout_rs=_get(corr, "rollout_rs"), rollout_rs_threshold=_get(corr, "rollout_rs_threshold"))
    if loss_type == "reinforce":
        weights = proto.batch["rollout_is_weights"] if proto else None
        loss, metrics = compute_policy_loss_reinforce(old_log_prob, log_prob, advantages, mask, loss_agg_mode,
                                                      config, weights)
    else:
        loss, metrics = verl.compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, mask,
                                                         loss_agg_mode, config, None)
    metrics.update(corr_metrics)
    return loss, metrics
