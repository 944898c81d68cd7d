"""Every rlkern op in plain PyTorch, written for clarity rather than speed.

This module is the oracle: tests run it in float64 and compare every kernel against it, and
benchmarks use it as the eager baseline. Inputs in bf16/fp16 are upcast to fp32; float64 inputs
stay float64. Each function documents only what differs from its public twin in ``rlkern.ops``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NEG_INF = float("-inf")


def _upcast(x: Tensor) -> Tensor:
    return x.double() if x.dtype == torch.float64 else x.float()


# ---------------------------------------------------------------------------------------------
# logprobs family: log-softmax at labels and entropy
# ---------------------------------------------------------------------------------------------


def _scaled_logits(logits: Tensor, temperature: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """z = logits / temperature, with rows whose every logit is -inf ("dead") zeroed out so that
    softmax stays finite; the caller overwrites their results. Returns (z, banned, dead).
    A tensor temperature holds one value per row (the logits' leading shape)."""
    z = _upcast(logits)
    z = z / (temperature.to(z.dtype).unsqueeze(-1) if isinstance(temperature, Tensor) else temperature)
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


# Estimator names the ops accept, and the peers' spellings of the same estimators (verl: "kl",
# "mse", "low_var_kl"; a "+" suffix is verl's straight-through variant: value of the estimator,
# gradient of k2).
KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "k1+", "abs+", "k2+", "k3+")
KL_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3", "kl+": "k1+", "mse+": "k2+", "low_var_kl+": "k3+"}
# k3 needs exp(ref - logp). The log-ratio entering the exp is always capped at 80 (e^80 ~ 5.5e34,
# float32 overflows at e^88.7), so value and gradient stay finite for any finite input; tokens
# beyond the cap get no gradient through k3, as under an explicit clamp.
KL_EXP_CAP = 80.0
# verl's kl_penalty(..., "low_var_kl"): log-ratio clamped to [-20, 20] before exp, result to [-10, 10].
VERL_KL_CLAMP = (20.0, 10.0)


def kl_bounds(clamp) -> tuple[float, float, float]:
    """(lo, hi, value_bound) for k3 from ``clamp``: None (no clamp), True (verl's (20, 10)) or a
    pair (log-ratio bound, value bound), either of which may be ``inf``."""
    if clamp is None or clamp is False:
        ratio_bound, value_bound = float("inf"), float("inf")
    elif clamp is True:
        ratio_bound, value_bound = VERL_KL_CLAMP
    else:
        ratio_bound, value_bound = (float(c) for c in clamp)
    return -ratio_bound, min(ratio_bound, KL_EXP_CAP), value_bound


def kl(logp: Tensor, ref_logp: Tensor, estimator: str = "k3", *, clamp=None) -> Tensor:
    """Per-token KL estimate between the policy (logp) and the reference (ref_logp), Schulman's
    estimators of KL(pi || ref) from samples of pi, with r = ref_logp - logp:
    k1 = -r, abs = |r|, k2 = r^2 / 2, k3 = e^r - r - 1 (>= 0, unbiased, low variance).

    k3 is written as expm1(r) - r, which is exact for small |r| where e^r - 1 - r cancels. With
    ``clamp`` the log-ratio is clamped before the exp and the value after it, as verl does; the
    gradient is that of the clamped expression (zero where either clamp is active).
    """
    estimator = KL_ALIASES.get(estimator, estimator)
    if estimator.endswith("+"):
        # Straight-through (verl): forward k, backward k2.
        k2 = kl(logp, ref_logp, "k2")
        value = kl(logp, ref_logp, estimator[:-1], clamp=clamp)
        return k2 - k2.detach() + value.detach()
    d = _upcast(logp) - _upcast(ref_logp)
    if estimator == "k1":
        return d
    if estimator == "abs":
        return d.abs()
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator != "k3":
        raise ValueError(f"unknown KL estimator {estimator!r}")
    lo, hi, value_bound = kl_bounds(clamp)
    # torch.clamp passes no gradient where its input is NaN (its bound tests fail), which would make
    # a NaN log-ratio's gradient 0: NaN lanes skip both clamps, so value and gradient are NaN.
    nan = d.isnan()
    r = torch.where(nan, -d, (-d).clamp(lo, hi))
    value = torch.expm1(r) - r
    if value_bound == float("inf"):
        return value
    return torch.where(nan, value, value.clamp(-value_bound, value_bound))


def token_rewards(
    scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, *, kl_coef: float, estimator: str = "k1",
    clamp=None,
) -> Tensor:
    """rewards[..., t] = -kl_coef * kl(logp, ref_logp)[..., t] where mask, 0 elsewhere, plus
    scores[...] at the last position where mask is set (a row without one gets no score)."""
    valid = mask.bool()
    penalty = -kl_coef * kl(logp, ref_logp, estimator, clamp=clamp)
    rewards = torch.where(valid, penalty, torch.zeros_like(penalty))
    length = mask.shape[-1]
    if length == 0:
        return rewards.detach()
    positions = torch.arange(length, device=mask.device)
    last = torch.where(valid, positions, -1).amax(dim=-1, keepdim=True)
    score = _upcast(scores).unsqueeze(-1).to(rewards.dtype)
    return (rewards + torch.where(positions == last, score, torch.zeros_like(score))).detach()


# ---------------------------------------------------------------------------------------------
# gae family: reverse scans (gae, discounted_returns)
# ---------------------------------------------------------------------------------------------


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation, verl's masked reverse scan (compute_gae_advantage_return,
    without its final whitening). Walking t = T-1 .. 0 with next_value = running = 0:

        delta = r_t + gamma * next_value - v_t
        a = delta + gamma * lam * running
        where mask_t: next_value = v_t, running = a      (else both carry through unchanged)
        advantages_t = running

    so a masked position (padding, or an observation/tool token inside a multi-turn response)
    takes no part in the recursion and holds the running advantage of the next valid token.
    returns = advantages + values. No gradient (outputs are detached)."""
    r, v, valid = _upcast(rewards), _upcast(values), mask.bool()
    r, v = torch.broadcast_tensors(r, v)
    dtype = torch.promote_types(r.dtype, v.dtype)
    r, v = r.to(dtype), v.to(dtype)
    advantages = torch.empty_like(r)
    next_value = torch.zeros_like(r[..., 0]) if r.shape[-1] else None
    running = torch.zeros_like(r[..., 0]) if r.shape[-1] else None
    for t in reversed(range(r.shape[-1])):
        delta = r[..., t] + gamma * next_value - v[..., t]
        a = delta + gamma * lam * running
        next_value = torch.where(valid[..., t], v[..., t], next_value)
        running = torch.where(valid[..., t], a, running)
        advantages[..., t] = running
    return advantages.detach(), (advantages + v).detach()


def discounted_returns(rewards: Tensor, mask: Tensor, *, gamma: float) -> Tensor:
    """REINFORCE++ returns, verl's compute_reinforce_plus_plus_outcome_advantage without its
    whitening: walking t = T-1 .. 0, running = r_t + gamma * running; returns_t = running; then
    running is reset to 0 where mask_t is 0, so each sequence's return stops at its own end and
    a padding position holds only its own reward plus what follows it."""
    r, valid = _upcast(rewards), mask.bool()
    returns = torch.empty_like(r)
    running = torch.zeros_like(r[..., 0]) if r.shape[-1] else None
    for t in reversed(range(r.shape[-1])):
        running = r[..., t] + gamma * running
        returns[..., t] = running
        running = torch.where(valid[..., t], running, torch.zeros_like(running))
    return returns.detach()


# ---------------------------------------------------------------------------------------------
# masked family: masked_sum, masked_mean, masked_var, masked_whiten
# ---------------------------------------------------------------------------------------------


def _masked_values(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(x upcast with masked-out entries replaced by 0, bool mask): padding never enters a
    statistic, even when it holds inf or NaN."""
    valid = mask.bool()
    x = _upcast(x)
    return torch.where(valid, x, torch.zeros_like(x)), valid


