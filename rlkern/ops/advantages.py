"""Outcome advantages within groups of responses to one prompt: ``group_advantages``.

Written once, vectorised in PyTorch (index_add / scatter_reduce over group ids; the
win-rate pairs on a padded [groups, max group size, max group size] block), with no Python loop over
groups. No C++ kernel: measured single-threaded on the development CPU at B = 4096 scores in groups
of 8, the op takes 0.13-0.17 ms for grpo / rloo / reinforce_baseline and 0.45 ms for winrate (with
index= as with group_size=), almost all of it the dispatch of ~20 small torch ops (one elementwise op
on 4096 floats costs 2.5 us). A kernel could save at most those 0.1-0.4 ms per RL step, which takes
seconds; the inputs are [B] scalars, so there is no memory traffic to save either.
Oracle: rlkern.reference.group_advantages (a plain loop over groups).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from rlkern import reference
from rlkern.ops._common import check_finite, check_int, check_tensor

__all__ = ["group_advantages", "ADVANTAGE_METHODS"]

ADVANTAGE_METHODS = reference.ADVANTAGE_METHODS


def _group_ids(batch: int, group_size, index, device) -> tuple[Tensor, int]:
    """Dense group ids in [0, G) for every score, and G."""
    if (group_size is None) == (index is None):
        raise ValueError("pass exactly one of group_size (fixed-size consecutive groups) or index (a group "
                         "id per score)")
    if group_size is not None:
        group_size = check_int(group_size, "group_size")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if batch % group_size:
            raise ValueError(f"the batch of {batch} scores is not divisible by group_size={group_size}")
        return torch.arange(batch, device=device) // group_size, batch // group_size
    if isinstance(index, Tensor):
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise TypeError(f"index must hold integer group ids, got dtype {index.dtype}")
        if index.shape != (batch,):
            raise ValueError(f"index must have shape ({batch},) (one group id per score), got "
                             f"{tuple(index.shape)}")
        uniq, inverse = torch.unique(index.to(device), return_inverse=True)
        return inverse, uniq.numel()
    # verl passes a numpy array of uid strings; any 1-d sequence of hashable ids works.
    ids = np.asarray(index)
    if ids.shape != (batch,):
        raise ValueError(f"index must have shape ({batch},) (one group id per score), got {ids.shape}")
    uniq, inverse = np.unique(ids, return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.int64, device=device), len(uniq)


def _win_rates(r: Tensor, ids: Tensor, counts: Tensor, groups: int, n_max: int) -> Tensor:
    """1/(n - 1) sum_{j != i} sigmoid(r_i - r_j) - 1/2 for every score, on a padded
    [groups, n_max, n_max] block (n_max = the largest group)."""
    batch = r.numel()
    if batch == 0:
        return torch.zeros_like(r)
    order = torch.argsort(ids, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(batch, device=r.device) - starts[ids[order]]
    padded = r.new_zeros(groups, n_max)
    present = torch.zeros(groups, n_max, dtype=torch.bool, device=r.device)
    padded[ids[order], slot] = r[order]
    present[ids[order], slot] = True
    pairs = torch.sigmoid(padded[:, :, None] - padded[:, None, :])
    pairs = torch.where(present[:, None, :], pairs, torch.zeros_like(pairs))
    # Row sums include the diagonal's sigmoid(0) = 1/2, removed here; degenerate groups are zeroed later.
    wins = (pairs.sum(-1) - 0.5) / (counts[:, None] - 1).clamp(min=1)
    out = torch.empty_like(r)
    out[order] = wins[ids[order], slot] - 0.5
    return out


def _check_finite_scores(scores: Tensor) -> None:
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"scores must be finite; scores[{first}] is {scores[first].item()}")


def _finite_or_raise(adv: Tensor) -> Tensor:
    """adv, or a ValueError naming the first score whose advantage overflowed float32."""
    if adv.dtype == torch.float32 and not bool(torch.isfinite(adv).all()):
        first = int((~torch.isfinite(adv)).nonzero()[0, 0])
        raise ValueError(f"the advantage of scores[{first}] is {adv[first].item()}: it exceeds float32's "
                         f"range (float32 max {torch.finfo(torch.float32).max:.4g}); pass float64 scores")
    return adv


def _fixed_groups(scores: Tensor, n: int, method: str, eps: float, scale_by_std: bool,
                  out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """grpo / rloo / reinforce_baseline for consecutive groups of n, on a [G, n] view, in a handful of
    row ops (at small B the op's cost is their dispatch). Returns (advantages, check): degenerate
    groups already 0; check is a 0-d tensor that is finite unless a score or an advantage is not.

    torch.var_mean (float64, Welford's update, merged the same way) leaves the mean of a group of
    equal scores exactly at their value (the running mean never moves), so their deviations are
    exactly 0 and their variance is 0: every method's advantage is then 0 without a select, except
    grpo's 0 / (0 + eps) with eps = 0, which is masked. A group of one has variance 0 (correction 0).
    A NaN / inf score makes its group's mean and variance non-finite."""
    r = scores.double().view(-1, n)
    var, mean = torch.var_mean(r, dim=-1, correction=1 if n > 1 else 0, keepdim=True)
    if method == "grpo" and scale_by_std:
        adv = (r - mean).div_(var.sqrt().add_(eps))
        if eps == 0:
            adv = adv.masked_fill_(var == 0, 0.0)
        # |adv| <= sqrt(n - 1) < float32's max: only the scores can make it non-finite.
        check = var.sum()
    else:
        adv = (r - mean).mul_(n / max(n - 1, 1)) if method == "rloo" else r - mean
    adv = adv.view(-1).to(out_dtype)
    return adv, check if method == "grpo" and scale_by_std else adv.sum()


def group_advantages(scores: Tensor, *, group_size: int | None = None, index=None, method: str = "grpo",
                     eps: float = 1e-6, scale_by_std: bool = True,
                     return_counts: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Per-response advantages from outcome scores, normalised within each prompt's group.

    For a group of ``n >= 2`` scores ``r`` with mean ``m`` and unbiased std ``s``:

    * ``grpo``: ``(r_i - m) / (s + eps)`` (verl / TRL GRPO); ``scale_by_std=False`` gives Dr. GRPO's
      ``r_i - m``.
    * ``rloo``: ``r_i - mean_{j != i} r_j`` (leave-one-out baseline, ``= n / (n - 1) (r_i - m)``).
    * ``reinforce_baseline``: ``r_i - m``.
    * ``winrate``: ``P_win(i) - 1/2`` with ``P_win(i) = 1/(n - 1) sum_{j != i} sigmoid(r_i - r_j)``.
      ``P_win`` averages exactly 1/2 over any group (``sigmoid(x) + sigmoid(-x) = 1``), so subtracting
      1/2 is the group-mean baseline, as for the other methods.

    Degenerate groups: a group of one response, or whose scores are all equal, carries no learning
    signal and gets advantage exactly 0 under every method (not ``0 / eps`` noise, not NaN).

    Args:
        scores: ``[B]`` float32/bf16/fp16/float64 finite scores (one per response); a NaN or inf
            score is a ValueError naming its index. Computed in float64 (rloo's advantages of a
            group then sum to zero up to the final rounding, exactly for a pair), returned in
            float32; an advantage beyond float32's range (scores near +-3e38) is a ValueError.
        group_size: responses per prompt, consecutive in ``scores`` (``B`` must be divisible by it).
        index: instead of ``group_size``: ``[B]`` group ids, an integer tensor or any 1-d sequence of
            hashable ids (verl's numpy array of uid strings); groups need not be contiguous.
        eps: added to the std (``grpo`` with ``scale_by_std``), >= 0; a Python or numpy number (not bool).
        return_counts: also return ``{"groups", "singleton_groups", "zero_variance_groups"}`` as
            0-d int64 tensors.

    Returns:
        float32 ``[B]`` advantages (float64 for float64 scores), and the counts when asked.
    """
    check_tensor(scores, "scores")
    if scores.dim() != 1:
        raise ValueError(f"scores must have shape [B] (one score per response), got {tuple(scores.shape)}")
    if method not in ADVANTAGE_METHODS:
        raise ValueError(f"method must be one of {list(ADVANTAGE_METHODS)}, got {method!r}")
    eps = check_finite(eps, "eps")
    if eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if group_size is not None:
        group_size = check_int(group_size, "group_size")
    eager = not torch.compiler.is_compiling()  # the value checks below sync on GPU; skipped when tracing
    out_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    if group_size is not None and index is None and method != "winrate" and not return_counts:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if scores.shape[0] % group_size:
            raise ValueError(f"the batch of {scores.shape[0]} scores is not divisible by "
                             f"group_size={group_size}")
        adv, check = _fixed_groups(scores, group_size, method, eps, scale_by_std, out_dtype)
        # One check (a sync on GPU; a sum that overflows is a false alarm); only when it fails, the
        # checks that name the culprit.
        if eager and not math.isfinite(check.item()):
            _check_finite_scores(scores)
            _finite_or_raise(adv)
        return adv
    if eager:
        _check_finite_scores(scores)
    ids, groups = _group_ids(scores.shape[0], group_size, index, scores.device)
    # float64 whatever the input: B numbers cost nothing, and in float32 the mean of [1, 1 + 2^-23]
    # rounds so that rloo's advantages are not zero-sum, and scores near +-3e38 overflow the
    # squared deviations (grpo gave 0) or the n / (n - 1) factor (rloo gave +-inf).
    r = scores.double()

    # index_add rather than bincount: the output size is `groups`, known without reading the ids,
    # so the op traces under torch.compile(fullgraph=True) with group_size.
    n = r.new_zeros(groups).index_add_(0, ids, torch.ones_like(r))
    counts = n.long()
    mean = r.new_zeros(groups).index_add_(0, ids, r) / n.clamp(min=1)
    dev = r - mean[ids]  # two passes (mean, then squared deviations) for an accurate variance
    var = r.new_zeros(groups).index_add_(0, ids, dev * dev) / (n - 1).clamp(min=1)
    high = r.new_zeros(groups).scatter_reduce_(0, ids, r, "amax", include_self=False)
    low = r.new_zeros(groups).scatter_reduce_(0, ids, r, "amin", include_self=False)
    singleton = counts == 1
    flat = (counts >= 2) & (high == low)

    if method == "grpo":
        adv = dev / (var.sqrt()[ids] + eps) if scale_by_std else dev
    elif method == "rloo":
        adv = dev * (n / (n - 1).clamp(min=1))[ids]
    elif method == "reinforce_baseline":
        adv = dev
    else:
        n_max = group_size if group_size is not None else int(counts.max()) if groups else 0
        adv = _win_rates(r, ids, counts, groups, n_max)
    adv = torch.where((singleton | flat)[ids], torch.zeros_like(adv), adv)
    if out_dtype == torch.float32:
        adv = adv.float()
        if eager:
            _finite_or_raise(adv)
    if not return_counts:
        return adv
    return adv, {"groups": torch.tensor(groups), "singleton_groups": singleton.sum(),
                 "zero_variance_groups": flat.sum()}
