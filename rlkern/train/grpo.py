"""GRPO: ``group_size`` samples per prompt, group-relative advantages (``ops.group_advantages``:
grpo / Dr. GRPO / RLOO / win-rate), the clipped surrogate + beta * k3 KL to the reference
(``ops.grpo_loss`` with ``loss_type`` grpo / bnpo / dr_grpo / dapo, and the variants it implements:
GSPO's sequence-level ratio, CISPO, SAPO, LUSPO), no critic.

Two per-token weights multiply the surrogate, as in TRL's ``_compute_loss``:

* ``--is-correction``: rollout-correction weights (``ops.rollout_correction``, OpenRLHF's tis / icepop
  / seq-mask-tis) between the trainer's log-probs of the rollout and the sampler's, computed once per
  rollout. In this trainer both come from the same fp32 model (the sampler's token by token with the
  KV cache, the trainer's from one full forward pass), so they differ only by rounding: the weights are
  ~1 (``rollout/is_log_ratio_max`` logs the largest gap).
* ``--top-entropy-quantile``: only the top quantile of valid tokens by entropy keeps its surrogate
  (``ops.high_entropy_mask``: TRL's ``get_high_entropy_mask`` without host synchronisation; the
  quantile is over each process's tokens, where TRL gathers every rank's first).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from rlkern import ops
from rlkern.train.common import Stage, check_divisible, ops_backend
from rlkern.train.onpolicy import OnPolicy
from rlkern.train.rollout import token_logprobs

__all__ = ["train_grpo", "is_correction_weights"]


def train_grpo(cfg, out: str | None = None) -> dict:
    """Runs GRPO; returns ``{"dir", "model"}``."""
    stage = Stage(cfg, "grpo", out)
    run = stage.run
    op = OnPolicy(stage, with_critic=False)  # bad model directories fail before the run directory is touched
    start = stage.begin()
    policy = op.policy
    per_rank = run.shard(cfg.rollout_batch, "--rollout-batch")
    n_seq = per_rank * cfg.group_size
    # Minibatches hold whole groups, so every group's advantages are computed over the full group.
    groups_per_mb = check_divisible(per_rank, cfg.minibatches, "the per-process prompt batch", "minibatches")
    opt = stage.optimizer(policy.parameters(), cfg.lr)
    if start:
        ckpt, state = run.load_checkpoint()
        op.restore(ckpt)
        opt.load_state_dict(state["optimizer"])

    def checkpoint(step):
        run.save_checkpoint(step, op.savers(), {"optimizer": opt.state_dict()})

    with ops_backend(cfg.ops):
        for step in stage.steps(start, op.evaluate):
            t0 = time.perf_counter()
            ro, metrics = op.rollout(stage.problems(per_rank), repeat=cfg.group_size)
            with op.timer("advantages"):
                adv = ops.group_advantages(ro.scores, group_size=cfg.group_size, method=cfg.method,
                                           scale_by_std=cfg.scale_by_std)
            is_weights = None
            if cfg.is_correction != "none":
                is_weights = is_correction_weights(cfg, ro.logp, ro.seqs.sampling_logp, ro.mask)
                metrics.update(_is_metrics(is_weights, ro.logp, ro.seqs.sampling_logp, ro.mask))
            with op.timer("update"):
                stats = _update(stage, op, ro, adv, opt, groups_per_mb * cfg.group_size, n_seq, is_weights)
            op.maybe_sync_ref(step)
            metrics.update(stats)
            stage.end_step(step, metrics, t0=t0, tokens=ro.seqs.n_tokens, evaluate=op.evaluate,
                           save=checkpoint)
    return stage.finish(op.save_final)


def is_correction_weights(cfg, logp: Tensor, sampling_logp: Tensor, mask: Tensor) -> Tensor:
    """OpenRLHF's ``PolicyLoss`` vLLM IS correction (``vllm_is_correction_type``) through
    ``ops.rollout_correction``, with ``d = logp - sampling_logp`` and ``[lo, hi] = [--is-clip-low,
    --is-clip-high]``: tis ``clamp(exp(d), lo, hi)``; icepop ``exp(d)``, 0 outside ``[lo, hi]``;
    seq-mask-tis ``exp(d)``, 0 for a row whose ``exp(masked mean d)`` is outside ``[lo, hi]``."""
    lo, hi = cfg.is_clip_low, cfg.is_clip_high
    options = {"tis": {"mode": "truncate", "lower": lo, "upper": hi},
               "icepop": {"mode": "mask", "lower": lo, "upper": hi},
               "seq-mask-tis": {"mode": "none", "upper": None, "seq_gate": (lo, hi)}}[cfg.is_correction]
    return ops.rollout_correction(logp, sampling_logp, mask, level="token", padding="raw", log_clamp=None,
                                  metrics=False, **options).weights


def _is_metrics(weights: Tensor, logp: Tensor, sampling_logp: Tensor, mask: Tensor) -> dict[str, float]:
    gap = torch.where(mask != 0, (logp - sampling_logp).abs(), 0.0).amax()  # [B, R] with R >= 1
    return {"rollout/is_weight_mean": float(ops.masked_mean(weights, mask)),
            "rollout/is_log_ratio_max": float(gap)}


def _update(stage: Stage, op: OnPolicy, ro, adv, opt, mb_seqs: int, n_seq: int,
            is_weights: Tensor | None = None) -> dict[str, float]:
    cfg = stage.cfg
    loss_type, level = cfg.loss_type, cfg.importance_sampling_level
    if loss_type == "gspo":
        loss_type, level = "grpo", "sequence"
    extra = {} if level == "token" else {"importance_sampling_level": level}
    entropy_masking = cfg.top_entropy_quantile < 1.0
    sums: dict[str, float] = {}
    count = 0
    n_groups = n_seq // cfg.group_size
    for _epoch in range(cfg.ppo_epochs):
        # Shuffle whole groups, then expand to their sequences.
        order = torch.randperm(n_groups, generator=stage.data_rng)
        seq_order = (order[:, None] * cfg.group_size + torch.arange(cfg.group_size)).reshape(-1)
        for lo in range(0, n_seq, mb_seqs):
            idx = seq_order[lo:lo + mb_seqs].to(stage.device)
            mb = ro.index(idx)
            weights = None if is_weights is None else is_weights[idx]
            if entropy_masking:
                logp, ent = token_logprobs(op.policy, mb.seqs, temperature=cfg.temperature, with_entropy=True)
                # TRL: get_high_entropy_mask(entropies, mask, 1 - top_entropy_quantile)
                keep = ops.high_entropy_mask(ent.detach(), mb.mask, 1.0 - cfg.top_entropy_quantile).float()
                weights = keep if weights is None else weights * keep
            else:
                logp = token_logprobs(op.policy, mb.seqs, temperature=cfg.temperature)
            kwargs = dict(extra)
            if loss_type in ("dapo", "cispo"):
                # DAPO (and TRL's CISPO) normalise by the global token count: the mean over ranks of the
                # local counts, since the ranks' gradients are then averaged.
                kwargs["num_items_in_batch"] = float(stage.run.all_mean(mb.mask.sum().double()))
            if loss_type == "dr_grpo":
                kwargs["max_completion_length"] = cfg.max_new_tokens
            if weights is not None:
                kwargs["weights"] = weights
            loss, stats = ops.grpo_loss(logp, mb.logp, mb.ref_logp, adv[idx], mb.mask, beta=cfg.beta,
                                        clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                        loss_type=loss_type,
                                        **kwargs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = stage.step_optimizer(opt, op.policy.parameters())
            batch = {"policy/loss": loss.item(), "policy/approx_kl": float(stats["approx_kl"]),
                     "policy/clipfrac": float(stats["clip_ratio"]), "policy/kl_to_ref": float(stats["kl"]),
                     "policy/grad_norm": norm}
            if entropy_masking:
                batch["policy/entropy_mask_frac"] = float(ops.masked_mean(keep, mb.mask))
            for k, v in batch.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    return {k: v / count for k, v in sums.items()}
