"""OpenRLHF's names, signatures, defaults and numerics on rlkern.ops.

Mirrors OpenRLHF/OpenRLHF ``openrlhf/models/utils.py`` (``compute_approx_kl`` with the [-10, 10]
clamp on every estimator), ``openrlhf/models/loss.py`` (``PolicyLoss``: ppo / gspo, dual-clip and the
train/rollout IS corrections TIS / IcePop / seq-mask-tis and the binary_kl / tv gatings; ``ValueLoss``)
and the advantage code of ``openrlhf/trainer/ppo_utils/experience_maker.py``
(``get_advantages_and_returns``, ``get_cumulative_returns`` and the group reward shaping of
``compute_advantages_and_returns``). ``rlkern.compat.patch("openrlhf")`` swaps them into an installed
OpenRLHF.

OpenRLHF-specific numerics reproduced here (each cited where it is used):
- ``masked_mean`` divides by ``mask.sum()`` with no epsilon (an empty mask gives NaN, as in OpenRLHF).
- KL estimators are computed in fp32 and clamped to [-10, 10] (k1 and k2 too).
- GAE zeroes values and rewards outside the mask and then runs a plain scan over every position
  (no carrying through gaps, unlike verl); REINFORCE returns likewise, without a reset.
- ``group_norm`` divides by ``std + 1e-9`` (unbiased std).
- The PPO ratio is ``exp(log_probs - old_log_probs)`` without a clamp; rlkern clamps the log-ratio to
  [-20, 20] before exp, which changes nothing unless the ratio exceeds e^20 ≈ 4.9e8.
- The divergence gatings of 0.11.2 (``binary_kl`` / ``tv``) clamp both token probabilities to
  [1e-6, 1 - 1e-6] and average the statistic per row without an epsilon (``rlkern.ops.trust_region_gate``,
  ``convention="openrlhf"``).
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import Tensor, nn

from rlkern import ops
from rlkern.compat import wraps_original

__all__ = [
    "compute_approx_kl",
    "compute_reward",
    "log_probs_from_logits",
    "compute_entropy",
    "masked_mean",
    "PolicyLoss",
    "ValueLoss",
    "get_advantages_and_returns",
    "get_cumulative_returns",
    "shape_group_rewards",
]

_UTILS = "openrlhf.models.utils"
_LOSS = "openrlhf.models.loss"
_MAKER = "openrlhf.trainer.ppo_utils.experience_maker"

# (module, attribute, shim name) swapped in by rlkern.compat.patch("openrlhf"); the experience maker's
# class is RemoteExperienceMaker in current releases and NaiveExperienceMaker in older ones.
PATCH_TARGETS = (
    (_UTILS, "compute_approx_kl", "compute_approx_kl"),
    (_UTILS, "compute_reward", "compute_reward"),
    (_UTILS, "log_probs_from_logits", "log_probs_from_logits"),
    (_UTILS, "compute_entropy", "compute_entropy"),
    (_UTILS, "masked_mean", "masked_mean"),
    (_LOSS, "PolicyLoss", "PolicyLoss_patch"),
    (_LOSS, "ValueLoss", "ValueLoss"),
    (_MAKER, "RemoteExperienceMaker.get_advantages_and_returns", "get_advantages_and_returns"),
    (_MAKER, "RemoteExperienceMaker.get_cumulative_returns", "get_cumulative_returns"),
    (_MAKER, "NaiveExperienceMaker.get_advantages_and_returns", "get_advantages_and_returns"),
    (_MAKER, "NaiveExperienceMaker.get_cumulative_returns", "get_cumulative_returns"),
)

KL_ESTIMATORS = ("k1", "k2", "k3")
POLICY_LOSS_TYPES = ("ppo", "gspo")
GROUP_ESTIMATORS = ("rloo", "reinforce_baseline", "dr_grpo", "group_norm", "gae", "reinforce")
# openrlhf/models/utils.py::compute_approx_kl clamps every estimator's value to this range.
_KL_CLAMP = 10.0
# openrlhf/trainer/ppo_utils/experience_maker.py, advantage_estimator == "group_norm".
_GROUP_NORM_EPS = 1e-9


def _ones_like_mask(x: Tensor) -> Tensor:
    return torch.ones(x.shape, dtype=torch.bool, device=x.device)


# OpenRLHF's clamp on the importance weight of the unbiased KL gradient (models/utils.py, KL_IS_WEIGHT_CLIP).
_KL_IS_WEIGHT_CLIP = 10.0


def compute_approx_kl(log_probs: Tensor, log_probs_base: Tensor, log_probs_old: Tensor | None = None,
                      kl_estimator: str = "k1", unbiased_gradient: bool = False) -> Tensor:
    """Token KL estimate in fp32, clamped to [-10, 10] (OpenRLHF ``models/utils.py::
    compute_approx_kl``, 0.11 signature): ``k1`` = logp - base, ``k2`` = ½ (logp - base)², ``k3`` =
    exp(base - logp) - (base - logp) - 1.

    With ``unbiased_gradient`` (OpenRLHF 0.11) the value is unchanged and the gradient is that of
    ``w * k2`` with ``w = min(exp(logp - log_probs_old), 10)`` detached (1 without
    ``log_probs_old``): the importance-weighted reverse-KL gradient, by a straight-through sum.
    Releases before 0.11 took ``kl_estimator`` third; a string there is read as ``kl_estimator``.

    The value equals OpenRLHF's everywhere. Its gradient is finite everywhere too: OpenRLHF's k3
    evaluates exp of the unclamped log-ratio, which overflows to inf and turns the clamped
    element's zero gradient into NaN (OpenRLHF PR #1335); rlkern's kernel returns 0 there.
    """
    if isinstance(log_probs_old, str):  # the pre-0.11 positional form (log_probs, base, kl_estimator)
        log_probs_old, kl_estimator = None, log_probs_old
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if kl_estimator == "k3":
        # verl's clamps (log-ratio to [-20, 20] before exp, value to [-10, 10]) give OpenRLHF's k3
        # value exactly: k3 already exceeds 10 wherever the log-ratio clamp acts (|x| > 20), and both
        # zero the gradient there; but exp never overflows, so the gradient stays finite.
        value = ops.kl(log_probs, log_probs_base, "k3", clamp=True)
    else:
        # OpenRLHF clamps k1 and k2 to [-10, 10] as well; rlkern's clamp option is verl's, for k3
        # only, so that clamp is applied here on the op's output.
        value = ops.kl(log_probs, log_probs_base, kl_estimator).clamp(min=-_KL_CLAMP, max=_KL_CLAMP)
    if not unbiased_gradient:
        return value
    surrogate = ops.kl(log_probs, log_probs_base, "k2")  # d/d logp = log-ratio, OpenRLHF's k1 * grad log pi
    if log_probs_old is not None:
        w = torch.exp(log_probs.detach().float() - log_probs_old.float()).clamp(max=_KL_IS_WEIGHT_CLIP)
        surrogate = w * surrogate
    return value.detach() + surrogate - surrogate.detach()


def compute_reward(r: Tensor, kl_coef: float, kl: Tensor, action_mask: Tensor | None = None,
                   reward_clip_range: tuple[float, float] | None = None) -> Tensor:
    """Token rewards (OpenRLHF ``models/utils.py::compute_reward``): ``-kl_coef * kl`` at every
    position plus the sequence reward ``r`` (clamped to ``reward_clip_range`` if given) at the last
    position where ``action_mask`` is set; ``kl_coef <= 0`` means no KL term."""
    if not isinstance(kl, Tensor):
        raise TypeError(f"kl must be a [B, T] tensor (OpenRLHF's packed list form is not supported), "
                        f"got {type(kl).__name__}")
    if action_mask is None:
        raise ValueError("action_mask is required: the sequence reward goes to the last valid token")
    if kl_coef <= 0.0:
        kl_coef = 0.0
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    # rlkern.ops.token_rewards takes log-probs and applies its KL estimator; with estimator k1 and a
    # zero reference its KL is exactly the given `kl`.
    shaped = ops.token_rewards(r, kl, torch.zeros_like(kl), action_mask, kl_coef=kl_coef, estimator="k1")
    # OpenRLHF also puts the KL term on positions outside the mask; rlkern leaves them at 0.
    valid = action_mask.bool()
    reward = torch.where(valid, shaped.to(kl.dtype), -kl_coef * kl)
    # A row with no valid token: OpenRLHF's argmax over an all-zero mask picks the last position for
    # the score; rlkern gives such a row no score.
    last = reward[..., -1] + torch.where(valid.any(dim=-1), 0.0, r.to(kl.dtype))
    return torch.cat([reward[..., :-1], last.unsqueeze(-1)], dim=-1)


def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of ``labels`` under ``softmax(logits / temperature)``, in the logits' dtype
    (OpenRLHF ``models/utils.py::log_probs_from_logits``).

    OpenRLHF divides the logits by the temperature in place (``logits.div_``) and callers may read
    the scaled logits afterwards (for the entropy), so the shim does the same in-place division and
    then runs the fused kernel at temperature 1.
    """
    if temperature != 1.0:
        logits.div_(temperature)
    return ops.logprobs(logits, labels).to(logits.dtype)