def masked_sum(x: Tensor, mask: Tensor, *, dim: int | None = None) -> Tensor:
    """Sum of x where mask is set: over everything (dim=None, a 0-d tensor) or along ``dim``."""
    xs, _ = _masked_values(x, mask)
    return xs.sum() if dim is None else xs.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, *, dim: int | None = None) -> Tensor:
    """masked_sum / number of masked elements (NaN for an empty selection: the ops refuse those)."""
    xs, valid = _masked_values(x, mask)
    if dim is None:
        return xs.sum() / valid.sum().to(xs.dtype)
    return xs.sum(dim=dim) / valid.sum(dim=dim).to(xs.dtype)


def masked_var(x: Tensor, mask: Tensor, *, dim: int | None = None, unbiased: bool = True) -> Tensor:
    """Two-pass variance over the masked elements: sum (x - mean)^2 / (n - 1) (unbiased, Bessel's
    correction, verl/TRL's default) or / n."""
    xs, valid = _masked_values(x, mask)
    keep = dim is not None
    n = valid.sum(dim=dim, keepdim=keep).to(xs.dtype) if keep else valid.sum().to(xs.dtype)
    mean = (xs.sum(dim=dim, keepdim=True) if keep else xs.sum()) / n
    centered = torch.where(valid, xs - mean, torch.zeros_like(xs))
    ss = centered.square().sum(dim=dim, keepdim=keep) if keep else centered.square().sum()
    var = ss / (n - 1 if unbiased else n)
    return var.squeeze(dim) if keep else var


