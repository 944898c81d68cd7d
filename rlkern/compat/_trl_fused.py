"""rlkern inside TRL 1.16's real hot path: the fused LM head and ``GRPOTrainer._compute_loss``.

TRL's GRPO, DPO, RLOO, KTO and SFT trainers install ``add_fused_lm_head`` on the model; its forward
calls ``trl.trainer.utils._ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature,
chunk_size, final_logit_softcapping, logit_scale, outputs)`` for per-token log-probs (and entropy,
mean logit, top-1 flag). :func:`wrap_chunked_logprob` replaces that class by one whose ``apply``
runs :func:`rlkern.ops.linear_logprobs`; :func:`wrap_grpo_compute_loss` replaces
``GRPOTrainer._compute_loss`` by one that reduces the loss with :func:`rlkern.ops.grpo_loss`.

Each wrapper keeps TRL's original and calls it, with one warning per unfused option and process
(naming the option), whenever an input or a config option lies outside what rlkern computes
exactly; nothing is approximated. ``calls`` counts what went where, so a test (or a user) can see
that rlkern really ran: keys ``"linear_logprobs"``, ``"grpo_loss"``, ``"high_entropy_mask"``,
``"fallback:<what>"``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections import Counter

import torch
from torch import Tensor

from rlkern import ops

__all__ = ["calls", "wrap_chunked_logprob", "wrap_grpo_compute_loss", "grpo_loss_and_stats"]

calls: Counter = Counter()
_warned: set[str] = set()

# Per-token outputs TRL's ChunkedLogProbFunction can return besides the log-probs
# (trl/kernels/chunked_logprob.py, OPTIONAL_OUTPUTS).
_ALL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Vocabulary rows per tile of the no-grad top-1 pass: bounds its fp32 tile to N * 4096 * 4 bytes.
_TOP1_TILE = 4096
# The TRL release whose GRPOTrainer._compute_loss the fused loss reproduces; another release runs its
# own method (its options and normalisers may differ).
MIRRORED_TRL = "1.16."
# ChunkedLogProbFunction.forward's parameters in that release; a class with others is not replaced.
_HEAD_PARAMS = ("ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                "final_logit_softcapping", "logit_scale", "outputs")


def _fallback(what: str, message: str) -> None:
    calls[f"fallback:{what}"] += 1
    if what not in _warned:
        _warned.add(what)
        warnings.warn(f"rlkern.compat.patch('trl'): {message}; TRL's own code runs for it (said once)",
                      RuntimeWarning, stacklevel=3)


def _zero3() -> bool:
    # Under DeepSpeed ZeRO-3 TRL re-gathers the sharded head inside its backward; rlkern's does not.
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    # TRL's choice (chunked_logprob.py): the autocast dtype under autocast, else the hidden states'.
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _head_fallback_reason(hidden, weight, softcap, logit_scale, outputs) -> str | None:
    if softcap is not None:
        return "final_logit_softcapping (Gemma-2 style tanh capping of the logits)"
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
        return f"logit_scale={logit_scale!r} (only finite positive scales fold into the temperature)"
    if _compute_dtype(hidden) not in (torch.float32, torch.bfloat16, torch.float16):
        return f"compute dtype {_compute_dtype(hidden)} (rlkern's fused head takes fp32, bf16 or fp16)"
    if _zero3():
        return "DeepSpeed ZeRO-3 (a sharded LM head)"
    return None


@torch.no_grad()
def _mean_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    # mean_v (h . w_v + b_v) = h . mean_v(w_v) + mean(b): one [V, H] reduction, no logits.
    mean_w = weight.float().mean(0)
    out = hidden.float() @ mean_w
    if bias is not None:
        out += bias.float().mean()
    return out * scale


@torch.no_grad()
def _is_top1(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> Tensor:
    """Whether each target is the first argmax of its logits (TRL's tie rule: an earlier equal logit
    wins), from one forward pass over vocabulary tiles with a running max; the positive temperature
    and scale do not change the argmax."""
    n, vocab = hidden.shape[0], weight.shape[0]
    best = torch.full((n,), -math.inf, device=hidden.device)
    before = torch.full((n,), -math.inf, device=hidden.device)  # max logit over ids < target
    target_z = torch.full((n,), -math.inf, device=hidden.device)
    for v0 in range(0, vocab, _TOP1_TILE):
        z = (hidden @ weight[v0:v0 + _TOP1_TILE].t()).float()
        if bias is not None:
            z += bias[v0:v0 + _TOP1_TILE].float()
        ids = torch.arange(v0, v0 + z.shape[1], device=z.device)
        best = torch.maximum(best, z.amax(1))
        before = torch.maximum(before, z.masked_fill(ids >= targets[:, None], -math.inf).amax(1))
        local = targets - v0
        inside = (local >= 0) & (local < z.shape[1])
        picked = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None])[:, 0]
        target_z = torch.where(inside, picked, target_z)
    return (target_z >= best) & (target_z > before)


def wrap_chunked_logprob(original):
    """A stand-in for ``trl.kernels.ChunkedLogProbFunction`` (TRL only calls its ``apply``)."""

    try:
        same_signature = tuple(inspect.signature(original.forward).parameters) == _HEAD_PARAMS
    except (TypeError, ValueError):
        same_signature = False

    class ChunkedLogProbFunction:
        __doc__ = (f"rlkern's stand-in for TRL's ``{original.__module__}.{original.__name__}``: ``apply`` "
                   "computes log-probs and entropy with rlkern.ops.linear_logprobs; the original is "
                   "``.original_function``.")
        original_function = original

        @staticmethod
        def apply(*args, **kwargs):
            if not same_signature:  # another release calls with its own arguments: pass them on as they are
                _fallback("fused_lm_head", "this TRL release's ChunkedLogProbFunction signature differs from "
                          "TRL 1.16's, which rlkern mirrors")
                return original.apply(*args, **kwargs)
            return ChunkedLogProbFunction._fused_apply(*args, **kwargs)

        @staticmethod
        def _fused_apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                         logit_scale=1.0, outputs=_ALL_OUTPUTS):
            outputs = tuple(outputs)
            reason = _head_fallback_reason(hidden, weight, final_logit_softcapping, logit_scale, outputs)
            if reason is not None:
                _fallback("fused_lm_head", f"the fused LM head with {reason} is not fused by rlkern")
                return original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                      final_logit_softcapping, logit_scale, outputs)
            calls["linear_logprobs"] += 1
            device = hidden.device.type
            # TRL multiplies in its compute dtype (casting the head to it, e.g. a bf16 head with
            # cast_lm_head_to_fp32); rlkern takes both in that dtype. The casts are differentiable.
            dtype = _compute_dtype(hidden)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            # z * logit_scale / T = z / (T / logit_scale): the scale folds into the temperature.
            effective_t = float(temperature) / float(logit_scale)
            want_entropy, want_p2 = "entropy" in outputs, "log_sum_sq_probs" in outputs
            with torch.autocast(device, enabled=False):
                result = ops.linear_logprobs(hidden, weight, targets, bias=bias, temperature=effective_t,
                                             return_entropy=want_entropy, return_sum_p2=want_p2)
                result = result if isinstance(result, tuple) else (result,)
                logprobs, entropy = result[0], result[1] if want_entropy else None
                # TRL's log_sum_sq_probs = log(sum_v p_v^2) (DPO's use_weighting), not differentiable
                # there either (ChunkedLogProbFunction.forward marks it so).
                log_sum_sq = result[-1].detach().log() if want_p2 else None
                mean_logits = (_mean_logits(hidden, weight, bias, 1.0 / effective_t)
                               if "mean_logits" in outputs else None)
                is_top1 = _is_top1(hidden, weight, bias, targets) if "is_top1" in outputs else None
            return logprobs, entropy, log_sum_sq, mean_logits, is_top1

    ChunkedLogProbFunction.__qualname__ = ChunkedLogProbFunction.__name__ = original.__name__
    return ChunkedLogProbFunction


def grpo_loss_and_stats(per_token_logps: Tensor, old_per_token_logps: Tensor | None,
                        ref_per_token_logps: Tensor | None, advantages: Tensor, completion_mask: Tensor, *,
                        beta: float, epsilon: float, epsilon_high: float | None, loss_type: str,
                        max_completion_length: int | None, num_items_in_batch, use_bias_correction_kl: bool,
                        gradient_accumulation_steps: int, steps_per_generation: int,
                        num_processes: int, weights: Tensor | None = None,
                        importance_sampling_level: str = "token", delta: float | None = None,
                        sapo_temperature_pos: float = 1.0,
                        sapo_temperature_neg: float = 1.05, importance_sampling_ratio: Tensor | None = None,
                        vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
                        vespo_lambda_neg: float = 2.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss ``GRPOTrainer._compute_loss`` backpropagates (its normaliser included) and rlkern's
    stats; see :func:`rlkern.compat.trl.grpo_loss` for the arguments. Normalisers
    (trl/trainer/grpo_trainer.py::GRPOTrainer._compute_loss, TRL 1.16): grpo, sapo, bnpo, dr_grpo and
    luspo divide by the accumulation steps; dapo, cispo and vespo by ``num_items_in_batch /
    num_processes * accumulation / steps_per_generation``. ``importance_sampling_ratio``: vespo's vLLM
    IS ratios ([B, T]), folded into its gamma weights (get_gamma_weights), not into ``weights``."""
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    if beta != 0.0 and ref_per_token_logps is None:
        raise ValueError("ref_per_token_logps is required when beta != 0")
    # beta == 0 and no reference (TRL loads no reference model then): ops.grpo_loss takes None as "no
    # KL term" and reads no reference log-probs.
    if advantages.dim() == 2 and advantages.shape[1] == 1:
        advantages = advantages[:, 0]
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (TRL's normaliser B * max length)")
    for name, value in (("gradient_accumulation_steps", gradient_accumulation_steps),
                        ("steps_per_generation", steps_per_generation), ("num_processes", num_processes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    items = None
    token_normalised = loss_type in _TOKEN_NORMALISED
    if token_normalised and num_items_in_batch is not None:
        items = max(float(torch.as_tensor(num_items_in_batch).item()), 1.0)
    loss, stats = ops.grpo_loss(
        per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, completion_mask, beta=beta,
        clip_low=epsilon, clip_high=epsilon if epsilon_high is None else epsilon_high, loss_type=loss_type,
        max_completion_length=max_completion_length if loss_type == "dr_grpo" else None,
        num_items_in_batch=items, use_bias_correction_kl=use_bias_correction_kl, weights=weights,
        importance_sampling_level=importance_sampling_level, delta=delta,
        sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
        importance_sampling_ratio=importance_sampling_ratio, vespo_k_pos=vespo_k_pos,
        vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg)
    if token_normalised and items is not None:
        # TRL: sum / (clamp(N, 1) / processes * accumulation / steps_per_generation), where N counts the
        # tokens of the whole generation batch (all processes, all steps_per_generation slices).
        scale = num_processes * steps_per_generation / gradient_accumulation_steps
    else:
        scale = 1.0 / gradient_accumulation_steps
    return (loss if scale == 1.0 else loss * scale), stats


# TRL's loss types normalised by num_items_in_batch (GRPOTrainer._compute_loss: cispo, dapo, vespo).
_TOKEN_NORMALISED = ("dapo", "cispo", "vespo")


def _grpo_fallback_reason(trainer, inputs) -> str | None:
    import trl

    if not trl.__version__.startswith(MIRRORED_TRL):
        return f"TRL {trl.__version__} (rlkern mirrors GRPOTrainer._compute_loss of TRL {MIRRORED_TRL}x)"
    if trainer.loss_type not in ops.losses.GRPO_LOSS_TYPES:
        return f"loss_type={trainer.loss_type!r}"
    if trainer.importance_sampling_level not in ops.losses.GRPO_IS_LEVELS:
        return f"importance_sampling_level={trainer.importance_sampling_level!r}"
    if getattr(trainer, "use_adaptive_entropy", False):
        return "use_adaptive_entropy (the adaptive entropy controller)"
    if trainer.aux_loss_enabled:
        return "the MoE router aux loss"
    if not 0.0 <= trainer.epsilon_low < 1.0:
        return f"epsilon={trainer.epsilon_low} (rlkern's clip_low lies in [0, 1))"
    if trainer.loss_type in _TOKEN_NORMALISED and "num_items_in_batch" not in inputs:
        return f"a {trainer.loss_type} batch without num_items_in_batch"
    ratio = inputs.get("importance_sampling_ratio")
    if trainer.loss_type == "vespo" and ratio is not None and ratio.shape != inputs["completion_mask"].shape:
        # get_gamma_weights sums log IS ratios over the last dim; a (B, 1) sequence ratio is TRL's own
        # business (its __init__ allows vespo only with the token modes).
        return f"vespo with a {tuple(ratio.shape)} importance_sampling_ratio (rlkern takes TRL's [B, T] one)"
    return None


# The multimodal inputs GRPOTrainer._compute_loss forwards to _get_per_token_logps_and_entropies.
_MODEL_INPUT_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                     "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _high_entropy_mask(trainer, entropies: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """TRL's ``get_high_entropy_mask``: on one process :func:`rlkern.ops.high_entropy_mask` (the same
    rule, bitwise; its quantile is a selection, not torch.quantile's sort: ~13 ms against ~86 ms at
    256x4096 on the project's CPU); with several processes, or a subclass that overrides the method,
    TRL's own (it gathers every rank's entropies first)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    accelerator = getattr(trainer, "accelerator", None)
    if (type(trainer).get_high_entropy_mask is GRPOTrainer.get_high_entropy_mask
            and getattr(accelerator, "num_processes", None) == 1):
        calls["high_entropy_mask"] += 1
        return ops.high_entropy_mask(entropies, mask, threshold)
    return trainer.get_high_entropy_mask(entropies, mask, threshold)


def _surrogate_weights(trainer, inputs, per_token_logps, old, entropies, mask):
    """``(weights, entropy_mask)``: the per-token factor TRL multiplies the clipped surrogate by (not
    the KL term), built from the off-policy sequence mask (TRL's method), the high-entropy token mask
    (_high_entropy_mask) and the vLLM IS ratios, and the entropy mask alone (the entropy bonus uses it too);
    each None when no option asks for it."""
    weights, entropy_mask = None, None
    if trainer.off_policy_mask_threshold is not None:
        adv = inputs["advantages"]
        weights = trainer.get_off_policy_mask(
            advantages=adv if adv.dim() == 2 else adv.unsqueeze(1), per_token_logps=per_token_logps,
            sampling_per_token_logps=inputs.get("sampling_per_token_logps", old), mask=mask,
            off_policy_threshold=trainer.off_policy_mask_threshold).float()
    if trainer.top_entropy_quantile < 1.0:
        entropy_mask = _high_entropy_mask(trainer, entropies, mask, 1 - trainer.top_entropy_quantile)
        weights = entropy_mask.float() if weights is None else weights * entropy_mask
    # vespo folds the vLLM IS ratios into its gamma weights instead (wrap_grpo_compute_loss passes them).
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction and trainer.loss_type != "vespo":
        ratio = inputs["importance_sampling_ratio"].float()
        weights = ratio if weights is None else weights * ratio
    if weights is not None:
        weights = weights.expand(per_token_logps.shape)
    return weights, entropy_mask


def _global_mean(trainer, local_sum: Tensor, local_count: Tensor) -> float:
    local = torch.stack([local_sum.float(), local_count.float()])
    totals = trainer.accelerator.reduce(local, reduction="sum")
    return (totals[0] / totals[1].clamp(min=1.0)).item()


def _log_grpo_metrics(trainer, mode: str, stats: dict, per_token_logps, old, advantages, entropies,
                      mask) -> None:
    """The metrics GRPOTrainer._compute_loss logs (TRL 1.16), from rlkern's stats where they are batch
    means: kl and entropy always, the clip shares for the PPO-clip loss types, cispo_clip_ratio for
    cispo. At importance_sampling_level="sequence" with per-sequence advantages TRL's flags are
    (B, 1): its global mean counts rows, as rlkern's stats do then."""
    from trl.trainer.utils import nanmax, nanmin

    metrics = trainer._metrics[mode]
    count = mask.sum().float()
    if trainer.beta != 0.0:
        metrics["kl"].append(_global_mean(trainer, stats["kl"] * count, count))
    metrics["entropy"].append(_global_mean(trainer, (entropies.detach() * mask).sum(), count))
    sequence = trainer.importance_sampling_level == "sequence"
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    flag_count = torch.tensor(float(mask.shape[0])) if sequence and adv.shape[1] == 1 else count
    if trainer.loss_type == "cispo":
        metrics["cispo_clip_ratio"].append(_global_mean(trainer, stats["cispo_clip_ratio"] * flag_count,
                                                        flag_count))
    if trainer.loss_type == "vespo":  # phi is (B, 1) with per-sequence advantages: TRL counts rows
        rows = torch.tensor(float(mask.shape[0])) if adv.shape[1] == 1 else count
        metrics["vespo/phi_seq_mean"].append(_global_mean(trainer, stats["phi_seq_mean"] * rows, rows))
    if trainer.loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        return
    metrics["clip_ratio/low_mean"].append(_global_mean(trainer, stats["clip_ratio_low"] * flag_count,
                                                       flag_count))
    metrics["clip_ratio/high_mean"].append(_global_mean(trainer, stats["clip_ratio_high"] * flag_count,
                                                        flag_count))
    metrics["clip_ratio/region_mean"].append(_global_mean(trainer, stats["clip_ratio"] * flag_count,
                                                          flag_count))
    # Per-sequence clip shares for the min / max metrics (rlkern's stats are batch means), on TRL's
    # coef_1: the token or sequence ratio, after delta.
    with torch.no_grad():
        log_ratio = per_token_logps.detach() - old
        if sequence:
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
        coef = torch.exp(log_ratio)
        delta = getattr(trainer.args, "delta", None)
        if delta is not None:
            coef = coef.clamp(max=delta)
        low = ((coef < 1 - trainer.epsilon_low) & (adv < 0)).float()
        high = ((coef > 1 + trainer.epsilon_high) & (adv > 0)).float()
        per_seq = mask.sum(-1)

        def seq_mean(flag):
            return flag[:, 0] if flag.shape[1] == 1 else (flag * mask).sum(-1) / per_seq

        gather = trainer.accelerator.gather
        metrics["clip_ratio/low_min"].append(nanmin(gather(seq_mean(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(gather(seq_mean(high))).item())


def _add_entropy_bonus(trainer, mode: str, loss: Tensor, entropies: Tensor, mask: Tensor) -> Tensor:
    """TRL's static entropy bonus (``entropy_coef``, the documented objective L = L_policy - coef * H):
    H is the masked mean entropy of the micro-batch, divided by the accumulation steps only (never by
    a loss type's normaliser); TRL then logs the policy loss before the bonus (for grpo/bnpo/dr_grpo
    before the accumulation division, for dapo after its normaliser) and the coefficient."""
    train = mode == "train"
    accumulation = trainer.current_gradient_accumulation_steps if train else 1
    policy_loss = loss.detach() * (1 if trainer.loss_type in _TOKEN_NORMALISED else accumulation)
    entropy = (entropies * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
    metrics = trainer._metrics[mode]
    metrics["policy_loss"].append(trainer.accelerator.gather(policy_loss).nanmean().item())
    if train and trainer.accelerator.sync_gradients:
        metrics["entropy_coef"].append(trainer.entropy_coef)
    return loss - trainer.entropy_coef * entropy


def _vespo_args(args) -> dict:
    """GRPOConfig's vespo_k_pos / vespo_lambda_pos / vespo_k_neg / vespo_lambda_neg (TRL 1.16 defaults
    where a config lacks them)."""
    defaults = {"vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0}
    return {k: float(getattr(args, k, v)) for k, v in defaults.items()}


def wrap_grpo_compute_loss(original):
    """``GRPOTrainer._compute_loss`` with the loss from rlkern.ops.grpo_loss; the original for the
    options rlkern does not fuse (each named once in a warning)."""

    def _compute_loss(self, model, inputs):
        reason = _grpo_fallback_reason(self, inputs)
        if reason is not None:
            _fallback(f"grpo_loss:{reason}", f"GRPOTrainer's loss with {reason} is not fused by rlkern")
            return original(self, model, inputs)
        calls["grpo_loss"] += 1
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], completion_mask], dim=1), completion_ids.size(1),
            compute_entropy=True, **{k: inputs.get(k) for k in _MODEL_INPUT_KEYS})
        old = inputs.get("old_per_token_logps")
        old = per_token_logps.detach() if old is None else old
        mode = "train" if self.model.training else "eval"
        train = mode == "train"  # in eval TRL neither accumulates nor splits the batch
        weights, entropy_mask = _surrogate_weights(self, inputs, per_token_logps, old, entropies, mask)
        loss, stats = grpo_loss_and_stats(
            per_token_logps, old, inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            inputs["advantages"], mask, beta=self.beta, epsilon=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            loss_type=self.loss_type, max_completion_length=self.max_completion_length,
            num_items_in_batch=inputs.get("num_items_in_batch"),
            use_bias_correction_kl=bool(getattr(self.args, "use_bias_correction_kl", False)),
            gradient_accumulation_steps=self.current_gradient_accumulation_steps if train else 1,
            steps_per_generation=self.args.steps_per_generation if train else 1,
            num_processes=self.accelerator.num_processes, weights=weights,
            importance_sampling_level=self.importance_sampling_level, delta=getattr(self.args, "delta", None),
            sapo_temperature_pos=getattr(self.args, "sapo_temperature_pos", 1.0),
            sapo_temperature_neg=getattr(self.args, "sapo_temperature_neg", 1.05),
            # TRL's get_gamma_weights reads inputs.get("importance_sampling_ratio") whatever use_vllm says.
            importance_sampling_ratio=inputs.get("importance_sampling_ratio") if self.loss_type == "vespo"
            else None, **_vespo_args(self.args))
        if getattr(self, "_entropy_bonus_enabled", False):
            loss = _add_entropy_bonus(self, mode, loss, entropies,
                                      mask if entropy_mask is None else mask * entropy_mask)
        _log_grpo_metrics(self, mode, stats, per_token_logps, old, inputs["advantages"], entropies, mask)
        return loss

    _compute_loss.__name__ = _compute_loss.__qualname__ = original.__name__
    _compute_loss.__doc__ = original.__doc__
    _compute_loss.original_function = original
    return _compute_loss
