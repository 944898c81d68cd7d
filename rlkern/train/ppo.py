"""PPO with a critic (clip, and the KL-penalty variant); the machinery it shares with GRPO and TRPO
is in :mod:`rlkern.train.onpolicy`.

One step: sample responses with the KV cache -> recompute old and reference log-probs with
rlkern.ops -> score (reward model at the last token, or exact match) -> KL-shaped token rewards
(``ops.token_rewards``) -> GAE with the critic's values (``ops.gae``) -> whitening
(``ops.masked_whiten``) -> ``ppo_epochs`` x shuffled minibatches of clipped policy loss
(``ops.policy_loss``) + c1 x clipped value loss (``ops.value_loss``) - c2 x entropy, gradient clipping,
AdamW; optional early stop on the approximate KL; a fixed or adaptive KL controller for beta.
"""

from __future__ import annotations

import time

import torch

from rlkern import ops
from rlkern.train.common import Stage, check_divisible, ops_backend
from rlkern.train.onpolicy import OnPolicy, Rollout, critic_values
from rlkern.train.rollout import token_logprobs

__all__ = ["train_ppo"]


def _controller(cfg, penalty: bool):
    if penalty:
        return ops.PenaltyKLController(cfg.penalty_beta, cfg.kl_target)
    if cfg.adaptive_kl:
        return ops.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return ops.FixedKLController(cfg.kl_coef)


def train_ppo(cfg, out: str | None = None, *, penalty: bool = False) -> dict:
    """PPO-clip (``penalty=False``) or PPO-penalty; returns ``{"dir", "model", ...}``."""
    command = "ppo-penalty" if penalty else "ppo"
    stage = Stage(cfg, command, out)
    run = stage.run
    op = OnPolicy(stage, with_critic=True)  # bad model directories fail before the run directory is touched
    start = stage.begin()
    policy, critic = op.policy, op.critic
    per_rank = run.shard(cfg.rollout_batch, "--rollout-batch")
    mb_size = check_divisible(per_rank, cfg.minibatches, "the per-process rollout batch", "minibatches")
    pol_opt = stage.optimizer(policy.parameters(), cfg.lr)
    val_opt = stage.optimizer(critic.parameters(), cfg.critic_lr)
    # The reward-shaping beta: fixed or adaptive for PPO-clip; PPO-penalty keeps it fixed and adapts
    # the in-loss penalty instead.
    reward_ctl = _controller(cfg, False)
    penalty_ctl = _controller(cfg, True) if penalty else None
    if start:
        ckpt, state = run.load_checkpoint()
        op.restore(ckpt)
        pol_opt.load_state_dict(state["policy_optimizer"])
        val_opt.load_state_dict(state["critic_optimizer"])
        reward_ctl.load_state_dict(state["reward_kl_controller"])
        op.load_state_dict(state)
        if penalty_ctl is not None:
            penalty_ctl.load_state_dict(state["penalty_kl_controller"])

    def checkpoint(step):
        state = {"policy_optimizer": pol_opt.state_dict(), "critic_optimizer": val_opt.state_dict(),
                 "reward_kl_controller": reward_ctl.state_dict()}
        if penalty_ctl is not None:
            state["penalty_kl_controller"] = penalty_ctl.state_dict()
        run.save_checkpoint(step, op.savers(), {**state, **op.state_dict()})

    with ops_backend(cfg.ops):
        for step in stage.steps(start, op.evaluate):
            t0 = time.perf_counter()
            ro, metrics = op.rollout(stage.problems(per_rank))
            op.advantages(ro, reward_ctl.value, estimator=cfg.kl_estimator)
            beta = penalty_ctl.value if penalty else None
            with op.timer("update"):
                stats = _update(stage, op, ro, pol_opt, val_opt, mb_size, beta)
            if penalty:
                penalty_ctl.update(stats["policy/kl_old_new"], cfg.rollout_batch)
            reward_ctl.update(metrics["rollout/kl"], cfg.rollout_batch)
            op.maybe_sync_ref(step)
            metrics.update(stats)
            metrics.update(op.maybe_refresh_reward_model(step))
            stop = op.early_stop(step, metrics)
            metrics["kl/beta"] = reward_ctl.value
            if penalty:
                metrics["kl/penalty_beta"] = penalty_ctl.value
            stage.end_step(step, metrics, t0=t0, tokens=ro.seqs.n_tokens, evaluate=op.evaluate,
                           save=checkpoint, last=stop)
            if stop:
                break
    return stage.finish(op.save_final)