def compute_entropy(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` along the last dim, in the logits' dtype (OpenRLHF
    ``models/utils.py::compute_entropy``)."""
    return ops.entropy(logits).to(logits.dtype)


def masked_mean(tensor: Tensor, mask: Tensor | None, dim: int | None = None) -> Tensor:
    """``sum(tensor * mask) / sum(mask)`` over all elements or along ``dim``; ``mask=None`` is a plain
    mean (OpenRLHF ``models/utils.py::masked_mean``). No epsilon: an empty mask gives NaN, as there."""
    if mask is None:
        return tensor.mean(dim=dim)
    total = ops.masked_sum(tensor, mask, dim=dim)
    count = mask.sum(dim=dim) if dim is not None else mask.sum()
    return (total / count.to(total.dtype)).to(tensor.dtype)


# openrlhf/models/loss.py::PolicyLoss (0.11.2): the train/rollout IS correction's options.
IS_LEVELS = ("off", "token", "seq")
IS_MODES = ("mask", "clip")
IS_GATINGS = ("ratio", "binary_kl", "tv")
# OpenRLHF 0.9.5-0.11.0 (vllm_is_correction_type) as 0.11.2's (level, mode) with ratio gating.
IS_CORRECTION_TYPES = {"tis": ("token", "clip"), "icepop": ("token", "mask"), "seq-mask-tis": ("seq", "mask")}
_SEQUENCE_RATIO: bool | None = None  # whether ops.policy_loss has ratio_level="sequence" (issue 13 API)


def _has_sequence_ratio() -> bool:
    global _SEQUENCE_RATIO
    if _SEQUENCE_RATIO is None:
        from rlkern.ops import losses  # the op itself (ops.policy_loss may be wrapped by a caller)

        _SEQUENCE_RATIO = "ratio_level" in inspect.signature(losses.policy_loss).parameters
    return _SEQUENCE_RATIO


def _is_correction(module) -> tuple | str | None:
    """The train/rollout IS correction a PolicyLoss (any OpenRLHF release) is configured for, as
    ``(level, mode, low, high, gating)`` (``low`` None: an upper bound only; gating ``"ratio"`` before
    0.11.2), None when it is off, or a string naming an option rlkern does not fuse."""
    level = getattr(module, "is_correction_level", None)
    if level is not None:  # 0.11.2: is_correction_level / _mode / _gating / _threshold
        if level == "off":
            return None
        gating = getattr(module, "is_correction_gating", "ratio")
        if gating not in IS_GATINGS:
            return f"is_correction_gating={gating!r}"
        low, high = module.is_correction_threshold
        return level, module.is_correction_mode, float(low), float(high), gating
    if not getattr(module, "enable_vllm_is_correction", False):
        return None
    kind = getattr(module, "vllm_is_correction_type", None)
    if kind is None:  # 0.8.11-0.9.4: TIS with one upper bound, exp(d).clamp(max=threshold)
        return "token", "clip", None, float(module.vllm_is_truncated_threshold), "ratio"
    low, high = module.vllm_is_truncated_threshold
    return (*IS_CORRECTION_TYPES[kind], float(low), float(high), "ratio")


def _is_weights(old_log_probs: Tensor, rollout_log_probs: Tensor, mask: Tensor, correction: tuple,
                filter_ratio: bool) -> tuple[Tensor, Tensor | None]:
    """OpenRLHF's IS coefficient of each token (openrlhf/models/loss.py::PolicyLoss.forward) from
    ``d = old_log_probs - rollout_log_probs``, by ``ops.rollout_correction`` (weights only: a few
    elementwise passes, no host sync), and 0.11.2's ``is_filter_ratio`` when asked:

    * token / clip (TIS): ``clamp(exp(d), low, high)``; filtered: ``exp(d)`` outside ``[low, high]``;
    * token / mask (IcePop): ``exp(d)`` inside ``[low, high]``, else 0 (filtered);
    * seq / mask (seq-mask-tis): ``exp(d)``, 0 for a row whose ``exp(masked_mean(d))`` (no epsilon:
      a row with no valid token has NaN, so it is dropped) is outside ``[low, high]``; the filter
      ratio is then the share of rows dropped;
    * gating ``binary_kl`` / ``tv`` (0.11.2, mask mode): ``exp(d)`` where the token's (or the row's mean)
      binary KL / total variation between the rollout and training token probabilities lies in
      ``[low, high]``, else 0, by ``ops.trust_region_gate(convention="openrlhf")`` (one pass, two at the
      sequence level), its filter ratio from the same pass.

    Padding keeps ``exp(d)`` (OpenRLHF's loss mask comes later). OpenRLHF 0.11.2 selects 0 with
    ``torch.where`` where 0.9.5-0.11.0 multiply by the 0/1 flag; they differ only where ``d`` is NaN
    or overflows ``exp`` (d > 88), and rlkern multiplies (a NaN loss rather than a dropped token).
    The filter flags are read off the weights: a TIS weight at a bound (so ``exp(d)`` exactly equal
    to a bound counts as filtered, where OpenRLHF's strict comparison does not), an IcePop weight or
    a whole row of weights that is not > 0."""
    level, mode, low, high, gating = correction
    if gating != "ratio":
        gate = ops.trust_region_gate(old_log_probs, rollout_log_probs, mask, convention="openrlhf",
                                     divergence="kl" if gating == "binary_kl" else "tv",
                                     level="sequence" if level == "seq" else "token", low=low, high=high)
        return gate.weights, gate.metrics["is_filter_ratio"] if filter_ratio else None
    if level == "seq":
        w = ops.rollout_correction(old_log_probs, rollout_log_probs, mask, level="token", mode="none",
                                   upper=None, log_clamp=None, padding="raw", seq_gate=(low, high),
                                   metrics=False).weights
        return w, (~(w > 0).any(dim=-1)).float().mean() if filter_ratio else None
    w = ops.rollout_correction(old_log_probs, rollout_log_probs, mask, level="token",
                               mode="truncate" if mode == "clip" else "mask", lower=low, upper=high,
                               log_clamp=None, padding="raw", metrics=False).weights
    if not filter_ratio:
        return w, None
    filtered = (w == low) | (w == high) if mode == "clip" else ~(w > 0)
    return w, masked_mean(filtered.float(), mask)


def _policy_forward(module, correction, log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor,
                    action_mask: Tensor | None, rollout_log_probs: Tensor | None, dp_size, batch_num_tokens,
                    global_batch_size, filter_ratio: bool, kl_of_ratio: bool = False) -> tuple:
    """OpenRLHF's ``PolicyLoss.forward`` on rlkern ops: ``(loss, clip_ratio, ppo_kl, vllm_kl,
    is_filter_ratio)`` (see :class:`PolicyLoss`). ``kl_of_ratio``: ppo_kl is the mean of the ratio's
    own log-ratio (releases before 0.10.3; later ones take ``old_log_probs - log_probs`` always)."""
    mask = _ones_like_mask(log_probs) if action_mask is None else action_mask
    token_level = getattr(module, "token_level_loss", True)  # releases before 0.10 lack it
    gspo = getattr(module, "policy_loss_type", "ppo") == "gspo"
    if correction is not None and rollout_log_probs is None:
        raise ValueError("PolicyLoss with the train/rollout IS correction needs rollout_log_probs")
    base, weights, vllm_kl, is_filter = old_log_probs, None, None, None
    extra = {}
    if gspo:
        # GSPO: the sequence ratio exp(masked row mean of log_probs - base), base = the rollout
        # log-probs when the IS correction is on; no IS coefficient (OpenRLHF applies it to ppo only)
        extra["ratio_level"] = "sequence"
        if correction is not None:
            base = rollout_log_probs
    elif correction is not None:
        weights, is_filter = _is_weights(old_log_probs, rollout_log_probs, mask, correction, filter_ratio)
        vllm_kl = masked_mean(rollout_log_probs - old_log_probs, mask)
    loss, stats = ops.policy_loss(log_probs, base, advantages, mask, clip_low=module.clip_eps_low,
                                  clip_high=module.clip_eps_high,
                                  dual_clip=getattr(module, "dual_clip", None),
                                  agg="token-mean" if token_level else "seq-mean-token-mean",
                                  weights=weights, **extra)
    loss = loss * _global_scale(mask, token_level, dp_size, batch_num_tokens, global_batch_size)
    ppo_kl = stats["approx_kl"] if base is old_log_probs or kl_of_ratio else masked_mean(
        old_log_probs - log_probs.detach(), mask)
    return loss, stats["clip_frac"], ppo_kl, vllm_kl, is_filter


class PolicyLoss(nn.Module):
    """PPO / GSPO policy loss (OpenRLHF 0.11.2 ``models/loss.py::PolicyLoss``, same arguments and
    defaults) on ``rlkern.ops.policy_loss``:

    * ``policy_loss_type="ppo"``: ``-min(r A, clip(r, 1 - low, 1 + high) A)`` with ``r =
      exp(clamp(log_probs - old_log_probs, ±20))``; ``"gspo"``: the same with the sequence ratio
      ``r = exp(masked row mean of the log-ratio)`` (GSPO aggregates per sequence);
    * ``dual_clip`` bounds the loss of negative-advantage tokens by ``-dual_clip * A``;
    * the train/rollout IS correction (ppo) multiplies each token's
      loss by OpenRLHF's coefficient from ``old_log_probs - rollout_log_probs``: ``level="token",
      mode="clip"`` (TIS), ``"token", "mask"`` (IcePop), ``"seq", "mask"`` (seq-mask-tis), computed
      by ``ops.rollout_correction``; ``is_correction_gating="binary_kl"`` / ``"tv"`` keep ``exp(d)``
      where the token's (``"token"``) or the row's mean (``"seq"``) divergence between the rollout and
      training token probabilities is in the threshold band, by ``ops.trust_region_gate``; with gspo
      the IS correction changes the ratio's base to the rollout log-probs instead;
    * aggregation: token mean (``token_level_loss``) or the mean of per-sequence token means over the
      sequences with a valid token, rescaled by ``batch_num_tokens`` / ``global_batch_size`` and
      ``dp_size`` as OpenRLHF's ``aggregate_loss``.

    ``forward`` returns ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``; the last two are
    None without IS correction (and with gspo), as in OpenRLHF. A batch with no valid token gives 0
    where OpenRLHF's mean is 0/0."""

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: float | None = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo",
                 is_correction_level: str = "off", is_correction_mode: str = "mask",
                 is_correction_gating: str = "ratio", is_correction_threshold=(0.5, 5.0)) -> None:
        super().__init__()
        if policy_loss_type not in POLICY_LOSS_TYPES:
            raise ValueError(f"policy_loss_type must be one of {POLICY_LOSS_TYPES} in "
                             f"rlkern.compat.openrlhf, got {policy_loss_type!r}")
        if policy_loss_type == "gspo" and not _has_sequence_ratio():
            raise ValueError("policy_loss_type='gspo' needs rlkern.ops.policy_loss(ratio_level='sequence'), "
                             "which this rlkern does not have")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        for value, name, choices in ((is_correction_level, "is_correction_level", IS_LEVELS),
                                     (is_correction_mode, "is_correction_mode", IS_MODES),
                                     (is_correction_gating, "is_correction_gating", IS_GATINGS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode=clip requires is_correction_level=token and "
                             "is_correction_gating=ratio")
        if (is_correction_gating != "ratio" and is_correction_level != "off"
                and is_correction_threshold[0] > 0):  # OpenRLHF 0.11.2's own check
            raise ValueError(f"is_correction_gating={is_correction_gating} takes an upper bound only "
                             "(a single delta)")
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        # GSPO aggregates per sequence, whatever token_level_loss says (as OpenRLHF's __init__)
        self.token_level_loss = False if policy_loss_type == "gspo" else token_level_loss
        self.policy_loss_type = policy_loss_type
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold

    def forward(self, log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor,
                action_mask: Tensor | None = None, rollout_log_probs: Tensor | None = None, dp_size: int = 1,
                batch_num_tokens: float | None = None, global_batch_size: float | None = None) -> tuple:
        return _policy_forward(self, _is_correction(self), log_probs, old_log_probs, advantages, action_mask,
                               rollout_log_probs, dp_size, batch_num_tokens, global_batch_size, True)


class ValueLoss(nn.Module):
    """Clipped value loss (OpenRLHF ``models/loss.py::ValueLoss``): ``0.5 * mean(max((v_clip - R)²,
    (v - R)²))`` with ``v_clip = old + clamp(v - old, ±clip_eps)``; unclipped when ``clip_eps`` is None.
    ``forward`` returns the loss only, as OpenRLHF's does. ``dp_size``, ``batch_num_tokens`` and
    ``global_batch_size`` (OpenRLHF 0.11) rescale to the global token / sequence count as its
    ``aggregate_loss`` does (see :func:`_global_scale`)."""

    def __init__(self, clip_eps: float | None = None, token_level_loss: bool = True) -> None:
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(self, values: Tensor, old_values: Tensor, returns: Tensor, action_mask: Tensor | None = None,
                dp_size: int = 1, batch_num_tokens: float | None = None,
                global_batch_size: float | None = None) -> Tensor:
        mask = _ones_like_mask(values) if action_mask is None else action_mask
        agg = "token-mean" if self.token_level_loss else "seq-mean-token-mean"
        if self.clip_eps is None:
            # Unclipped: with the old values set to the current ones, clip(v, v ± c) is v itself for
            # any c > 0, so both terms of the max are (v - R)^2 and the op gives OpenRLHF's loss.
            old_values, clip = values.detach(), 1.0
        else:
            clip = float(self.clip_eps)
        loss, _ = ops.value_loss(values, old_values, returns, mask, clip=clip, agg=agg)
        return loss * _global_scale(mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)


def _global_scale(mask: Tensor, token_level: bool, dp_size, batch_num_tokens, global_batch_size):
    """OpenRLHF 0.11 ``aggregate_loss`` divides by the global token count (``batch_num_tokens``) or
    sequence count (``global_batch_size``) and multiplies by ``dp_size``; rlkern's token-mean /
    seq-mean divide by this batch's count, so the ratio converts one into the other (1 when the
    global count is not given, OpenRLHF's local mean)."""
    if token_level and batch_num_tokens is not None:
        return mask.sum().clamp(min=1) / batch_num_tokens * dp_size
    if not token_level and global_batch_size is not None:
        return (mask.sum(-1) > 0).sum().clamp(min=1) / global_batch_size * dp_size
    return 1.0


def get_advantages_and_returns(values: Tensor, rewards: Tensor, action_mask: Tensor | None, gamma: float,
                               lambd: float) -> tuple[Tensor, Tensor]:
    """GAE as OpenRLHF computes it (``experience_maker.py::get_advantages_and_returns``): values and
    rewards are zeroed outside ``action_mask`` and then every position takes part in a plain reverse
    scan (a masked position has delta ``γ V_{t+1}``). That is rlkern's GAE on the masked inputs with an
    all-ones mask. Returns ``(advantages, returns)`` with ``returns = advantages + masked values``."""
    with torch.no_grad():
        if action_mask is not None:
            values = action_mask * values
            rewards = action_mask * rewards
        advantages, returns = ops.gae(rewards, values, _ones_like_mask(rewards), gamma=float(gamma),
                                      lam=float(lambd))
    return advantages.to(values.dtype), returns.to(values.dtype)


def get_cumulative_returns(rewards: Tensor, action_mask: Tensor | None, gamma: float) -> Tensor:
    """REINFORCE returns (``experience_maker.py::get_cumulative_returns``): rewards zeroed outside the
    mask, then ``G_t = r_t + γ G_{t+1}`` over every position with no reset."""
    with torch.no_grad():
        if action_mask is not None:
            rewards = action_mask * rewards
        returns = ops.discounted_returns(rewards, _ones_like_mask(rewards), gamma=float(gamma))
    return returns.to(rewards.dtype)


def shape_group_rewards(rewards: Tensor, n_samples_per_prompt: int, advantage_estimator: str) -> Tensor:
    """The group reward shaping of ``compute_advantages_and_returns`` (experience_maker.py) on
    ``rewards [B]``, grouped contiguously by ``n_samples_per_prompt``:
    ``rloo`` r - (sum_g - r) / (n - 1); ``reinforce_baseline`` / ``dr_grpo`` r - mean_g;
    ``group_norm`` (r - mean_g) / (std_g + 1e-9), unbiased std; ``gae`` / ``reinforce`` unchanged.
    A group whose rewards are all equal gets 0 under ``group_norm`` (OpenRLHF: the rounding error of
    its mean divided by 1e-9)."""
    if advantage_estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"advantage_estimator must be one of {GROUP_ESTIMATORS}, "
                         f"got {advantage_estimator!r}")
    if advantage_estimator in ("gae", "reinforce"):
        return rewards
    if advantage_estimator == "rloo":
        out = ops.group_advantages(rewards, group_size=n_samples_per_prompt, method="rloo")
    elif advantage_estimator == "group_norm":
        out = ops.group_advantages(rewards, group_size=n_samples_per_prompt, method="grpo",
                                   eps=_GROUP_NORM_EPS)
    else:
        out = ops.group_advantages(rewards, group_size=n_samples_per_prompt, method="reinforce_baseline")
    return out.to(rewards.dtype)


_warned: set[str] = set()


def _policy_fallback_reason(module) -> str | None:
    kind = getattr(module, "policy_loss_type", "ppo")
    if kind not in POLICY_LOSS_TYPES:
        return f"policy_loss_type={kind!r}"
    if kind == "gspo" and not _has_sequence_ratio():
        return "policy_loss_type='gspo' (this rlkern has no sequence ratio)"
    correction = _is_correction(module)
    return correction if isinstance(correction, str) else None


@wraps_original
def PolicyLoss_patch(original):  # noqa: N802 (named after the class it replaces)
    """What ``patch("openrlhf")`` installs for ``openrlhf.models.loss.PolicyLoss``: a subclass of the
    installed class (its ``__init__`` and options unchanged) whose ``forward`` runs rlkern for
    ``ppo`` and ``gspo``, with or without ``dual_clip``, and the train/rollout IS corrections TIS,
    IcePop and seq-mask-tis, in the option names of every release that has them (see
    :class:`PolicyLoss`):

    * 0.11.2: ``is_correction_level`` / ``_mode`` / ``_threshold`` / ``_gating`` (``ratio``, ``binary_kl``,
      ``tv``); returns ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``;
    * 0.9.5-0.11.0 (OpenRLHF main up to 2026-08): ``enable_vllm_is_correction``,
      ``vllm_is_correction_type`` tis / icepop / seq-mask-tis, ``vllm_is_truncated_threshold``
      ``(low, high)``; 0.8.11-0.9.4: the same flag with an upper bound only; returns the 4-tuple
      ``(loss, clip_ratio, ppo_kl, vllm_kl)``;
    * earlier releases (no rollout log-probs): ``(loss, clip_ratio, ppo_kl)``.

    The global normalisers (``dp_size``, ``batch_num_tokens``, ``global_batch_size``, 0.10.3 and
    later) are applied as OpenRLHF's ``aggregate_loss`` does. OpenRLHF's own forward runs, with one
    warning naming the option, for other ``policy_loss_type`` values. Differences: a batch with no
    valid token gives 0 where OpenRLHF's mean is 0/0; the PPO ratio is clamped to e^±20 as in 0.10.3+
    (earlier releases do not clamp), and releases before 0.10.3 average the per-sequence means over
    every row (NaN for a row with no valid token, which rlkern skips)."""
    init_params = inspect.signature(original.__init__).parameters
    forward_params = inspect.signature(original.forward).parameters
    arity = 5 if "is_correction_level" in init_params else 4 if "rollout_log_probs" in forward_params else 3
    extra_names = [n for n in ("rollout_log_probs", "dp_size", "batch_num_tokens", "global_batch_size")
                   if n in forward_params]
    # before 0.10.3 (no global normalisers), GSPO with the IS correction logs ppo_kl of its own ratio
    legacy = "dp_size" not in forward_params

    class PolicyLoss(original):
        def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
                    dp_size=1, batch_num_tokens=None, global_batch_size=None):
            reason = _policy_fallback_reason(self)
            if reason is not None:
                if reason not in _warned:
                    _warned.add(reason)
                    warnings.warn(f"rlkern.compat.patch('openrlhf'): PolicyLoss with {reason} is not "
                                  "fused by rlkern; OpenRLHF's own forward runs for it (said once)",
                                  RuntimeWarning, stacklevel=2)
                given = dict(rollout_log_probs=rollout_log_probs, dp_size=dp_size,
                             batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)
                return super().forward(log_probs, old_log_probs, advantages, action_mask,
                                       **{n: given[n] for n in extra_names})
            out = _policy_forward(self, _is_correction(self), log_probs, old_log_probs, advantages,
                                  action_mask, rollout_log_probs, dp_size, batch_num_tokens,
                                  global_batch_size, arity == 5, legacy)
            return out[:arity]

    PolicyLoss.__qualname__ = PolicyLoss.__name__ = original.__name__
    PolicyLoss.__module__ = original.__module__
    return PolicyLoss
