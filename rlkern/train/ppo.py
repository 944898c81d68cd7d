"""PPO with a critic (clip, and the KL-penalty variant), and the on-policy machinery TRPO shares.

One step: sample responses with the KV cache -> recompute old and reference log-probs with
rlkern.ops -> score (reward model at the last token, or exact match) -> KL-shaped token rewards
(``ops.token_rewards``) -> GAE with the critic's values (``ops.gae``) -> whitening
(``ops.masked_whiten``) -> ``ppo_epochs`` x shuffled minibatches of clipped policy loss
(``ops.policy_loss``) + c1 x clipped value loss (``ops.value_loss``) - c2 x entropy, gradient clipping,
AdamW; optional early stop on the approximate KL; a fixed or adaptive KL controller for beta.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from rlkern import ops
from rlkern.train.common import Stage, check_divisible, final_dir, load_weights, ops_backend
from rlkern.train.models import HeadModel, save_causal_lm
from rlkern.train.rollout import Sequences, decode_responses, generate, token_logprobs
from rlkern.train.run import Timer

__all__ = ["train_ppo", "OnPolicy", "Rollout"]


@dataclass
class Rollout:
    """One step's experience, all ``[B, R]`` except ``scores`` ``[B]``; detached."""

    seqs: Sequences
    logp: Tensor
    ref_logp: Tensor
    values: Tensor | None
    scores: Tensor
    advantages: Tensor | None = None
    returns: Tensor | None = None

    @property
    def mask(self) -> Tensor:
        return self.seqs.response_mask

    def index(self, idx: Tensor) -> "Rollout":
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Rollout(self.seqs.index(idx), self.logp[idx], self.ref_logp[idx], pick(self.values),
                       self.scores[idx],
                       pick(self.advantages), pick(self.returns))


def critic_values(critic: HeadModel, seqs: Sequences) -> Tensor:
    """V(s_t) for each response token t: the value head at the column that predicts token t ``[B, R]``."""
    values = critic(seqs.input_ids, seqs.attention_mask, seqs.position_ids)
    return values[:, seqs.prompt_len - 1:-1]