def masked_whiten(
    x: Tensor, mask: Tensor, *, dim: int | None = None, shift_mean: bool = True, unbiased: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """(x - mean) * rsqrt(var + eps) at every position (masked-out ones included), with mean and
    var (unbiased by default) over the masked elements; shift_mean=False adds the mean back (verl /
    TRL masked_whiten). The gradient flows through mean and var."""
    keep = {} if dim is None else {"dim": dim}
    mean = masked_mean(x, mask, **keep)
    var = masked_var(x, mask, unbiased=unbiased, **keep)
    if dim is not None:
        mean, var = mean.unsqueeze(dim), var.unsqueeze(dim)
    whitened = (_upcast(x) - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


# ---------------------------------------------------------------------------------------------
# losses family: policy_loss, value_loss, grpo_loss
# ---------------------------------------------------------------------------------------------

POLICY_AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _rows(x: Tensor) -> Tensor:
    """[..., T] -> [R, T]: every leading index is one sequence."""
    return x.reshape(x.shape[:-1].numel(), x.shape[-1])


def aggregate_loss(per_token: Tensor, mask: Tensor, agg: str, *, max_completion_length: int | None = None,
                   num_items_in_batch: float | None = None) -> Tensor:
    """Reduces a per-token loss [B, T] to a scalar, reading only positions where mask is true.

    ``agg`` is a policy_loss mode or a grpo_loss ``loss_type``; N = valid tokens, n_b = valid tokens
    of row b, S = rows with n_b > 0, and every denominator is clamped to >= 1 (all padding -> 0):
      token-mean, bnpo         sum / N                           (verl masked_mean; TRL bnpo)
      seq-mean-token-sum       sum_b (sum_t l_bt) / S            (verl: fully masked rows excluded)
      seq-mean-token-mean      sum_b (sum_t l_bt / n_b) / S
      seq-mean-token-sum-norm  sum / T                           (verl: divisor is the padded length)
      grpo                     sum_b (sum_t l_bt / n_b) / B      (TRL: mean over all rows)
      dr_grpo                  sum / (B * max_completion_length) (default T)
      dapo                     sum / num_items_in_batch          (default N)
    """
    l2, m2 = _rows(per_token), _rows(mask).bool()
    rows, length = l2.shape
    masked = torch.where(m2, l2, torch.zeros_like(l2))
    row_sum, row_n = masked.sum(-1), m2.sum(-1).to(l2.dtype)
    n_tokens, live = row_n.sum(), (row_n > 0).sum().to(l2.dtype)
    row_mean = row_sum / row_n.clamp(min=1)
    if agg in ("token-mean", "bnpo"):
        return row_sum.sum() / n_tokens.clamp(min=1)
    if agg == "seq-mean-token-sum":
        return row_sum.sum() / live.clamp(min=1)
    if agg == "seq-mean-token-mean":
        return row_mean.sum() / live.clamp(min=1)
    if agg == "seq-mean-token-sum-norm":
        return row_sum.sum() / max(length, 1)
    if agg == "grpo":
        return row_mean.sum() / max(rows, 1)
    if agg == "dr_grpo":
        width = length if max_completion_length is None else max_completion_length
        return row_sum.sum() / max(rows * width, 1)
    if agg == "dapo":
        if num_items_in_batch is None:
            return row_sum.sum() / n_tokens.clamp(min=1)
        return row_sum.sum() / max(num_items_in_batch, 1)
    raise ValueError(f"agg must be one of {POLICY_AGGS + GRPO_LOSS_TYPES}, got {agg!r}")


def _zero_padding(mask: Tensor, *tensors: Tensor) -> list[Tensor]:
    """Zeroes masked-out positions first, so that padding holding NaN / inf reaches neither the loss
    nor (through 0 * NaN in a backward formula) the gradient."""
    m = mask.bool()
    return [torch.where(m if t.shape == m.shape else m.any(-1), t, torch.zeros_like(t)) for t in tensors]


def _masked_fraction(flag: Tensor, mask: Tensor, dtype: torch.dtype, surrogate: Tensor) -> Tensor:
    """Share of valid tokens where ``flag`` holds. A flag compares values, and a comparison with NaN
    is False: a valid token whose ``surrogate`` (the clipped term the flag describes) is NaN counts
    as NaN instead, so the fraction is NaN, as the loss is (issue 9)."""
    m = mask.bool()
    f = flag.to(dtype).masked_fill(surrogate.isnan(), math.nan)
    return torch.where(m, f, torch.zeros_like(f)).sum() / m.sum().clamp(min=1).to(dtype)


def _clamp_keep_nan(x: Tensor, low: float, high: float) -> Tensor:
    """torch.clamp whose NaN input also gets a NaN gradient: torch.clamp's backward passes gradient
    only where low <= x <= high, which a NaN fails, so its gradient would be 0."""
    return torch.where(x.isnan(), x, x.clamp(low, high))


def _nan_tokens_get_nan_grad(per_token: Tensor, x: Tensor) -> Tensor:
    """per_token unchanged, but d per_token / d x is NaN wherever per_token is NaN. torch.clamp,
    torch.maximum and torch.minimum give a NaN operand a zero or finite gradient share, which would
    leave a finite gradient under a NaN loss (e.g. a NaN old value: the clipped branch is NaN and
    gets no gradient, the unclipped one a finite one). Elsewhere the added branch gets gradient 0."""
    bad = per_token.detach().isnan()
    nan_at_bad = torch.where(bad, math.nan, 0.0).to(per_token.dtype)
    return torch.where(bad, per_token + x * nan_at_bad, per_token)


def _ppo_clip_terms(logp, old_logp, advantages, clip_low, clip_high):
    """verl's compute_policy_loss (vanilla) per-token maths. Returns (clip1, ratio, log_ratio, a)."""
    log_ratio = _clamp_keep_nan(logp - old_logp, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    a = advantages if advantages.shape == logp.shape else advantages.unsqueeze(-1).expand_as(logp)
    pg1 = -a * ratio
    pg2 = -a * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(pg1, pg2), pg1, pg2, ratio, log_ratio, a


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float = 0.2,
                clip_high: float = 0.2, dual_clip: float | None = None, agg: str = "token-mean",
                weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip as verl's compute_policy_loss_vanilla: the loss per token is
    max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high)), then min(., -A dual_clip) where A < 0,
    times ``weights``, aggregated per ``agg``. Stats are masked token means. Only ``logp`` gets a
    gradient: old_logp, advantages and weights are constants (detached), as in verl."""
    logp, old_logp, advantages = _upcast(logp), _upcast(old_logp).detach(), _upcast(advantages).detach()
    logp, old_logp, advantages = _zero_padding(mask, logp, old_logp, advantages)
    clip1, pg1, pg2, ratio, log_ratio, a = _ppo_clip_terms(logp, old_logp, advantages, clip_low, clip_high)
    loss = clip1
    dual = torch.zeros_like(mask, dtype=torch.bool)
    if dual_clip is not None:
        pg3 = -a * dual_clip
        loss = torch.where(a < 0, torch.minimum(pg3, clip1), clip1)
        dual = (clip1 > pg3) & (a < 0)
    if weights is not None:
        # Zero-padded too: 0 * NaN from a padding weight would reach the gradient.
        loss = loss * _zero_padding(mask, _upcast(weights).detach())[0]
    surrogate = clip1.detach()
    stats = {
        "clip_frac": _masked_fraction(pg2 > pg1, mask, logp.dtype, surrogate),
        "clip_frac_lower": _masked_fraction(dual, mask, logp.dtype, surrogate),
        "approx_kl": aggregate_loss(-log_ratio.detach(), mask, "token-mean"),
    }
    return aggregate_loss(_nan_tokens_get_nan_grad(loss, logp), mask, agg), stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float = 0.2,
               agg: str = "token-mean") -> tuple[Tensor, dict[str, Tensor]]:
    """verl's compute_value_loss: 1/2 max((v - R)^2, (clamp(v, v_old - clip, v_old + clip) - R)^2)
    aggregated per ``agg``; only ``values`` gets a gradient (old_values and returns are detached)."""
    v, v_old, ret = _zero_padding(mask, _upcast(values), _upcast(old_values).detach(),
                                  _upcast(returns).detach())
    v_clipped = torch.clamp(v, v_old - clip, v_old + clip)
    l1, l2 = (v - ret) ** 2, (v_clipped - ret) ** 2
    per_token = torch.maximum(l1, l2)
    loss = 0.5 * aggregate_loss(_nan_tokens_get_nan_grad(per_token, v), mask, agg)
    return loss, {"clip_frac": _masked_fraction(l2 > l1, mask, v.dtype, per_token.detach())}


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor, mask: Tensor, *,
              beta: float = 0.04, clip_low: float = 0.2, clip_high: float = 0.2, loss_type: str = "grpo",
              max_completion_length: int | None = None,
              num_items_in_batch: float | None = None,
              use_bias_correction_kl: bool = False,
              weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """TRL's GRPOTrainer._compute_loss (token-level importance sampling): -min(r A, clamp(r) A) + beta k3,
    with k3 = e^d - d - 1, d = ref - logp; both log-ratios clamped to [-20, 20] before exp (TRL does
    not clamp: identical whenever |log-ratio| <= 20). With ``use_bias_correction_kl`` the KL term is
    k3 * r (TRL >= 1.x ``use_bias_correction_kl``), and the ``kl`` stat reports it. ``weights``
    multiply the clipped surrogate only, before the KL term is added (TRL's entropy / off-policy
    masks and vLLM IS ratios). Only ``logp`` gets a gradient."""
    logp = _upcast(logp)
    old_logp, ref_logp, advantages = (_upcast(t).detach() for t in (old_logp, ref_logp, advantages))
    logp, old_logp, ref_logp, advantages = _zero_padding(mask, logp, old_logp, ref_logp, advantages)
    clip1, pg1, pg2, ratio, log_ratio, a = _ppo_clip_terms(logp, old_logp, advantages, clip_low, clip_high)
    d = _clamp_keep_nan(ref_logp - logp, -20.0, 20.0)
    k3 = torch.exp(d) - d - 1
    if use_bias_correction_kl:
        k3 = k3 * ratio
    surrogate = clip1.detach()  # before the weights: the clip flags do not read them
    if weights is not None:
        clip1 = clip1 * _zero_padding(mask, _upcast(weights).detach())[0]
    # beta * k3 with beta = 0 and a NaN ref_logp is NaN: NaN in an input always reaches the loss.
    per_token = _nan_tokens_get_nan_grad(clip1 + beta * k3, logp)
    low, high = (ratio < 1 - clip_low) & (a < 0), (ratio > 1 + clip_high) & (a > 0)
    stats = {
        "kl": aggregate_loss(k3.detach(), mask, "token-mean"),
        "clip_ratio": _masked_fraction(low | high, mask, logp.dtype, surrogate),
        "clip_ratio_low": _masked_fraction(low, mask, logp.dtype, surrogate),
        "clip_ratio_high": _masked_fraction(high, mask, logp.dtype, surrogate),
        "approx_kl": aggregate_loss(-log_ratio.detach(), mask, "token-mean"),
    }
    loss = aggregate_loss(per_token, mask, loss_type, max_completion_length=max_completion_length,
                          num_items_in_batch=num_items_in_batch)
    return loss, stats



# ---------------------------------------------------------------------------------------------
# advantages family: group_advantages; dpo family: dpo_loss
# ---------------------------------------------------------------------------------------------

ADVANTAGE_METHODS = ("grpo", "rloo", "reinforce_baseline", "winrate")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def group_advantages(scores: Tensor, group_ids: Tensor, *, method: str = "grpo", eps: float = 1e-6,
                     scale_by_std: bool = True) -> Tensor:
    """Outcome advantages within groups, one Python iteration per group (the oracle's clarity, not
    the op's speed). ``group_ids``: [B] integers. A group of one, or whose scores are all equal,
    gets advantage 0. For a group of n >= 2 scores r with mean m and unbiased std s:
      grpo                r_i - m, divided by (s + eps) when scale_by_std      (verl / TRL)
      rloo                r_i - mean_{j != i} r_j = n / (n - 1) (r_i - m)       (verl rloo)
      reinforce_baseline  r_i - m
      winrate             1/(n - 1) sum_{j != i} sigmoid(r_i - r_j) - 1/2       (P_win, centred)
    """
    r = _upcast(scores)
    out = torch.zeros_like(r)
    for g in torch.unique(group_ids).tolist():
        idx = (group_ids == g).nonzero().squeeze(-1)
        x = r[idx]
        n = x.numel()
        if n < 2 or bool((x == x[0]).all()):
            continue
        m = x.mean()
        if method == "grpo":
            out[idx] = (x - m) / (x.std() + eps) if scale_by_std else x - m
        elif method == "rloo":
            out[idx] = torch.stack([x[i] - torch.cat([x[:i], x[i + 1:]]).mean() for i in range(n)])
        elif method == "reinforce_baseline":
            out[idx] = x - m
        elif method == "winrate":
            pairs = torch.sigmoid(x[:, None] - x[None, :])
            out[idx] = (pairs.sum(1) - 0.5) / (n - 1) - 0.5  # the diagonal is sigmoid(0) = 1/2
        else:
            raise ValueError(f"method must be one of {list(ADVANTAGE_METHODS)}, got {method!r}")
    return out


def dpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor,
             *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """TRL's DPOTrainer.dpo_loss, written as TRL writes it (F.logsigmoid), with z the log-ratio margin:
      sigmoid  -(1 - ls) logsigmoid(beta z) - ls logsigmoid(-beta z)      (cDPO label smoothing)
      ipo      (z - 1 / (2 beta))^2
      hinge    relu(1 - beta z)
      robust   (-(1 - ls) logsigmoid(beta z) + ls logsigmoid(-beta z)) / (1 - 2 ls)
    Rewards are beta (logp - ref_logp), detached; stats are batch means."""
    c, r, rc, rr = (_upcast(t) for t in (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps))
    z = (c - r) - (rc - rr)
    ls = label_smoothing
    logsig = torch.nn.functional.logsigmoid
    # The ls terms are left out when ls = 0: at an infinite margin (a -inf log-prob) they are
    # 0 * inf = NaN, where the loss's limit is finite.
    if loss_type == "sigmoid":
        losses = -logsig(beta * z) if ls == 0 else -logsig(beta * z) * (1 - ls) - logsig(-beta * z) * ls
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    elif loss_type == "robust":
        losses = (-logsig(beta * z) if ls == 0
                  else (-(1 - ls) * logsig(beta * z) + ls * logsig(-beta * z)) / (1 - 2 * ls))
    else:
        raise ValueError(f"loss_type must be one of {list(DPO_LOSS_TYPES)}, got {loss_type!r}")
    chosen_rewards = beta * (c - rc).detach()
    rejected_rewards = beta * (r - rr).detach()
    stats = {
        "chosen_rewards": chosen_rewards.mean(),
        "rejected_rewards": rejected_rewards.mean(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).to(z.dtype).mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
    }
    return losses.mean(), stats



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


# ---------------------------------------------------------------------------------------------
# verl_advantages family: outcome_advantages, optimal_token_baseline (verl 0.9.1's conventions)
# ---------------------------------------------------------------------------------------------

OUTCOME_METHODS = ("grpo", "mean", "rloo", "rloo_vectorized", "opo", "passk")


def outcome_advantages(scores: Tensor, group_ids: Tensor, *, method: str = "grpo", eps: float = 1e-6,
                       scale_by_std: bool = True, weights: Tensor | None = None) -> Tensor:
    """verl's per-response outcome advantages, one Python iteration per group (see
    rlkern.ops.outcome_advantages for the methods). ``scores``: [B]; ``group_ids``: [B] integers."""
    if method not in OUTCOME_METHODS:
        raise ValueError(f"method must be one of {list(OUTCOME_METHODS)}, got {method!r}")
    s = _upcast(scores)
    out = torch.zeros_like(s)
    for g in torch.unique(group_ids).tolist():
        idx = (group_ids == g).nonzero().squeeze(-1)
        x, n = s[idx], idx.numel()
        if method == "passk":
            if n < 2:
                continue
            top2, where = torch.topk(x, 2)
            gap = top2[0] - top2[1]
            out[idx[where[0]]] = gap / (x.std() + eps) if scale_by_std else gap
        elif method == "opo":
            w = weights[idx].to(s.dtype)
            out[idx] = x if n == 1 else x - (w * x).sum() / w.sum()
        elif method in ("rloo", "rloo_vectorized"):
            if n == 1:
                out[idx] = x if method == "rloo" else 0.0
            else:
                out[idx] = torch.stack([x[i] - torch.cat([x[:i], x[i + 1:]]).mean() for i in range(n)])
        else:  # grpo, mean: a group of one has mean 0 and std 1
            mean, std = (x.mean(), x.std()) if n > 1 else (x.new_zeros(()), x.new_ones(()))
            out[idx] = (x - mean) / (std + eps) if method == "grpo" and scale_by_std else x - mean
    return out


def optimal_token_baseline(rewards: Tensor, mask: Tensor, group_ids: Tensor, old_log_probs: Tensor,
                           sum_pi_squared: Tensor, *, rollout_is_weights: Tensor | None = None,
                           handle_zero_tail: bool = True, eps: float = 1e-8,
                           multi_turn: bool = False) -> tuple[Tensor, Tensor]:
    """verl's optimal token baseline (see rlkern.ops.optimal_token_baseline), row by row and group by
    group: with ``multi_turn`` each row's valid tokens are first packed to the left."""
    r, valid = _upcast(rewards), mask.bool()
    m = valid.to(r.dtype)
    returns = torch.stack([torch.stack([(r[i, t:] * m[i, t:]).sum() for t in range(r.shape[1])])
                           for i in range(r.shape[0])]) if r.numel() else torch.zeros_like(r)
    w = 1 - 2 * _upcast(old_log_probs).exp() + _upcast(sum_pi_squared)
    if rollout_is_weights is not None:
        w = w * _upcast(rollout_is_weights) ** 2
    big_w = (w * m).cumsum(-1)
    lengths = valid.sum(-1)
    if multi_turn:  # pack each row's valid tokens to the left; the step is the rank among them
        cols = [valid[i].nonzero().squeeze(-1) for i in range(r.shape[0])]
    else:
        cols = [torch.arange(r.shape[1]) for _ in range(r.shape[0])]
    advantages = torch.zeros_like(r)
    for g in torch.unique(group_ids).tolist():
        rows = [i for i in (group_ids == g).nonzero().squeeze(-1).tolist()
                if not multi_turn or lengths[i] > 0]
        steps = r.shape[1]
        num, den = r.new_zeros(steps), r.new_zeros(steps)
        for i in rows:
            c = cols[i]
            num[:c.numel()] += returns[i, c] * big_w[i, c] * m[i, c]
            den[:c.numel()] += big_w[i, c] * m[i, c]
        base = num / (den + eps) if len(rows) > 1 else torch.zeros_like(num)
        ordered = sorted(int(lengths[i]) for i in rows)
        for i in rows:
            b = base.clone()
            if handle_zero_tail and len(rows) > 1 and lengths[i] == ordered[-1] > ordered[-2]:
                b[ordered[-2]:] = 0.0
            c = cols[i]
            advantages[i, c] = (returns[i, c] - b[:c.numel()]) * m[i, c]
    return advantages, returns


# ---------------------------------------------------------------------------------------------
# rollout_correction family: importance weights and rejection between the rollout engine and
# the trainer (verl TIS / IcePop / RS, TRL's vLLM IS modes, OpenRLHF's tis / icepop / seq-mask-tis)
# ---------------------------------------------------------------------------------------------


def _rc_stat(kind: str, d: float) -> float:
    d = min(max(d, -20.0), 20.0)
    return {"k1": -d, "k2": 0.5 * d * d, "k3": math.expm1(d) - d}[kind]


def rollout_correction(log_prob: Tensor, rollout_log_prob: Tensor | None, mask: Tensor, *,
                       level: str | None = "token", mode: str = "truncate", upper: float | None = 2.0,
                       lower: float | None = None, log_clamp: float | None = 20.0, padding: str = "zero",
                       seq_gate: tuple[float, float] | None = None,
                       rs: list[tuple[str, float | None, float]] | None = None,
                       ) -> tuple[Tensor | None, Tensor]:
    """(weights, kept mask) of rlkern.ops.rollout_correction, one row and one token at a time in Python
    floats; ``rs`` is the parsed option list of ``rlkern.ops.rollout_correction.parse_rs``. No metrics
    (tests compare those with verl's own functions)."""
    d_all = _upcast(log_prob).double()
    if rollout_log_prob is not None:
        d_all = d_all - _upcast(rollout_log_prob).double()
    shape = d_all.shape
    d_rows = d_all.reshape(-1, shape[-1]).tolist() if d_all.numel() else []
    m_rows = (mask != 0).reshape(-1, shape[-1]).tolist() if d_all.numel() else []
    weights, keeps = [], []
    for d, m in zip(d_rows, m_rows, strict=True):
        if padding == "trl":
            d = [0.0 if math.isnan(x * mv) else x * mv for x, mv in zip(d, m, strict=True)]
        clamp = (lambda x: x) if log_clamp is None else (lambda x: min(max(x, -log_clamp), log_clamp))
        if level == "sequence":
            total = sum(x for x, mv in zip(d, m, strict=True) if mv or padding == "trl")
            logs = [total] * len(d)
        else:
            logs = d
        row = []
        for x, mv in zip(logs, m, strict=True):
            x = clamp(x)
            w = math.inf if x >= 709 else math.exp(x)
            if padding == "zero" and not mv:
                w = 0.0
            if mode == "truncate":
                w = w if lower is None or math.isnan(w) else max(w, lower)
                w = w if upper is None or math.isnan(w) else min(w, upper)
            elif mode == "mask":
                inside = (lower is None or w >= lower) and (upper is None or w <= upper)
                w = w if inside else (w * 0.0 if padding == "raw" else 0.0)
            row.append(w)
        if seq_gate is not None:
            n = sum(m)
            geo = math.exp(sum(x for x, mv in zip(d, m, strict=True) if mv) / n) if n else math.nan
            if not seq_gate[0] <= geo <= seq_gate[1]:
                row = [w * 0.0 for w in row]
        weights.append(row)
        keep = [True] * len(d)
        for option, lo, hi in rs or []:
            kind = option[-2:]
            bounds = (math.log(lo), math.log(hi)) if kind == "k1" else (-math.inf, hi)
            stats = [_rc_stat(kind, x) for x in d]
            valid = [s for s, mv in zip(stats, m, strict=True) if mv]
            if option.startswith("token"):
                ok = [bounds[0] <= s <= bounds[1] for s in stats]
            else:
                if option.startswith("seq_sum"):
                    s = sum(valid)
                elif option.startswith("seq_mean"):
                    s = sum(valid) / len(valid) if valid else 0.0
                else:
                    s = max(valid) if valid else 0.0
                ok = [bounds[0] <= s <= bounds[1]] * len(d)
            keep = [a and b for a, b in zip(keep, ok, strict=True)]
        keeps.append(keep)
    dtype = torch.float64
    w_out = None if level is None else torch.tensor(weights, dtype=dtype).reshape(shape)
    k_out = torch.tensor(keeps, dtype=torch.bool).reshape(shape) if keeps else torch.ones(shape,
                                                                                          dtype=torch.bool)
    new_mask = mask if not rs else (mask * k_out.to(torch.float64 if mask.dtype == torch.float64
                                                    else torch.float32)).to(mask.dtype)
    return w_out, new_mask


# ---------------------------------------------------------------------------------------------
# logprobs family (continued): sum of squared probabilities
# ---------------------------------------------------------------------------------------------


def sum_p2(logits: Tensor, *, temperature: float | Tensor = 1.0) -> Tensor:
    """sum_v softmax(logits / temperature)_v^2 per row: verl 0.9.1's ``sum_pi_squared``
    (verl/utils/torch_functional.py::calculate_sum_pi_squared_from_logits) and the exp of TRL 1.16's
    ``log_sum_sq_probs`` (trl/kernels/chunked_logprob.py::ChunkedLogProbFunction). 0 for a row whose
    logits are all -inf (as its entropy); NaN for a row holding a NaN or +inf logit."""
    z, _, dead = _scaled_logits(logits, temperature)
    p = torch.softmax(z, dim=-1)
    return (p * p).sum(dim=-1).masked_fill(dead, 0.0)


# ---------------------------------------------------------------------------------------------
# losses family: policy-loss variants (issue 13): the per-token surrogate (ppo / cispo / cispo_cap /
# sapo / gpg) and the importance-ratio level (token / sequence / sequence_token), for policy_loss
# (verl numerics) and grpo_loss (TRL 1.16 GRPOTrainer._compute_loss numerics).
# ---------------------------------------------------------------------------------------------

POLICY_VARIANTS = ("ppo", "cispo", "cispo_cap", "sapo", "gpg", "gmpo", "dro")
RATIO_LEVELS = ("token", "sequence", "sequence_token")
GRPO_VARIANT_LOSS_TYPES = GRPO_LOSS_TYPES + ("cispo", "sapo", "luspo", "vespo")
# TRL get_gamma_weights: log w is clamped to [log(1e-8), 20] (and so is each log IS ratio).
VESPO_LOG_W_MIN = math.log(1e-8)
GRPO_IS_LEVELS = ("token", "sequence")


def _log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, level: str) -> tuple[Tensor, Tensor]:
    """(log r broadcastable to [B, T], approx-KL terms old - logp per token).

    token: clamp(logp - old, -20, 20) (verl compute_policy_loss_vanilla; TRL does not clamp).
    sequence: s_b = masked row mean of logp - old (TRL _compute_loss, importance_sampling_level=
      "sequence": (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)), clamped to +-20 like the
      token level; the gradient flows through the mean.
    sequence_token: verl core_algos.py::compute_policy_loss_gspo: logp - sg(logp) + sg(s_b), then
      clamp(max=10): the value is the row's, the gradient per token (d r / d logp_t = r_b).
    The approx-KL terms are clamped at the token level only (verl gspo's ppo_kl is unclamped)."""
    diff = logp - old_logp
    if level == "token":
        lr = _clamp_keep_nan(diff, -20.0, 20.0)
        return lr, -lr
    m = mask.bool()
    s = torch.where(m, diff, torch.zeros_like(diff)).sum(-1) / m.sum(-1).clamp(min=1).to(diff.dtype)
    if level == "sequence":
        return _clamp_keep_nan(s, -20.0, 20.0).unsqueeze(-1), -diff
    lr = logp - logp.detach() + s.detach().unsqueeze(-1)
    return torch.where(lr.isnan(), lr, lr.clamp(max=10.0)), -diff


