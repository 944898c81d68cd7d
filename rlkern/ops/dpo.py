"""Direct preference optimisation losses over per-sequence log-probs: ``dpo_loss``.

Inputs are ``[B]`` sequence log-probs, so the op is written once in PyTorch (a handful of
elementwise ops on B numbers; there is no memory traffic for a kernel to save). Formulas match TRL's
``DPOTrainer.dpo_loss`` (trl/trainer/dpo_trainer.py: ``sigmoid`` with cDPO label smoothing as TRL
<= 0.2x wrote it, which with ``label_smoothing=0`` is TRL 1.x's plain ``-logsigmoid``; ``ipo``;
``hinge``; ``robust``). Here ``-logsigmoid(x)`` is evaluated as ``softplus(-x)``, the same function,
finite for any finite margin. Oracle: rlkern.reference.dpo_loss (TRL's own expressions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlkern import reference
from rlkern.ops._common import check_finite, check_tensor

__all__ = ["dpo_loss", "DPO_LOSS_TYPES"]

DPO_LOSS_TYPES = reference.DPO_LOSS_TYPES
_NAMES = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def _check(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type,
           label_smoothing) -> tuple[float, float]:
    for name, t in zip(_NAMES, (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)):
        check_tensor(t, name)
        if t.shape != chosen_logps.shape:
            raise ValueError(f"{name} must have shape {tuple(chosen_logps.shape)} (the same as "
                             f"chosen_logps), got {tuple(t.shape)}")
        if t.device != chosen_logps.device:
            raise ValueError(f"all tensors must be on one device, got {chosen_logps.device} and {t.device}")
    if chosen_logps.numel() == 0:
        raise ValueError("dpo_loss needs at least one preference pair (the loss is their mean), got an empty "
                         "batch")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(DPO_LOSS_TYPES)}, got {loss_type!r}")
    beta = check_finite(beta, "beta")
    if beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    label_smoothing = check_finite(label_smoothing, "label_smoothing")
    if loss_type == "sigmoid" and not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] for loss_type='sigmoid', got "
                         f"{label_smoothing}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for loss_type='robust', got {label_smoothing}")
    if loss_type in ("ipo", "hinge") and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing is used by 'sigmoid' and 'robust' only; loss_type={loss_type!r} "
                         f"needs label_smoothing=0, got {label_smoothing}")
    return beta, label_smoothing


def _smoothed(z_beta: Tensor, ls: float, sign: float) -> Tensor:
    """(1 - ls) softplus(-beta z) + sign ls softplus(beta z), with the ls term absent (not even
    computed) when ls = 0: a margin of +-inf (a -inf log-prob) makes softplus(beta z) inf, and
    0 * inf would turn the loss's limit into NaN."""
    main = F.softplus(-z_beta)
    return main if ls == 0.0 else (1 - ls) * main + sign * ls * F.softplus(z_beta)


def dpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO-family loss, the mean over ``B`` preference pairs.

    With the margin ``z = (chosen - rejected) - (ref_chosen - ref_rejected)`` and ``ls = label_smoothing``:

    * ``sigmoid``: ``(1 - ls) softplus(-beta z) + ls softplus(beta z)`` (DPO; cDPO with ``ls > 0``)
    * ``ipo``: ``(z - 1 / (2 beta))^2``. TRL normalises IPO's log-probs by the completion length
      first: pass per-token-mean log-probs to reproduce it.
    * ``hinge``: ``relu(1 - beta z)`` (RSO / SLiC)
    * ``robust``: ``((1 - ls) softplus(-beta z) - ls softplus(beta z)) / (1 - 2 ls)`` (rDPO)

    Args:
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]`` (any one shape)
            sequence log-probs, float32/bf16/fp16/float64. Gradients flow to all four (the reference
            ones are normally computed under ``no_grad``).
        beta: > 0. label_smoothing: [0, 0.5] for sigmoid, [0, 0.5) for robust, 0 otherwise. Both
            are Python or numpy numbers (not bool), read as the float they equal.

    Infinite log-probs: a ``-inf`` rejected (or ``+inf``-margin) pair gives each loss's limit as
    z -> inf: 0 for sigmoid / hinge / robust with ``ls = 0``, ``+inf`` for ipo and for sigmoid with
    ``ls > 0``, ``-inf`` for robust with ``ls > 0``; symmetrically for z -> -inf. NaN comes only from
    a NaN input, or from ``-inf - (-inf)`` (a policy and a reference that both give a response
    probability 0: the log-ratio is undefined).

    Returns:
        ``(loss, stats)``: float32 0-d tensors (float64 for float64 inputs). ``stats`` (detached batch
        means, TRL's ``rewards/*``): ``chosen_rewards`` = mean of ``beta (chosen - ref_chosen)``,
        ``rejected_rewards``, ``reward_accuracy`` = share of pairs with chosen reward > rejected reward,
        ``reward_margin`` = mean of their difference.
    """
    beta, ls = _check(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type,
                      label_smoothing)
    dtype = torch.float64 if chosen_logps.dtype == torch.float64 else torch.float32
    c, r, rc, rr = (t if t.dtype == dtype else t.to(dtype)
                    for t in (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps))
    chosen_ratio, rejected_ratio = c - rc, r - rr
    z = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = _smoothed(beta * z, ls, 1.0)
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    else:
        losses = _smoothed(beta * z, ls, -1.0) / (1 - 2 * ls)
    chosen_rewards = beta * chosen_ratio.detach()
    rejected_rewards = beta * rejected_ratio.detach()
    margin = chosen_rewards - rejected_rewards
    stats = {
        "chosen_rewards": chosen_rewards.mean(),
        "rejected_rewards": rejected_rewards.mean(),
        "reward_accuracy": (margin > 0).to(dtype).mean(),
        "reward_margin": margin.mean(),
    }
    return losses.mean(), stats
