"""verl's group advantage estimators with verl's conventions: ``outcome_advantages`` (one scalar per
response) and ``optimal_token_baseline`` (a baseline per group and token).

verl 0.9.1 (verl/trainer/ppo/core_algos.py) computes most of its estimators with a Python loop over
the responses and another over the groups, with a 0-d tensor op (and, for Pass@k and the optimal token
baseline, an ``.item()`` or ``nonzero``) per iteration. Here every statistic is one ``index_add`` /
``scatter_reduce`` over dense group ids with the number of groups known on the host, so nothing reads
a device value back (the tests run both ops on ``meta`` tensors, where any such read raises).

No C++ or Triton kernel. Measured single-threaded on the loaded development CPU at B = 4096 responses
x T = 1024 in groups of 8, against verl's eager functions in the same run (interleaved, medians): the
outcome estimators take 3-18 ms through rlkern.compat.verl, 6-18x faster than verl's loops (grpo,
rloo, gpg, opo, gdpo, ...), and as fast as verl's already vectorised ``grpo_vectorized`` /
``rloo_vectorized`` / ``remax``: the op itself is ~20 small torch ops on [B] scores (~0.3 ms), and the
rest is the caller's ``scalar * mask`` broadcast to [B, T] and the row sums, which a kernel could not
make smaller. The optimal token baseline is ~15 passes over [B, T] (~60-140 ms depending on load,
1.8-2.8x faster than verl's loop over groups); a fused kernel (one pass per row computing the
reward-to-go, W_t and the group sums, one pass writing the advantages) would move ~4x fewer bytes and
would be the next step if this estimator shows up in a profile: it runs once per RL step.
Oracles: rlkern.reference.outcome_advantages and rlkern.reference.optimal_token_baseline (plain loops
over groups, written after verl's).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern import reference
from rlkern.ops._common import check_finite, check_int, check_tensor
from rlkern.ops.returns import gae

__all__ = ["outcome_advantages", "optimal_token_baseline", "OUTCOME_METHODS"]

OUTCOME_METHODS = reference.OUTCOME_METHODS


def _check_ids(ids, batch: int, num_groups) -> int:
    if not isinstance(ids, Tensor) or ids.dtype != torch.int64:
        raise TypeError(f"ids must be an int64 tensor of dense group ids, got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.shape != (batch,):
        raise ValueError(f"ids must have shape ({batch},) (one group id per response), got "
                         f"{tuple(ids.shape)}")
    num_groups = check_int(num_groups, "num_groups")
    if num_groups < 0:
        raise ValueError(f"num_groups must be >= 0, got {num_groups}")
    return num_groups


def _flat_cells(values: Tensor, ids: Tensor, num_groups: int) -> tuple[Tensor, Tensor, int]:
    """``values [..., B]`` flattened, the (score set, group) cell of each element, and the number of
    score sets."""
    rows = values.shape[:-1].numel()
    offset = (torch.arange(rows, device=ids.device) * num_groups)[:, None] + ids
    return values.reshape(-1), offset.reshape(-1), rows


def _group_sum(values: Tensor, ids: Tensor, num_groups: int) -> Tensor:
    """Per-group sums of ``values [..., B]`` along the last dim: ``[..., G]``."""
    flat, cells, rows = _flat_cells(values, ids, num_groups)
    out = flat.new_zeros(rows * num_groups).index_add_(0, cells, flat)
    return out.view(*values.shape[:-1], num_groups)


def _group_max(values: Tensor, ids: Tensor, num_groups: int) -> Tensor:
    """Per-group maxima of ``values [..., B]``: ``[..., G]``, -inf for a group with no element."""
    flat, cells, rows = _flat_cells(values, ids, num_groups)
    out = flat.new_full((rows * num_groups,), float("-inf")).scatter_reduce_(0, cells, flat, "amax")
    return out.view(*values.shape[:-1], num_groups)


def _at(stat: Tensor, ids: Tensor) -> Tensor:
    """``stat[..., ids]``: a per-group statistic broadcast back to the responses."""
    return stat[..., ids]


def outcome_advantages(scores: Tensor, ids: Tensor, num_groups: int, *, method: str = "grpo",
                       eps: float = 1e-6, scale_by_std: bool = True,
                       weights: Tensor | None = None) -> Tensor:
    """One advantage per response from outcome scores, with verl 0.9.1's conventions per estimator.

    For a group of ``n`` scores ``s`` with mean ``m`` and unbiased std ``sd``:

    * ``grpo``: ``(s_i - m) / (sd + eps)``, or ``s_i - m`` without ``scale_by_std`` (verl ``grpo`` and
      ``grpo_vectorized``; also each reward of ``gdpo``). A group of one has ``m = 0, sd = 1``.
    * ``mean``: ``s_i - m``, a group of one ``m = 0`` (``reinforce_plus_plus_baseline``, ``gpg``).
    * ``rloo``: ``n / (n - 1) (s_i - m)``; a group of one keeps its score (verl ``rloo``).
    * ``rloo_vectorized``: the same, but a group of one gets 0 (verl ``rloo_vectorized``).
    * ``opo``: ``s_i - sum_j w_j s_j / sum_j w_j`` with ``weights`` (the response lengths); a group of
      one has baseline 0; a group whose weights sum to 0 gives NaN (0 / 0), as in verl.
    * ``passk``: only a group's unique best response gets ``s_max - s_second``, divided by
      ``sd + eps`` with ``scale_by_std``; ties for the best give the whole group 0 (verl assigns
      ``s_max - s_second = 0`` to one of them). Groups of one are the caller's to refuse (verl raises);
      here they get 0.

    A group whose scores are all equal gets ``0`` under ``grpo`` (verl: the rounding of its mean,
    divided by ``eps``; exactly 0 when the scores are small integers such as 0/1 rewards).

    Args:
        scores: ``[..., B]`` float scores; leading dims are independent score sets sharing the groups
            (gdpo's reward components). Computed in float64; returned in float32 (float64 for
            float64 scores).
        ids: ``[B]`` int64 dense group ids in ``[0, num_groups)`` (rlkern.compat.verl builds them from
            verl's uid array on the host; they are not checked against ``num_groups`` here, which
            would read them back from the device).
        num_groups: the number of groups ``G``.
        eps: ``grpo`` / ``passk`` std epsilon (verl: 1e-6).
        weights: ``[B]`` per-response weights, ``opo`` only.

    Returns:
        ``[..., B]`` advantages. No host synchronisation.
    """
    check_tensor(scores, "scores")
    if scores.dim() == 0:
        raise ValueError("scores must have shape [..., B], got a 0-d tensor")
    if method not in OUTCOME_METHODS:
        raise ValueError(f"method must be one of {list(OUTCOME_METHODS)}, got {method!r}")
    num_groups = _check_ids(ids, scores.shape[-1], num_groups)
    eps = check_finite(eps, "eps")
    if (weights is not None) != (method == "opo"):
        raise ValueError("weights (the response lengths) are required by method='opo' and only by it")
    out_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    s = scores.detach().double()
    n = _group_sum(s.new_ones(s.shape[-1]), ids, num_groups)  # group sizes
    alone = _at(n, ids) == 1  # [B]
    if method == "opo":
        w = check_tensor(weights, "weights", floating=False).detach().double()
        if w.shape != (scores.shape[-1],):
            raise ValueError(f"weights must have shape ({scores.shape[-1]},), got {tuple(w.shape)}")
        base = _at(_group_sum(w * s, ids, num_groups) / _group_sum(w, ids, num_groups), ids)
        return (s - torch.where(alone, torch.zeros_like(base), base)).to(out_dtype)
    mean = _at(_group_sum(s, ids, num_groups) / n.clamp(min=1), ids)
    dev = s - mean  # two passes, as verl's torch.std and group_mean_std
    var = _at(_group_sum(dev * dev, ids, num_groups) / (n - 1).clamp(min=1), ids)
    if method == "passk":
        best = _at(_group_max(s, ids, num_groups), ids)
        top = s == best
        ties = _at(_group_sum(top.double(), ids, num_groups), ids) > 1
        second = _at(_group_max(torch.where(top, torch.full_like(s, float("-inf")), s), ids, num_groups), ids)
        adv = s - second
        if scale_by_std:
            adv = adv / (var.sqrt() + eps)
        return torch.where(top & ~ties & ~alone, adv, torch.zeros_like(adv)).to(out_dtype)
    dev = torch.where(alone, s, dev)  # verl: a group of one has mean 0
    if method == "grpo":
        adv = dev / torch.where(alone, torch.ones_like(var), var.sqrt()).add(eps) if scale_by_std else dev
    elif method == "mean":
        adv = dev
    else:  # rloo, rloo_vectorized
        nn = _at(n, ids)
        adv = dev * (nn / (nn - 1).clamp(min=1))
        if method == "rloo_vectorized":
            adv = torch.where(alone, torch.zeros_like(adv), adv)
    return adv.to(out_dtype)


def _reward_to_go(rewards: Tensor, mask: Tensor) -> Tensor:
    """``sum_{s >= t} r_s m_s`` at every position, masked ones included (verl's
    ``(r * m).flip(-1).cumsum(-1).flip(-1)``): rlkern's GAE scan with values 0 and gamma = lam = 1,
    where a masked step carries the running sum through. (``discounted_returns`` would restart the
    sum at masked steps.) One C++ / Triton pass, ~1.7x faster than flip + cumsum + flip on a CPU."""
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    return returns.to(rewards.dtype)


def optimal_token_baseline(rewards: Tensor, mask: Tensor, ids: Tensor, num_groups: int, old_log_probs: Tensor,
                           sum_pi_squared: Tensor, *, rollout_is_weights: Tensor | None = None,
                           handle_zero_tail: bool = True, eps: float = 1e-8,
                           multi_turn: bool = False) -> tuple[Tensor, Tensor]:
    """verl 0.9.1's optimal token baseline (``optimal_token_baseline``; with ``multi_turn`` its
    ``tir_optimal_token_baseline``), vectorised over groups.

    ``G_t = sum_{s >= t} r_s m_s`` (reward-to-go; masked positions carry the sum through),
    ``w_t = (1 - 2 exp(old_log_probs_t) + sum_pi_squared_t) * rho_t^2`` (``rho`` the rollout IS weights,
    1 when absent), ``W_t = sum_{s <= t} w_s m_s``, and per group and step
    ``B_t = sum_i G_t W_t m_t / (sum_i W_t m_t + eps)``; advantages ``(G_t - B_t) m_t``.

    * Without ``multi_turn`` the step ``t`` is the column; every response of the group counts.
    * With ``multi_turn`` it is the rank of the token among its row's valid tokens (tool and
      observation tokens inside a response are skipped), and responses without a valid token are
      left out of their group.
    * A group of one (of responses counted) has baseline 0.
    * ``handle_zero_tail``: if a group's longest response (valid-token count) is unique, its
      baseline is 0 from the second-longest length on (columns, or ranks with ``multi_turn``).

    Args:
        rewards, old_log_probs, sum_pi_squared, rollout_is_weights: ``[B, T]`` floats.
        mask: ``[B, T]`` 0/1 of any dtype (bool, integer, float).
        ids, num_groups: as :func:`outcome_advantages`.
        eps: added to the denominator (verl: 1e-8).

    Returns:
        ``(advantages, returns)``, ``[B, T]`` float32 (float64 when the rewards are), no gradient, no
        host synchronisation.
    """
    check_tensor(rewards, "rewards")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [B, T], got {tuple(rewards.shape)}")
    for name, x in (("old_log_probs", old_log_probs), ("sum_pi_squared", sum_pi_squared),
                    ("rollout_is_weights", rollout_is_weights)):
        if x is not None and (check_tensor(x, name).shape != rewards.shape):
            raise ValueError(f"{name} must have shape {tuple(rewards.shape)}, got {tuple(x.shape)}")
    check_tensor(mask, "mask", floating=False)
    if mask.shape != rewards.shape:
        raise ValueError(f"mask must have shape {tuple(rewards.shape)}, got {tuple(mask.shape)}")
    batch, length = rewards.shape
    num_groups = _check_ids(ids, batch, num_groups)
    eps = check_finite(eps, "eps")
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        m = mask.to(dtype)
        # Every [B, T] intermediate below is written in place where it can be: at 4096 x 1024 each
        # fresh buffer costs about as much as the arithmetic (first-touch page faults).
        returns = _reward_to_go(rewards.detach().to(dtype), mask)
        w = old_log_probs.detach().to(dtype).exp().mul_(-2).add_(1).add_(sum_pi_squared.to(dtype))
        if rollout_is_weights is not None:
            rho = rollout_is_weights.detach().to(dtype)
            w.mul_(rho * rho)  # = rho ** 2 bitwise (torch's pow squares by one multiply), ~3x faster
        wm = w.mul_(m).cumsum_(-1).mul_(m)  # W_t at valid tokens, 0 elsewhere
        rw = returns * wm
        lengths = m.sum(-1)
        counted = (lengths > 0).to(dtype) if multi_turn else torch.ones_like(lengths)
        n = _at(_group_sum(counted, ids, num_groups), ids)
        if multi_turn:
            # Pack each row's valid tokens to the left (step = rank among them; the other tokens go to
            # a spare column T), take the group sums per rank, and read them back at each token.
            valid = mask != 0
            step = valid.cumsum(-1, dtype=torch.int64).sub_(1).masked_fill_(~valid, length)
            slot = step  # the spare column T >= every cut below: those tokens' baseline reads 0
            packed = lambda x: m.new_zeros(batch, length + 1).scatter_(1, slot, x)  # noqa: E731
            cells = lambda x: m.new_zeros(num_groups, length + 1).index_add_(0, ids, packed(x))  # noqa: E731
            base = cells(rw).div_(cells(wm).add_(eps)).index_select(0, ids).gather(1, slot)
        else:
            step = torch.arange(length, device=rewards.device)[None]
            cells = lambda x: m.new_zeros(num_groups, length).index_add_(0, ids, x)  # noqa: E731
            base = cells(rw).div_(cells(wm).add_(eps)).index_select(0, ids)
        # The baseline is kept at steps < cut: none for a group of one, from the second-longest length
        # on for a unique longest response (handle_zero_tail), all of them otherwise.
        cut = torch.where(n > 1, torch.full_like(n, float(length)), torch.zeros_like(n))
        if handle_zero_tail:
            longest = _at(_group_max(lengths, ids, num_groups), ids)
            top = lengths == longest
            unique = _at(_group_sum(top.to(dtype), ids, num_groups), ids) == 1
            others = torch.where(top, torch.zeros_like(lengths), lengths)
            second = _at(_group_max(others, ids, num_groups), ids)
            cut = torch.where(top & unique, torch.minimum(cut, second), cut)
        base.masked_fill_(step >= cut.long()[:, None], 0.0)
        advantages = torch.sub(returns, base, out=base).mul_(m)
    return advantages, returns