def _variant_terms(variant, logp, ratio, a, *, clip_low, clip_high, delta, tau_pos, tau_neg):
    """Per-token surrogate and its clip flags. Returns (loss, flags dict, surrogate for NaN flags).

    ppo: max(-A r', -A clamp(r, 1 - clip_low, 1 + clip_high)), r' = clamp(r, max=delta) (TRL
      _compute_loss: `coef_1 = torch.clamp(coef_1, max=self.args.delta)`; also what its clip flags read).
    cispo: -sg(clamp(r, 1 - clip_low, 1 + clip_high)) A logp (verl compute_policy_loss_cispo).
    cispo_cap: -sg(clamp(r, max=clip_high)) A logp (TRL loss_type="cispo": clip_high = epsilon_high).
    sapo: -sigmoid(tau (r - 1)) 4 / tau A, tau = tau_pos if A > 0 else tau_neg (verl
      compute_policy_loss_sapo, TRL loss_type="sapo").
    gpg: -logp A (verl compute_policy_loss_gpg)."""
    zero = torch.zeros_like(ratio, dtype=torch.bool)
    if variant == "ppo":
        r1 = ratio if delta is None else torch.where(ratio.isnan(), ratio, ratio.clamp(max=delta))
        pg1, pg2 = -a * r1, -a * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        loss = torch.maximum(pg1, pg2)
        flags = {"clipped": pg2 > pg1, "low": (r1 < 1 - clip_low) & (a < 0),
                 "high": (r1 > 1 + clip_high) & (a > 0)}
        return loss, flags, loss.detach()
    if variant == "cispo":
        c = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high).detach()
        loss = -c * a * logp
        return loss, {"clipped": ratio != c, "low": zero, "high": zero}, loss.detach()
    if variant == "cispo_cap":
        c = torch.clamp(ratio, max=clip_high).detach()
        loss = -c * a * logp
        cap = (ratio > clip_high) & (a > 0)
        return loss, {"clipped": cap, "low": zero, "high": cap}, loss.detach()
    if variant == "sapo":
        tau = torch.where(a > 0, tau_pos, tau_neg).to(ratio.dtype)
        loss = -(torch.sigmoid(tau * (ratio - 1)) * 4 / tau) * a
        return loss, {"clipped": zero, "low": zero, "high": zero}, loss.detach()
    if variant == "gpg":
        loss = -logp * a
        return loss, {"clipped": zero, "low": zero, "high": zero}, loss.detach()
    raise ValueError(f"variant must be one of {list(POLICY_VARIANTS)}, got {variant!r}")


