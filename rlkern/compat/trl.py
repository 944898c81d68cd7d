"""TRL's names, signatures and numerics on rlkern.ops (mirrors trl 1.16, the version installed here).

``rlkern.compat.patch("trl")`` swaps in, where the installed release has them:

- the fused LM head's kernel, ``trl.trainer.utils._ChunkedLogProbFunction`` (re-exported as
  ``trl.kernels.ChunkedLogProbFunction``): every ``model(..., labels=..., fused_lm_head=True)`` of
  the GRPO, DPO, RLOO, KTO and SFT trainers then computes its log-probs and entropy with
  ``rlkern.ops.linear_logprobs`` (rlkern/compat/_trl_fused.py);
- ``GRPOTrainer._compute_loss``: the loss through ``rlkern.ops.grpo_loss`` for every option rlkern
  computes exactly, TRL's own method (with one warning naming the option) for the others;
- the module-level ``selective_log_softmax``, ``entropy_from_logits`` and
  ``selective_log_softmax_and_entropy`` of ``trl.trainer.utils`` (used by TRL's experimental
  CPO / ORPO / TPO / A2PO trainers).

``rlkern.compat.trl.calls`` counts the calls that reached rlkern and the fallbacks. The DPO loss,
the RLOO loss and the GRPO / RLOO advantages are computed inline in TRL's trainers and stay TRL's;
:func:`grpo_advantages`, :func:`rloo_advantages` and :func:`dpo_loss` give the same maths as
functions.

TRL-specific numerics reproduced here (each cited where it is used):
- GRPO advantages divide by ``std + 1e-4`` (not 1e-6 as in verl, nor 1e-9 as in OpenRLHF), with the
  unbiased (Bessel-corrected) group std.
- ``dr_grpo`` normalises by ``B * max_completion_length`` (the config value, not the padded length).
- DPO ``sigmoid`` has no label smoothing in trl 1.16 (the smoothing moved to ``robust``/``exo_pair``),
  and ``ipo`` divides each sequence's log-ratio by its completion length first.
- Outputs keep the dtype of the logits, as TRL's do (rlkern computes in fp32 and casts back).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern import ops
from rlkern.compat import wraps_original
from rlkern.compat._trl_fused import calls, grpo_loss_and_stats, wrap_chunked_logprob, wrap_grpo_compute_loss

__all__ = [
    "calls",
    "selective_log_softmax",
    "entropy_from_logits",
    "selective_log_softmax_and_entropy",
    "grpo_advantages",
    "rloo_advantages",
    "grpo_loss",
    "dpo_loss",
]

# (module, attribute, shim name) swapped in by rlkern.compat.patch("trl").
PATCH_TARGETS = (
    ("trl.trainer.utils", "_ChunkedLogProbFunction", "ChunkedLogProbFunction"),
    ("trl.kernels", "ChunkedLogProbFunction", "ChunkedLogProbFunction"),
    ("trl.trainer.grpo_trainer", "GRPOTrainer._compute_loss", "GRPOTrainer_compute_loss"),
    ("trl.trainer.utils", "selective_log_softmax", "selective_log_softmax"),
    ("trl.trainer.utils", "entropy_from_logits", "entropy_from_logits"),
    ("trl.trainer.utils", "selective_log_softmax_and_entropy", "selective_log_softmax_and_entropy"),
)

# Wrapping shims: patch() calls them with TRL's original and installs the result.
ChunkedLogProbFunction = wraps_original(wrap_chunked_logprob)
GRPOTrainer_compute_loss = wraps_original(wrap_grpo_compute_loss)

_SCALE_REWARDS = ("group", "batch", "none")
# Every GRPOTrainer loss_type of TRL 1.16 that ops.grpo_loss fuses (vespo is not).
_GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
_IS_LEVELS = ("token", "sequence")
_DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def _check_temperature(temperature) -> None:
    # TRL's own check and message (trl/trainer/utils.py, selective_log_softmax).
    if temperature <= 0:
        raise ValueError("temperature must be positive")


def _apply_row_mask(values: Tensor, row_mask: Tensor | None) -> Tensor:
    if row_mask is None:
        return values
    if row_mask.shape != values.shape:
        raise ValueError(f"row_mask must have the shape of index {tuple(values.shape)}, "
                         f"got {tuple(row_mask.shape)}")
    return values.masked_fill(row_mask == 0, 0.0)


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0,
                          row_mask: Tensor | None = None) -> Tensor:
    """``log_softmax(logits / temperature).gather(-1, index)`` in one fused pass over the logits.

    Mirrors huggingface/trl ``trl/trainer/utils.py::selective_log_softmax``: ``index`` of shape
    ``(...)`` gives ``(...)``; ``index`` of shape ``(..., K)`` gathers K log-probs per row (one fused
    pass per k, which reads the logits K times but never builds the ``[..., V]`` log-softmax);
    positions where ``row_mask == 0`` are 0. Returned in the dtype of ``logits``.
    """
    _check_temperature(temperature)
    if index.dim() == logits.dim() - 1:
        out = ops.logprobs(logits, index, temperature=temperature)
    elif index.dim() == logits.dim():
        if index.shape[:-1] != logits.shape[:-1]:
            raise ValueError(f"index of shape (..., K) must share the logits' leading dims "
                             f"{tuple(logits.shape[:-1])}, got {tuple(index.shape)}")
        cols = [ops.logprobs(logits, index[..., k], temperature=temperature) for k in range(index.shape[-1])]
        out = torch.stack(cols, dim=-1) if cols else logits.new_zeros(index.shape, dtype=torch.float32)
    else:
        lead = tuple(logits.shape[:-1])
        raise ValueError(f"index must have shape {lead} or {lead} + (K,), "
                         f"got {tuple(index.shape)}")
    return _apply_row_mask(out.to(logits.dtype), row_mask)


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """Entropy (nats) of ``softmax(logits)`` along the last dim, shape ``logits.shape[:-1]``.

    Mirrors ``trl/trainer/utils.py::entropy_from_logits``; ``chunk_size`` only bounded TRL's peak
    memory and is accepted for signature compatibility (rlkern never materialises the softmax).
    """
    if int(chunk_size) <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    return ops.entropy(logits).to(logits.dtype)


def selective_log_softmax_and_entropy(logits: Tensor, index: Tensor, entropy_requires_grad: bool = True,
                                      temperature: float = 1.0,
                                      row_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Selected log-probs and entropy from one pass over the logits (``trl/trainer/utils.py::
    selective_log_softmax_and_entropy``); both are 0 where ``row_mask == 0``. With
    ``entropy_requires_grad=False`` the entropy is detached, as TRL's."""
    _check_temperature(temperature)
    if index.shape != logits.shape[:-1]:
        raise ValueError(f"index must have shape {tuple(logits.shape[:-1])} (the logits' leading dims), "
                         f"got {tuple(index.shape)}")
    logp, ent = ops.logprobs_and_entropy(logits, index, temperature=temperature)
    if not entropy_requires_grad:
        ent = ent.detach()
    return _apply_row_mask(logp.to(logits.dtype), row_mask), _apply_row_mask(ent.to(logits.dtype), row_mask)


