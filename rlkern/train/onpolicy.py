"""The on-policy machinery PPO, PPO-penalty, GRPO and TRPO share: the policy, its frozen reference,
the optional critic, the reward (the exact-match checker or a reward model), one step's rollout, the
KL-shaped advantages, the held-out evaluation and the final save.

With a reward model, the measures against reward over-optimisation live here (Gao et al. 2022,
"Scaling laws for reward model overoptimization", and InstructGPT's recipe); the README's training
section has the ablation that says which mattered:

* iterated RLHF (``--rm-refresh-every``, ``--rm-refresh-steps``, ``--rm-refresh-lr``): every K steps
  the reward model is trained further on the policy's own recent samples, labelled by the checker
  (the "human" of this task), so the mistakes the policy drifts into are the ones the reward model
  has just seen;
* a per-prompt baseline (``--reward-baseline greedy``, ReMax): the score of the policy's own greedy
  answer is subtracted;
* reward normalisation and clipping (``--reward-whiten``, ``--reward-clip``): scores are whitened over
  the rollout and clipped, so one exploited, extreme score cannot dominate an update;
* the KL penalty to the SFT reference in the token rewards (``--kl-coef``, ``--adaptive-kl``);
* early stopping on reward-model/checker disagreement (``--early-stop-patience``): at every refresh the
  checker grades the policy's greedy answers on a fixed slice of *training* problems (never the
  held-out ones) beside the reward model's score of the same answers; when the checker's accuracy has
  not improved for that many checks the run stops, and the policy it ends with is the best one seen.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from rlkern import ops
from rlkern.train.common import Stage, load_weights
from rlkern.train.models import HeadModel, save_causal_lm
from rlkern.train.rollout import Sequences, decode_responses, generate, token_logprobs

__all__ = ["OnPolicy", "Rollout", "critic_values"]


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

    def index(self, idx: Tensor) -> Rollout:
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
        self.refresh_every = getattr(cfg, "rm_refresh_every", 0) if mode == "model" else 0
        self.rm_opt = None
        if mode == "model":
            self.reward_model, _ = stage.head_model(cfg.reward_model, "reward", load_head=True,
                                                   flag="--reward-model")
            self.reward_model.eval().requires_grad_(False)
            if self.refresh_every:
                self.reward_model.requires_grad_(True)
                self.rm_opt = stage.optimizer(self.reward_model.parameters(), cfg.rm_refresh_lr)
        # The policy's samples since the last reward-model refresh: (problems [n, 2], response texts).
        self.recent: list[tuple[Tensor, list[str]]] = []
        self.reward_mode = mode
        self.timer = stage.timer
        # Early stopping: a fixed slice of training problems (same on every rank) graded by the checker.
        self.patience = getattr(cfg, "early_stop_patience", 0) if self.refresh_every else 0
        self.best = {"accuracy": -1.0, "step": 0, "checks_since": 0, "policy": None}
        if self.patience:
            pool = stage.task.train
            g = torch.Generator().manual_seed(cfg.seed * 131 + 7)
            self.check_problems = pool[torch.randperm(len(pool), generator=g)[: cfg.early_stop_size]]

    def savers(self) -> dict:
        out = {"policy": lambda p: save_causal_lm(self.policy, self.tok, p)}
        if self.critic is not None:
            out["critic"] = lambda p: self.critic.save(self.tok, p)
        if self.cfg.ref_sync_every:
            out["reference"] = lambda p: save_causal_lm(self.ref, self.tok, p)
        if self.rm_opt is not None:
            out["reward_model"] = lambda p: self.reward_model.save(self.tok, p)
        return out

    def state_dict(self) -> dict:
        """What a checkpoint needs beyond the models for an exact resume of the reward-model refresh
        (and of early stopping: the best policy so far and its accuracy)."""
        if self.rm_opt is None:
            return {}
        return {"reward_model_optimizer": self.rm_opt.state_dict(),
                "recent_samples": [(p.clone(), list(t)) for p, t in self.recent], "early_stop": self.best}

    def load_state_dict(self, state: dict) -> None:
        if self.rm_opt is not None:
            self.rm_opt.load_state_dict(state["reward_model_optimizer"])
            self.recent = [(p, list(t)) for p, t in state["recent_samples"]]
            self.best = state.get("early_stop", self.best)

    @torch.no_grad()
    def early_stop(self, step: int, metrics: dict) -> bool:
        """Early stopping on reward-model/checker disagreement, every ``--rm-refresh-every`` steps: the
        checker's greedy accuracy on the fixed training slice and the reward model's mean score of the
        same answers go into ``metrics`` (``early_stop/accuracy``, ``early_stop/rm_score``). The best
        policy so far is kept; after ``--early-stop-patience`` checks without a better accuracy (the
        reward model still being optimised while the checker disagrees), or at the last step, the
        policy is set back to it and True is returned at a stop. Without a reward model or with
        patience 0: never."""
        last = step == self.cfg.steps
        if not self.patience or (step % self.refresh_every and not last):
            return False
        stage, best = self.stage, self.best
        was_training = self.policy.training
        self.policy.eval()
        ids, mask = stage.prompts(self.tok, self.check_problems)
        seqs = generate(self.policy, self.tok, ids, mask, max_new_tokens=self.cfg.max_new_tokens, greedy=True)
        self.policy.train(was_training)
        acc = float(stage.task.reward(self.check_problems, decode_responses(self.tok, seqs)).mean())
        metrics["early_stop/accuracy"] = acc
        metrics["early_stop/rm_score"] = float(stage.score(self.reward_model, seqs).mean())
        if acc > best["accuracy"]:
            best.update(accuracy=acc, step=step, checks_since=0,
                        policy={k: v.detach().clone() for k, v in self.policy.state_dict().items()})
        else:
            best["checks_since"] += 1
        stop = best["checks_since"] >= self.patience
        metrics["early_stop/best_step"] = best["step"]
        if (stop or last) and best["step"] != step:
            self.policy.load_state_dict(best["policy"])
        return stop and not last

    def restore(self, ckpt: str) -> None:
        load_weights(self.policy, os.path.join(ckpt, "policy"))
        if self.critic is not None:
            load_weights(self.critic, os.path.join(ckpt, "critic"))
        if self.cfg.ref_sync_every:
            load_weights(self.ref, os.path.join(ckpt, "reference"))
        if self.rm_opt is not None:
            load_weights(self.reward_model, os.path.join(ckpt, "reward_model"))

    def evaluate(self) -> dict[str, float]:
        """The held-out evaluation: greedy accuracy, the reward model's score of those answers (with a
        reward model) and the KL to the reference."""
        return self.stage.evaluate(self.policy, self.tok, self.reward_model, self.ref,
                                   max_new_tokens=self.cfg.max_new_tokens)

    def save_final(self, path: str) -> None:
        """The policy into ``path`` (and the critic into ``path/critic``)."""
        save_causal_lm(self.policy, self.tok, path)
        if self.critic is not None:
            self.critic.save(self.tok, os.path.join(path, "critic"))

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
                            temperature=cfg.temperature,
                            record_logprobs=getattr(cfg, "is_correction", "none") != "none")
        with timer("logprobs"):
            logp = token_logprobs(self.policy, seqs, temperature=cfg.temperature)
            ref_logp = token_logprobs(self.ref, seqs, temperature=cfg.temperature)
            values = critic_values(self.critic, seqs) if self.critic is not None else None
        self.policy.train()
        texts = decode_responses(self.tok, seqs)
        with timer("reward"):
            # The checker always scores the samples for the metrics; it is the reward only in rule mode.
            correct = stage.task.reward(problems, texts).to(stage.device)
            metrics = {"rollout/accuracy": float(correct.mean())}
            if self.reward_model is None:
                scores = correct
            else:
                raw = stage.score(self.reward_model, seqs)
                metrics["rollout/rm_score"] = float(raw.mean())
                if getattr(cfg, "reward_baseline", "none") == "greedy":
                    raw = raw - self._greedy_score(ids, mask)
                scores = self._normalise(raw)
                if self.refresh_every:
                    self.recent.append((problems.cpu(), texts))
        m = seqs.response_mask
        seq_kl = ops.masked_sum(ops.kl(logp, ref_logp, "k1"), m, dim=-1)
        metrics.update({"rollout/reward_mean": float(scores.mean()),
                        "rollout/reward_std": float(scores.std()), "rollout/kl": float(seq_kl.mean()),
                        "rollout/response_len": float(m.sum(-1).mean())})
        return Rollout(seqs, logp, ref_logp, values, scores), metrics

    @torch.no_grad()
    def _greedy_score(self, ids: Tensor, mask: Tensor) -> Tensor:
        """The reward model's score of the policy's own greedy answer to each prompt: a per-prompt
        baseline (ReMax, Li et al. 2023). A reward model's scores differ far more between prompts than
        between two answers to one prompt (measured here: a spread of ~3 across prompts against ~1
        between the right answer and a dropped carry), and a fresh critic cannot learn that spread in
        a few steps; subtracting it leaves the part of the score that the sampled answer decides."""
        was_training = self.policy.training
        self.policy.eval()
        greedy = generate(self.policy, self.tok, ids, mask, max_new_tokens=self.cfg.max_new_tokens,
                          greedy=True)
        self.policy.train(was_training)
        return self.stage.score(self.reward_model, greedy)

    def _normalise(self, raw: Tensor) -> Tensor:
        """Reward-model scores whitened over the rollout (when ``--reward-whiten``) and clipped to
        ``+-reward_clip`` (when > 0): the scale of an RM score is arbitrary (Bradley-Terry fixes only
        differences), and a clip bounds what one exploited sample can pull (TRL's PPO whitens and
        clips its scores the same way: ``whiten_rewards``, ``cliprange_reward``)."""
        cfg, out = self.cfg, raw
        if getattr(cfg, "reward_whiten", False) and len(raw) > 1:
            world_mean = self.run.all_mean(raw.mean().reshape(1).double())
            world_var = self.run.all_mean(((raw.double() - world_mean) ** 2).mean().reshape(1))
            out = ((raw.double() - world_mean) / (world_var.sqrt() + 1e-6)).float()
        clip = getattr(cfg, "reward_clip", 0.0)
        return out.clamp(-clip, clip) if clip > 0 else out

    def maybe_refresh_reward_model(self, step: int) -> dict[str, float]:
        """Iterated RLHF: every ``--rm-refresh-every`` steps, ``--rm-refresh-steps`` Bradley-Terry steps
        on the policy's samples since the last refresh, each paired by the checker (a wrong sample is
        the rejected answer against the right one; a right sample is the chosen answer against a
        synthetic mistake). Returns the reward model's pairwise accuracy on those fresh pairs *before*
        training on them: how well it still judged what the policy was producing."""
        if not self.refresh_every or step % self.refresh_every or not self.recent:
            return {}
        from rlkern.train.rm import bradley_terry, sample_pairs

        cfg, stage, model = self.cfg, self.stage, self.reward_model
        problems = torch.cat([p for p, _ in self.recent])
        texts = [t for _, batch in self.recent for t in batch]
        self.recent = []
        out = {}
        with self.timer("rm_refresh"):
            chosen, rejected = sample_pairs(stage, self.tok, problems, texts, stage.data_rng)
            with torch.no_grad():
                _, r_c, r_r, _ = bradley_terry(model, chosen, rejected)
            out["rm_refresh/accuracy_before"] = float((r_c > r_r).float().mean())
            model.train()
            n = len(chosen)
            batch = min(n, cfg.rollout_batch)
            for _ in range(cfg.rm_refresh_steps):
                idx = torch.randperm(n, generator=stage.data_rng)[:batch].to(stage.device)
                loss, r_c, r_r, _ = bradley_terry(model, chosen.index(idx), rejected.index(idx),
                                                  cfg.rm_lm_coef)
                self.rm_opt.zero_grad(set_to_none=True)
                loss.backward()
                stage.step_optimizer(self.rm_opt, model.parameters())
            model.eval()
            out["rm_refresh/loss"] = loss.item()
        return out

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