class OnPolicy:
    """Models and rollouts of the on-policy algorithms: policy, frozen reference, optional critic,
    reward (rule or reward model); the reference is the starting policy, refreshed every
    ``--ref-sync-every`` steps when asked."""

    def __init__(self, stage: Stage, *, with_critic: bool):
        cfg = self.cfg = stage.cfg
        self.stage, self.run = stage, stage.run
        self.policy, self.tok = stage.start_model()
        self.ref = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.critic = None
        if with_critic:
            # The critic starts from the policy's backbone with a fresh value head.
            self.critic = HeadModel(copy.deepcopy(self.policy), "value").to(stage.device)
            self.run.broadcast_module(self.critic)
        mode = cfg.reward if cfg.reward != "auto" else ("model" if cfg.reward_model else "rule")
        if mode == "model" and not cfg.reward_model:
            raise ValueError("--reward model needs --reward-model DIR (a directory written by the rm stage)")
        self.reward_model = None
        if mode == "model":
            self.reward_model, _ = stage.head_model(cfg.reward_model, "reward", load_head=True,
                                                   flag="--reward-model")
            self.reward_model.eval().requires_grad_(False)
        self.reward_mode = mode
        self.timer = Timer()

    def savers(self) -> dict:
        out = {"policy": lambda p: save_causal_lm(self.policy, self.tok, p)}
        if self.critic is not None:
            out["critic"] = lambda p: self.critic.save(self.tok, p)
        if self.cfg.ref_sync_every:
            out["reference"] = lambda p: save_causal_lm(self.ref, self.tok, p)
        return out

    def restore(self, ckpt: str) -> None:
        load_weights(self.policy, os.path.join(ckpt, "policy"))
        if self.critic is not None:
            load_weights(self.critic, os.path.join(ckpt, "critic"))
        if self.cfg.ref_sync_every:
            load_weights(self.ref, os.path.join(ckpt, "reference"))

    def end_step(self, step: int, ro: "Rollout", t0: float, metrics: dict, bar, save) -> None:
        """What every on-policy step ends with: the step's timings and tokens/s, the held-out
        evaluation every ``--eval-every`` steps and at the last, the log line, the progress bar, and
        ``save(step)`` every ``--save-every`` steps and at the last."""
        cfg, run = self.cfg, self.run
        metrics.update(self.timer.pop())
        n_tokens = float(ro.seqs.attention_mask.sum()) * run.world
        metrics["perf/tokens_per_s"] = n_tokens / (time.perf_counter() - t0)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            metrics.update(self.stage.evaluate(self.policy, self.tok, self.reward_model, self.ref,
                                               max_new_tokens=cfg.max_new_tokens))
        run.log(step, metrics)
        bar.update(1)
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            save(step)

    def finish(self) -> dict:
        """Closes the run: the time breakdown, then the policy (and critic) saved to final/."""
        run = self.run
        run.close_progress()
        run.print_time_breakdown()
        final = final_dir(run.dir)
        if run.main:
            save_causal_lm(self.policy, self.tok, final)
            if self.critic is not None:
                self.critic.save(self.tok, os.path.join(final, "critic"))
        run.mark_done()
        return {"dir": run.dir, "model": final}

    def maybe_sync_ref(self, step: int) -> None:
        if self.cfg.ref_sync_every and step % self.cfg.ref_sync_every == 0:
            self.ref.load_state_dict(self.policy.state_dict())

    @torch.no_grad()
    def rollout(self, problems: Tensor, *, repeat: int = 1) -> tuple[Rollout, dict[str, float]]:
        """Samples ``repeat`` responses per problem and scores them; log-probs of the policy and the
        reference and (with a critic) values are recomputed on the finished sequences."""
        cfg, stage, timer = self.cfg, self.stage, self.timer
        problems = problems.repeat_interleave(repeat, 0)
        ids, mask = stage.prompts(self.tok, problems)
        self.policy.eval()
        with timer("generate"):
            seqs = generate(self.policy, self.tok, ids, mask, max_new_tokens=cfg.max_new_tokens,
                            temperature=cfg.temperature)
        with timer("logprobs"):
            logp = token_logprobs(self.policy, seqs, temperature=cfg.temperature)
            ref_logp = token_logprobs(self.ref, seqs, temperature=cfg.temperature)
            values = critic_values(self.critic, seqs) if self.critic is not None else None
        self.policy.train()
        with timer("reward"):
            correct = stage.task.reward(problems, decode_responses(self.tok, seqs)).to(stage.device)
            scores = correct if self.reward_model is None else stage.score(self.reward_model, seqs)
        m = seqs.response_mask
        seq_kl = ops.masked_sum(ops.kl(logp, ref_logp, "k1"), m, dim=-1)
        metrics = {"rollout/reward_mean": float(scores.mean()), "rollout/reward_std": float(scores.std()),
                   "rollout/accuracy": float(correct.mean()), "rollout/kl": float(seq_kl.mean()),
                   "rollout/response_len": float(m.sum(-1).mean())}
        return Rollout(seqs, logp, ref_logp, values, scores), metrics

    def advantages(self, ro: Rollout, kl_coef: float, *, estimator: str = "k1") -> None:
        """Token rewards (score at the last token - beta * KL), GAE and whitening, in place on ``ro``."""
        cfg = self.cfg
        with self.timer("advantages"):
            rewards = ops.token_rewards(ro.scores, ro.logp, ro.ref_logp, ro.mask, kl_coef=kl_coef,
                                        estimator=estimator)
            adv, ret = ops.gae(rewards, ro.values, ro.mask, gamma=cfg.gamma, lam=cfg.lam)
            if getattr(cfg, "whiten_advantages", True):
                adv = ops.masked_whiten(adv, ro.mask)
        ro.advantages, ro.returns = adv, ret


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
    start = run.prepare()
    run.print_config()
    policy, critic = op.policy, op.critic
    per_rank = run.shard(cfg.rollout_batch, "--rollout-batch")
    mb_size = check_divisible(per_rank, cfg.minibatches, "the per-process rollout batch", "minibatches")
    pol_opt = stage.optimizer(policy.parameters(), cfg.lr)
    val_opt = stage.optimizer(critic.parameters(), cfg.critic_lr)
    # The reward-shaping beta: fixed or adaptive for PPO-clip; PPO-penalty keeps it fixed and adapts
    # the in-loss penalty instead.
    reward_ctl = _controller(cfg, False)
    penalty_ctl = _controller(cfg, True) if penalty else None
    run.generators["data"] = stage.data_rng
    if start:
        ckpt, state = run.load_checkpoint()
        op.restore(ckpt)
        pol_opt.load_state_dict(state["policy_optimizer"])
        val_opt.load_state_dict(state["critic_optimizer"])
        reward_ctl.load_state_dict(state["reward_kl_controller"])
        if penalty_ctl is not None:
            penalty_ctl.load_state_dict(state["penalty_kl_controller"])

    def checkpoint(step):
        state = {"policy_optimizer": pol_opt.state_dict(), "critic_optimizer": val_opt.state_dict(),
                 "reward_kl_controller": reward_ctl.state_dict()}
        if penalty_ctl is not None:
            state["penalty_kl_controller"] = penalty_ctl.state_dict()
        run.save_checkpoint(step, op.savers(), state)

    with ops_backend(cfg.ops):
        if start == 0:
            run.log(0, stage.evaluate(policy, op.tok, op.reward_model, max_new_tokens=cfg.max_new_tokens))
        bar = run.progress(start, cfg.steps, command)
        for step in range(start + 1, cfg.steps + 1):
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
            metrics["kl/beta"] = reward_ctl.value
            if penalty:
                metrics["kl/penalty_beta"] = penalty_ctl.value
            op.end_step(step, ro, t0, metrics, bar, checkpoint)
    return op.finish()


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