def grpo_advantages(rewards: Tensor, num_generations: int, scale_rewards: str = "group") -> Tensor:
    """GRPO advantages of ``rewards [B]`` (B = prompts x ``num_generations``, grouped contiguously),
    as ``GRPOTrainer._generate_and_score_completions`` computes them (trl/trainer/grpo_trainer.py,
    ``multi_objective_aggregation="sum_then_normalize"``):

    - ``"group"``: ``(r - mean_g) / (std_g + 1e-4)``, unbiased std over the group;
    - ``"batch"``: ``(r - mean_g) / (std_batch + 1e-4)``, std over the whole batch;
    - ``"none"``: ``r - mean_g`` (Dr. GRPO).

    A group of one (``num_generations == 1``) gets advantage 0, as in TRL (its std is taken as 0).
    Groups whose rewards are all equal get 0: TRL computes ``(r - mean) / 1e-4``, which is 0 up to the
    rounding of the mean (at most ~1e-3 for rewards of order 1), and rlkern returns the exact 0.
    TRL's NaN rewards (completions no reward function could score) are not supported: pass finite
    rewards.
    """
    if scale_rewards not in _SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {_SCALE_REWARDS}, got {scale_rewards!r}")
    if not isinstance(rewards, Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-d tensor [B], got {getattr(rewards, 'shape', type(rewards))}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite; rlkern.compat.trl.grpo_advantages does not support TRL's "
                         "NaN rewards for unscorable completions")
    if scale_rewards == "group":
        return ops.group_advantages(rewards, group_size=num_generations, method="grpo", eps=1e-4)
    centred = ops.group_advantages(rewards, group_size=num_generations, method="grpo", scale_by_std=False)
    if scale_rewards == "none":
        return centred
    # "batch": one std over all B rewards (TRL's nanstd: unbiased); 0 for a batch of one.
    std = rewards.float().std() if rewards.numel() > 1 else rewards.new_zeros((), dtype=torch.float32)
    return centred / (std + 1e-4)