def _flag_fraction(flag: Tensor, mask: Tensor, dtype: torch.dtype, surrogate: Tensor,
                   per_row: bool) -> Tensor:
    """_masked_fraction, or with ``per_row`` the mean over all rows of each row's masked mean (TRL's
    global_masked_mean of a (B, 1) flag at importance_sampling_level="sequence")."""
    if not per_row:
        return _masked_fraction(flag, mask, dtype, surrogate)
    m = _rows(mask).bool()
    f = _rows(flag.to(dtype).masked_fill(surrogate.isnan(), math.nan))
    row = torch.where(m, f, torch.zeros_like(f)).sum(-1) / m.sum(-1).clamp(min=1).to(dtype)
    return row.sum() / max(row.numel(), 1)


def _variant_inputs(mask, logp, old_logp, advantages, *more):
    logp = _upcast(logp)
    rest = [_upcast(t).detach() for t in (old_logp, advantages, *more)]
    return _zero_padding(mask, logp, *rest)


def vespo_is_log_sum(importance_sampling_ratio: Tensor) -> Tensor:
    """TRL get_gamma_weights' correction term per row: sum over ALL T positions (TRL does not mask
    it) of clamp(log(importance_sampling_ratio), log(1e-8), 20), in float32 ([..., T] -> [...])."""
    log_is = torch.log(importance_sampling_ratio.float())
    return log_is.clamp(min=VESPO_LOG_W_MIN, max=20.0).sum(-1)


