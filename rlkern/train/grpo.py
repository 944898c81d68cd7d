"""GRPO: ``group_size`` samples per prompt, group-relative advantages (``ops.group_advantages``:
grpo / Dr. GRPO / RLOO / win-rate), the clipped surrogate + beta * k3 KL to the reference
(``ops.grpo_loss`` with ``loss_type`` grpo / bnpo / dr_grpo / dapo), no critic."""

from __future__ import annotations

import time

import torch

from rlkern import ops
from rlkern.train.common import Stage, check_divisible, ops_backend
from rlkern.train.onpolicy import OnPolicy
from rlkern.train.rollout import token_logprobs

__all__ = ["train_grpo"]


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
            with op.timer("update"):
                stats = _update(stage, op, ro, adv, opt, groups_per_mb * cfg.group_size, n_seq)
            op.maybe_sync_ref(step)
            metrics.update(stats)
            stage.end_step(step, metrics, t0=t0, tokens=ro.seqs.n_tokens, evaluate=op.evaluate,
                           save=checkpoint)
    return stage.finish(op.save_final)


def _update(stage: Stage, op: OnPolicy, ro, adv, opt, mb_seqs: int, n_seq: int) -> dict[str, float]:
    cfg = stage.cfg
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
            logp = token_logprobs(op.policy, mb.seqs, temperature=cfg.temperature)
            kwargs = {}
            if cfg.loss_type == "dapo":
                # DAPO normalises by the global token count: the mean over ranks of the local counts,
                # since the ranks' gradients are then averaged.
                kwargs["num_items_in_batch"] = float(stage.run.all_mean(mb.mask.sum().double()))
            if cfg.loss_type == "dr_grpo":
                kwargs["max_completion_length"] = cfg.max_new_tokens
            loss, stats = ops.grpo_loss(logp, mb.logp, mb.ref_logp, adv[idx], mb.mask, beta=cfg.beta,
                                        clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                        loss_type=cfg.loss_type,
                                        **kwargs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = stage.step_optimizer(opt, op.policy.parameters())
            batch = {"policy/loss": loss.item(), "policy/approx_kl": float(stats["approx_kl"]),
                     "policy/clipfrac": float(stats["clip_ratio"]), "policy/kl_to_ref": float(stats["kl"]),
                     "policy/grad_norm": norm}
            for k, v in batch.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    return {k: v / count for k, v in sums.items()}