def _update(stage: Stage, op: OnPolicy, ro: Rollout, pol_opt, val_opt, mb_size: int, beta: float | None):
    """``ppo_epochs`` x shuffled minibatches; ``beta`` set = PPO-penalty (no clip, beta * KL(old||new))."""
    cfg, run = stage.cfg, stage.run
    policy, critic = op.policy, op.critic
    n = len(ro.seqs)
    sums: dict[str, float] = {}
    count = 0
    stopped = 0.0
    for _epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(n, generator=stage.data_rng)
        for lo in range(0, n, mb_size):
            mb = ro.index(perm[lo:lo + mb_size].to(stage.device))
            m = mb.mask
            logp, ent = token_logprobs(policy, mb.seqs, temperature=cfg.temperature, with_entropy=True)
            if beta is None:
                pl, pstats = ops.policy_loss(logp, mb.logp, mb.advantages, m, clip_low=cfg.clip_low,
                                             clip_high=cfg.clip_high)
                approx_kl, clipfrac = pstats["approx_kl"], pstats["clip_frac"]
                kl_old_new = approx_kl
            else:
                # Unclipped surrogate -r A plus beta * KL(pi_old || pi), the KL as the sampled k3
                # estimator under pi_old: kl(old, new, "k3") = e^(new-old) - (new-old) - 1.
                ratio = torch.exp(torch.clamp(logp - mb.logp, -20.0, 20.0))
                kl_tok = ops.kl(mb.logp, logp, "k3")
                kl_old_new = ops.masked_mean(kl_tok, m)
                pl = ops.masked_mean(-ratio * mb.advantages, m) + beta * kl_old_new
                approx_kl = ops.masked_mean((mb.logp - logp).detach(), m)
                clipfrac = torch.zeros(())
            values = critic_values(critic, mb.seqs)
            vl, vstats = ops.value_loss(values, mb.values, mb.returns, m, clip=cfg.value_clip)
            entropy = ops.masked_mean(ent, m)
            loss = pl + cfg.vf_coef * vl - cfg.ent_coef * entropy
            pol_opt.zero_grad(set_to_none=True)
            val_opt.zero_grad(set_to_none=True)
            loss.backward()
            pol_norm = stage.step_optimizer(pol_opt, policy.parameters())
            val_norm = stage.step_optimizer(val_opt, critic.parameters())
            batch = {"policy/loss": pl.item(), "policy/approx_kl": approx_kl.item(),
                     "policy/clipfrac": clipfrac.item(),
                     "policy/entropy": entropy.item(), "policy/grad_norm": pol_norm, "policy/kl_old_new":
                     kl_old_new.item(), "value/loss": vl.item(), "value/clipfrac": float(vstats["clip_frac"]),
                     "value/grad_norm": val_norm}
            for k, v in batch.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
        # Early stop on the approximate KL of the last minibatch, averaged over ranks so that every
        # rank takes the same decision.
        if cfg.target_kl > 0:
            kl_now = float(run.all_mean(torch.tensor([batch["policy/approx_kl"]], dtype=torch.float64)))
            if kl_now > 1.5 * cfg.target_kl:
                stopped = 1.0
                break
    out = {k: v / count for k, v in sums.items()}
    out["policy/early_stop"] = stopped
    return out