def vespo_phi(log_ratio: Tensor, mask: Tensor, advantages: Tensor, is_log_sum: Tensor | None, *,
              k_pos: float, lambda_pos: float, k_neg: float, lambda_neg: float) -> Tensor:
    """trl/trainer/grpo_trainer.py::GRPOTrainer.get_gamma_weights (no gradient): log w_b = clamp(
    sum_t valid clamp(log r_t, -20, 20) + is_log_sum_b, log(1e-8), 20), then per token (k, lambda) =
    (k_pos, lambda_pos) where A >= 0 else (k_neg, lambda_neg), lambda clamped to >= 1e-4, and
    phi = exp(lambda + k log w - lambda w) with NaN / +-inf -> 0. Returns phi broadcast to A's shape
    ([..., 1] for per-row advantages [...], else [..., T])."""
    with torch.no_grad():
        m = mask.bool()
        lr = torch.where(m, log_ratio.clamp(-20.0, 20.0), torch.zeros_like(log_ratio))
        s = lr.sum(-1)
        if is_log_sum is not None:
            s = s + is_log_sum.to(s.dtype)
        log_w = s.clamp(VESPO_LOG_W_MIN, 20.0).unsqueeze(-1)
        a = advantages.unsqueeze(-1) if advantages.shape != log_ratio.shape else advantages
        nonneg = a >= 0
        k = torch.where(nonneg, k_pos, k_neg).to(log_w.dtype)
        lam = torch.where(nonneg, lambda_pos, lambda_neg).to(log_w.dtype).clamp(min=1e-4)
        return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def gmpo_log_weight(weights: Tensor, mask: Tensor) -> Tensor:
    """verl compute_policy_loss_geo_mean's rollout-weight row term, log of the row geometric mean:
    sum_t valid log(w_t + 1e-10) / (n_b + 1e-8), float32 [..., T] -> [...] (padding selected out)."""
    m = mask.bool()
    lw = torch.log(weights.float() + 1e-10)
    return torch.where(m, lw, torch.zeros_like(lw)).sum(-1) / (m.sum(-1).float() + 1e-8)