def rloo_advantages(rewards: Tensor, num_generations: int, normalize_advantages: bool = False) -> Tensor:
    """RLOO advantages of ``rewards [B]`` (grouped contiguously by ``num_generations``), as
    ``RLOOTrainer`` computes them (trl/trainer/rloo_trainer.py): ``r_i`` minus the mean of the other
    rewards of its group; with ``normalize_advantages``, then ``(a - mean) / (std + 1e-4)`` over the
    batch (unbiased std). A group of one gets 0, as in TRL. Rewards must be finite (TRL's NaN rewards
    for unscorable completions are not supported)."""
    if not isinstance(rewards, Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-d tensor [B], got {getattr(rewards, 'shape', type(rewards))}")
    advantages = ops.group_advantages(rewards, group_size=num_generations, method="rloo")
    if normalize_advantages:
        std = advantages.std() if advantages.numel() > 1 else advantages.new_zeros(())
        advantages = (advantages - advantages.mean()) / (std + 1e-4)
    return advantages


def grpo_loss(per_token_logps: Tensor, old_per_token_logps: Tensor | None, ref_per_token_logps: Tensor | None,
              advantages: Tensor, completion_mask: Tensor, *, beta: float = 0.0, epsilon: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "dapo",
              max_completion_length: int | None = 512,
              num_items_in_batch: Tensor | float | None = None, use_bias_correction_kl: bool = True,
              gradient_accumulation_steps: int = 1, steps_per_generation: int = 1,
              num_processes: int = 1, importance_sampling_level: str = "token", delta: float | None = None,
              sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
              importance_sampling_ratio: Tensor | None = None, vespo_k_pos: float = 2.0,
              vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
              vespo_lambda_neg: float = 2.0) -> Tensor:
    """The GRPO loss of ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py) without entropy
    masking, with TRL's normaliser. For the clipped loss types (grpo, bnpo, dr_grpo, dapo, luspo):

    ``per_token_loss = -min(r * A, clip(r, 1 - epsilon, 1 + epsilon_high) * A) + beta * k3 * r``
    (``* r`` only with ``use_bias_correction_kl``, TRL 1.16's default), with ``r = exp(logp - old)``
    and ``k3 = exp(ref - logp) - (ref - logp) - 1``, reduced per ``loss_type``:
    ``grpo`` (per-sequence token mean, then batch mean), ``bnpo`` (mean over all valid tokens),
    ``dr_grpo`` (sum / (B * max_completion_length)), each then divided by
    ``gradient_accumulation_steps``; ``dapo``: sum / (max(num_items_in_batch, 1) / num_processes *
    gradient_accumulation_steps / steps_per_generation), ``num_items_in_batch`` being the valid token
    count of the whole generation batch (the local count, and no further scaling, when None); an
    all-padding batch gives 0. In evaluation TRL uses ``gradient_accumulation_steps =
    steps_per_generation = 1``. ``luspo`` sums each sequence's tokens and averages the sequences;
    ``cispo`` is ``-min(r, epsilon_high).detach() * A * logp`` (``epsilon_high`` an absolute cap)
    normalised as dapo; ``sapo`` is ``-sigmoid(tau (r - 1)) * 4 / tau * A`` (``tau`` =
    ``sapo_temperature_pos`` where A > 0, else ``_neg``) normalised as grpo. ``delta`` caps the
    unclipped ratio (INTELLECT-2's two-sided clip); ``importance_sampling_level="sequence"`` (GSPO)
    uses one ratio per sequence, ``exp`` of its masked mean log-ratio. ``vespo`` is
    ``-phi.detach() * A * logp`` normalised as dapo, with ``phi`` TRL's ``get_gamma_weights`` (the
    sequence weight ``w`` from the summed token log-ratios plus, when given, the summed clamped logs
    of ``importance_sampling_ratio`` (TRL's vLLM IS ratios, which vespo does not multiply into the
    loss), and ``vespo_k_pos`` / ``vespo_lambda_pos`` for A >= 0, ``_neg`` otherwise).

    ``old_per_token_logps=None`` means on-policy (TRL uses ``per_token_logps.detach()``); ``advantages``
    may be ``[B]`` or ``[B, T]``. Defaults are TRL's ``GRPOConfig`` defaults (``beta=0.0``,
    ``epsilon=0.2``, ``epsilon_high=epsilon``, ``loss_type="dapo"``, ``max_completion_length=512``).
    rlkern clamps both log-ratios to [-20, 20] before exp, TRL does not: the two agree whenever
    |log-ratio| <= 20 (a ratio within e^±20), which is every token a trainer can recover from.
    """
    if loss_type not in _GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {_GRPO_LOSS_TYPES} (TRL 1.16's fused GRPO losses), "
                         f"got {loss_type!r}")
    if importance_sampling_level not in _IS_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {_IS_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    loss, _ = grpo_loss_and_stats(
        per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, completion_mask, beta=beta,
        epsilon=epsilon, epsilon_high=epsilon_high, loss_type=loss_type,
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch, use_bias_correction_kl=use_bias_correction_kl,
        gradient_accumulation_steps=gradient_accumulation_steps, steps_per_generation=steps_per_generation,
        num_processes=num_processes, importance_sampling_level=importance_sampling_level, delta=delta,
        sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
        importance_sampling_ratio=importance_sampling_ratio, vespo_k_pos=vespo_k_pos,
        vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg)
    return loss


def dpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor,
             *, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: Tensor | None = None,
             rejected_lengths: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, chosen_rewards, rejected_rewards)`` as ``DPOTrainer._compute_loss`` computes them
    (trl/trainer/dpo_trainer.py, ``f_divergence_type="reverse_kl"``, one loss type, no weighting).

    ``delta = (chosen - ref_chosen) - (rejected - ref_rejected)``; per pair:
    ``sigmoid`` ``-logsigmoid(beta * delta)`` (no label smoothing in trl 1.16);
    ``hinge`` ``relu(1 - beta * delta)``;
    ``ipo`` ``(delta' - 1 / (2 beta))^2`` where ``delta'`` divides each log-ratio by its completion
    length (``chosen_lengths`` / ``rejected_lengths``, token counts, clamped to >= 1; required);
    ``robust`` ``(-(1-ε) logsigmoid(beta delta) + ε logsigmoid(-beta delta)) / (1 - 2ε)``.
    ``loss`` is the batch mean; the rewards are ``beta * (logps - ref_logps)``, detached.
    """
    if loss_type not in _DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {_DPO_LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        # TRL's DPOTrainer check.
        raise ValueError(f"label_smoothing must lie in [0.0, 0.5) for the 'robust' loss, "
                         f"got {label_smoothing}")
    pc, pr, rc, rr = chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths "
                             "(completion token counts): "
                             "trl 1.16 normalises each IPO log-ratio by its length")
        # Dividing both the policy and the reference log-prob by the length divides their difference
        # (the log-ratio TRL normalises) by it, so rlkern's IPO on the scaled inputs is TRL's IPO.
        lc = chosen_lengths.to(torch.float32).clamp(min=1.0)
        lr = rejected_lengths.to(torch.float32).clamp(min=1.0)
        pc, rc, pr, rr = pc / lc, rc / lc, pr / lr, rr / lr
    smoothing = label_smoothing if loss_type == "robust" else 0.0
    loss, _ = ops.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    return loss, chosen_rewards, rejected_rewards