def _gmpo(logp, old_logp, a, mask, *, clip_low, clip_high, weights):
    """verl core_algos.py::compute_policy_loss_geo_mean: per token d = logp - old (unclamped),
    m = sgn(A) min(sgn(A) d, sgn(A) clamp(d, -clip_low, clip_high)); per row ratio_b = exp(sum_valid
    m / (n_b + 1e-8)), adv_b = sum_valid A / (n_b + 1e-8), loss_b = -adv_b ratio_b (times the weights'
    row geometric mean); the loss is the mean over all rows. Flags: d clipped with A > 0 (clip_frac)
    and A < 0 (clip_frac_lower)."""
    m = mask.bool()
    d = logp - old_logp
    sgn = torch.sign(a)
    d_clamp = torch.clamp(d, -clip_low, clip_high)
    mm = sgn * torch.minimum(sgn * d, sgn * d_clamp)
    n = m.sum(-1).to(d.dtype) + 1e-8
    ratio = torch.exp(torch.where(m, mm, torch.zeros_like(mm)).sum(-1) / n)
    row = -(torch.where(m, a, torch.zeros_like(a)).sum(-1) / n) * ratio
    if weights is not None:
        row = row * torch.exp(gmpo_log_weight(weights, mask).to(d.dtype))
    # A NaN row loss gives every valid token of the row a NaN gradient (the kernels' rule: the row's
    # coefficient is NaN), also where the clip makes d m / d logp 0 and autograd would give 0.
    bad = row.detach().isnan()
    nan_at_bad = torch.where(bad, math.nan, 0.0).to(row.dtype).unsqueeze(-1)
    row = torch.where(bad, row + (torch.where(m, logp, torch.zeros_like(logp)) * nan_at_bad).sum(-1), row)
    loss = _rows(row.unsqueeze(-1)).sum() / max(_rows(row.unsqueeze(-1)).shape[0], 1)
    clipped = d != d_clamp
    surrogate = mm.detach()
    stats = {"clip_frac": _masked_fraction(clipped & (a > 0), mask, d.dtype, surrogate),
             "clip_frac_lower": _masked_fraction(clipped & (a < 0), mask, d.dtype, surrogate),
             "approx_kl": aggregate_loss(-d.detach(), mask, "token-mean")}
    return loss, stats


def policy_loss_variant(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                        clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
                        agg: str = "token-mean", weights: Tensor | None = None, variant: str = "ppo",
                        ratio_level: str = "token", delta: float | None = None, sapo_tau_pos: float = 1.0,
                        sapo_tau_neg: float = 1.05,
                        dro_beta: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """policy_loss with a surrogate ``variant`` and an importance-ratio level (see _variant_terms and
    _log_ratio); verl's stats: clip_frac (pg_clipfrac: pg2 > pg1 for ppo, r != clip(r) for cispo),
    clip_frac_lower (dual clip), approx_kl (ppo_kl). gmpo (token level only): _gmpo, ``agg`` ignored
    (verl's mean over rows), ``weights`` as their row geometric mean. dro (token level only): verl
    compute_policy_loss_dro, -A logp + dro_beta / 2 (logp - old)^2 per token (unclamped log-ratio,
    approx_kl unclamped), times ``weights``, aggregated per ``agg``."""
    per_row_adv = advantages.shape != logp.shape
    logp, old_logp, advantages = _variant_inputs(mask, logp, old_logp, advantages)
    a = advantages if not per_row_adv else advantages.unsqueeze(-1).expand_as(logp)
    if variant == "gmpo":
        w = None if weights is None else _zero_padding(mask, _upcast(weights).detach())[0]
        return _gmpo(logp, old_logp, a, mask, clip_low=clip_low, clip_high=clip_high, weights=w)
    if variant == "dro":
        d = logp - old_logp
        loss = -logp * a + 0.5 * dro_beta * d.square()
        if weights is not None:
            loss = loss * _zero_padding(mask, _upcast(weights).detach())[0]
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        stats = {"clip_frac": zero, "clip_frac_lower": zero.clone(),
                 "approx_kl": aggregate_loss(-d.detach(), mask, "token-mean")}
        return aggregate_loss(_nan_tokens_get_nan_grad(loss, logp), mask, agg), stats
    lr, nkl = _log_ratio(logp, old_logp, mask, ratio_level)
    ratio = torch.exp(lr).expand_as(logp)
    loss, flags, surrogate = _variant_terms(variant, logp, ratio, a, clip_low=clip_low, clip_high=clip_high,
                                            delta=delta, tau_pos=sapo_tau_pos, tau_neg=sapo_tau_neg)
    dual = torch.zeros_like(flags["clipped"])
    if dual_clip is not None:
        pg3 = -a * dual_clip
        dual = (loss > pg3) & (a < 0)
        loss = torch.where(a < 0, torch.minimum(pg3, loss), loss)
    if weights is not None:
        loss = loss * _zero_padding(mask, _upcast(weights).detach())[0]
    per_row = ratio_level == "sequence" and per_row_adv
    stats = {
        "clip_frac": _flag_fraction(flags["clipped"], mask, logp.dtype, surrogate, per_row),
        "clip_frac_lower": _flag_fraction(dual, mask, logp.dtype, surrogate, per_row),
        "approx_kl": aggregate_loss(nkl.detach(), mask, "token-mean"),
    }
    return aggregate_loss(_nan_tokens_get_nan_grad(loss, logp), mask, agg), stats


def grpo_loss_variant(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                      beta: float = 0.04, clip_low: float = 0.2, clip_high: float = 0.2,
                      loss_type: str = "grpo", max_completion_length: int | None = None,
                      num_items_in_batch: float | None = None,
                      use_bias_correction_kl: bool = False, weights: Tensor | None = None,
                      importance_sampling_level: str = "token", delta: float | None = None,
                      sapo_temperature_pos: float = 1.0,
                      sapo_temperature_neg: float = 1.05, importance_sampling_ratio: Tensor | None = None,
                      vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
                      vespo_lambda_neg: float = 2.0) -> tuple[Tensor, dict[str, Tensor]]:
    """trl/trainer/grpo_trainer.py::GRPOTrainer._compute_loss (TRL 1.16) for every loss_type it fuses
    here: grpo / bnpo / dr_grpo / dapo / luspo (PPO-clip, with ``delta``), cispo (absolute cap
    ``clip_high``, dapo's normaliser), sapo (grpo's normaliser), vespo (-sg(phi) A logp, vespo_phi,
    dapo's normaliser; ``importance_sampling_ratio`` [..., T] folds TRL's vLLM IS ratios into phi), at
    importance_sampling_level token or sequence. ``weights`` multiply the surrogate before the KL
    term; the KL term is beta k3 (times coef_1 before delta with use_bias_correction_kl). The stat
    ``phi_seq_mean`` is TRL's vespo/phi_seq_mean (0 unless vespo)."""
    per_row_adv = advantages.shape != logp.shape
    adv_in = _upcast(advantages).detach()  # phi's (k, lambda) read A's sign even in all-padding rows
    logp, old_logp, advantages, ref_logp = _variant_inputs(mask, logp, old_logp, advantages, ref_logp)
    a = advantages if not per_row_adv else advantages.unsqueeze(-1).expand_as(logp)
    lr, nkl = _log_ratio(logp, old_logp, mask, importance_sampling_level)
    ratio = torch.exp(lr).expand_as(logp)
    phi_mean = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if loss_type == "vespo":
        is_sum = None if importance_sampling_ratio is None else vespo_is_log_sum(importance_sampling_ratio)
        phi = vespo_phi(logp - old_logp, mask, adv_in, is_sum, k_pos=vespo_k_pos,
                        lambda_pos=vespo_lambda_pos, k_neg=vespo_k_neg, lambda_neg=vespo_lambda_neg)
        # TRL's global_masked_mean: a (B, 1) phi is averaged over all B rows, a (B, T) one over tokens.
        phi_mean = (_rows(phi).sum() / max(_rows(phi).shape[0], 1) if per_row_adv
                    else aggregate_loss(phi, mask, "token-mean"))
        loss = -phi * a * logp
        zero = torch.zeros_like(ratio, dtype=torch.bool)
        flags, surrogate = {"clipped": zero, "low": zero, "high": zero}, torch.zeros_like(ratio)
    else:
        variant = {"cispo": "cispo_cap", "sapo": "sapo"}.get(loss_type, "ppo")
        loss, flags, surrogate = _variant_terms(
            variant, logp, ratio, a, clip_low=clip_low, clip_high=clip_high, delta=delta,
            tau_pos=sapo_temperature_pos, tau_neg=sapo_temperature_neg)
    d = _clamp_keep_nan(ref_logp - logp, -20.0, 20.0)
    k3 = torch.exp(d) - d - 1
    if use_bias_correction_kl:
        k3 = k3 * ratio
    if weights is not None:
        loss = loss * _zero_padding(mask, _upcast(weights).detach())[0]
    per_token = _nan_tokens_get_nan_grad(loss + beta * k3, logp)
    per_row = importance_sampling_level == "sequence" and per_row_adv
    low = _flag_fraction(flags["low"], mask, logp.dtype, surrogate, per_row)
    high = _flag_fraction(flags["high"], mask, logp.dtype, surrogate, per_row)
    stats = {
        "kl": aggregate_loss(k3.detach(), mask, "token-mean"),
        "clip_ratio": _flag_fraction(flags["low"] | flags["high"], mask, logp.dtype, surrogate, per_row),
        "clip_ratio_low": low, "clip_ratio_high": high,
        "cispo_clip_ratio": high if loss_type == "cispo" else torch.zeros_like(high),
        "approx_kl": aggregate_loss(nkl.detach(), mask, "token-mean"),
        "phi_seq_mean": phi_mean,
    }
    agg = {"cispo": "dapo", "sapo": "grpo", "vespo": "dapo"}.get(loss_type, loss_type)
    if agg == "luspo":  # (per_token_loss * mask).sum(-1).mean(): sum / B
        agg, max_completion_length = "dr_grpo", 1
    loss = aggregate_loss(per_token, mask, agg, max_completion_length=max_completion_length,
                          num_items_in_batch=num_items_in_batch)
    return loss, stats


# ---------------------------------------------------------------------------------------------
# lm_head family (continued): the options of linear_logprobs (issue 13)
# ---------------------------------------------------------------------------------------------


def linear_logprobs_options(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float | Tensor = 1.0,
    ignore_index: int = -100,
    rows: Tensor | None = None,
    return_entropy: bool = False,
    return_sum_p2: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """linear_logprobs with its options, the naive way ([..., V] logits in memory).

    temperature: a number, or a tensor broadcasting to labels' shape (one per token), used as
    float32 (as the fused op does) and then in the reference precision. rows: flat indices (or a
    bool mask of labels' shape) of the tokens computed; every other token gets 0 in each output
    and no gradient. return_sum_p2: sum_v softmax(z)_v^2 per token (0 for a token whose logits are
    all -inf, NaN for one with a NaN / +inf logit). Returns logp, then entropy, then sum p^2 (those
    asked for), a tensor alone when neither option is set."""
    logits = _lm_head_logits(hidden, weight, bias)
    if isinstance(temperature, Tensor):
        t = temperature.detach().float().to(logits.dtype).expand(labels.shape)
        z = logits / t.unsqueeze(-1)
    else:
        z = logits / temperature
    outs = [logprobs(z, labels, ignore_index=ignore_index)]
    if return_entropy:
        outs.append(entropy(z))
    if return_sum_p2:
        zz, _, dead = _scaled_logits(z, 1.0)
        p = torch.softmax(zz, dim=-1)
        outs.append((p * p).sum(dim=-1).masked_fill(dead, 0.0))
    if rows is not None:
        keep = rows.reshape(labels.shape) if rows.dtype == torch.bool else torch.zeros(
            labels.numel(), dtype=torch.bool, device=labels.device).index_fill(0, rows.long(), True).view(
            labels.shape)
        outs = [torch.where(keep, o, torch.zeros_like(o)) for o in outs]
    return outs[0] if len(outs) == 1 else tuple(outs)
