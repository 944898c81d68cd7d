"""Reward model: a scalar head on a causal-LM backbone (initialised from the SFT model, as in
InstructGPT), trained with the Bradley-Terry loss -log sigma(r_chosen - r_rejected) on preference pairs
(the correct answer against a plausible wrong one), plus an auxiliary next-token loss on the chosen
answers through the backbone's LM head (``--lm-coef``): a pairwise label carries one bit, and the
auxiliary loss keeps the backbone learning the task itself, which the reward head reads (without it
the head plateaued at ~75% held-out pairwise accuracy here and PPO exploited it). Reports pairwise
accuracy on held-out pairs."""

from __future__ import annotations

import copy
import os
import time

import torch
import torch.nn.functional as F

from rlkern import ops
from rlkern.train.common import Stage, load_weights, ops_backend, sequence_score
from rlkern.train.models import HeadModel
from rlkern.train.rollout import decode_responses, generate, join

__all__ = ["train_rm", "preference_pairs", "sample_pairs", "bradley_terry"]


def preference_pairs(stage: Stage, tok, problems: torch.Tensor, generator: torch.Generator, sampler=None,
                     sampled_fraction: float = 0.0):
    """``(chosen, rejected)`` sequences for ``problems``: the correct sum against a wrong answer.

    The wrong answer is a synthetic mistake (:meth:`ArithmeticTask.wrong_answers`) or, for the first
    ``sampled_fraction`` of the problems when a ``sampler`` policy is given, that policy's own sampled
    answer when the verifier says it is wrong: comparisons collected on the policy that RL will
    start from cover the mistakes it actually makes (malformed answers included), the way RLHF's
    preference data is collected from the SFT model's samples (InstructGPT)."""
    task = stage.task
    prompts = task.prompts(problems)
    wrong = task.wrong_answers(problems, generator)
    n_sampled = int(round(sampled_fraction * len(problems))) if sampler is not None else 0
    if n_sampled:
        ids, mask = stage.prompts(tok, problems[:n_sampled])
        seqs = generate(sampler, tok, ids, mask, max_new_tokens=stage.cfg.max_new_tokens)
        texts = decode_responses(tok, seqs)
        for i, (text, ok) in enumerate(zip(texts, task.reward(problems[:n_sampled], texts).tolist())):
            if not ok:
                wrong[i] = text
    chosen = join(tok, prompts, task.answers(problems), stage.device)
    rejected = join(tok, prompts, wrong, stage.device)
    return chosen, rejected


def sample_pairs(stage: Stage, tok, problems: torch.Tensor, texts: list[str], generator: torch.Generator):
    """``(chosen, rejected)`` from sampled answers labelled by the checker: a wrong sample is rejected
    against the right answer, a right sample is chosen against a synthetic mistake."""
    task = stage.task
    right = task.answers(problems)
    wrong = task.wrong_answers(problems, generator)
    chosen, rejected = list(right), list(wrong)
    for i, (text, answer) in enumerate(zip(texts, right)):
        if text.strip() != answer:
            rejected[i] = text
    prompts = task.prompts(problems)
    return join(tok, prompts, chosen, stage.device), join(tok, prompts, rejected, stage.device)


def bradley_terry(reward_model, chosen, rejected, lm_coef: float = 0.0):
    """``(loss, r_chosen, r_rejected, lm_nll)``: -log sigma(r_c - r_r) averaged over pairs, plus
    ``lm_coef`` x the next-token NLL of the chosen answers through the backbone's own LM head."""
    h_c = reward_model.hidden(chosen.input_ids, chosen.attention_mask, chosen.position_ids)
    r_c = sequence_score(reward_model.head(h_c), chosen)
    r_r = Stage.score(reward_model, rejected)
    loss = -F.logsigmoid(r_c - r_r).mean()
    nll = torch.zeros((), device=loss.device)
    if lm_coef > 0:
        logits = reward_model.lm.lm_head(h_c[:, chosen.prompt_len - 1:-1])
        nll = -ops.masked_mean(ops.logprobs(logits, chosen.responses), chosen.response_mask)
        loss = loss + lm_coef * nll
    return loss, r_c, r_r, nll


def train_rm(cfg, out: str | None = None) -> dict:
    """Runs the reward-model stage on top of ``--model``; returns ``{"dir", "model", "rm/eval_accuracy"}``."""
    stage = Stage(cfg, "rm", out)
    run = stage.run
    # A bad --model fails here, before the run directory is touched.
    if cfg.model:
        model, tok = stage.head_model(cfg.model, "reward", load_head=False)
    else:
        lm, tok = stage.start_model()
        model = HeadModel(lm, "reward").to(stage.device)
        run.broadcast_module(model)
    start = stage.begin()
    model.train()
    # The frozen starting policy whose wrong samples become rejected answers.
    sampler = copy.deepcopy(model.lm).eval().requires_grad_(False) if cfg.sampled_negatives > 0 else None
    opt = stage.optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    sched = stage.schedule(opt, cfg.warmup, cfg.steps, cfg.final_lr_ratio)
    if start:
        ckpt, state = run.load_checkpoint()
        load_weights(model, os.path.join(ckpt, "reward_model"))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    per_rank = run.shard(cfg.batch_size, "--batch-size")
    # Held-out pairs are fixed once (their own generator) so every evaluation scores the same pairs.
    eval_pairs = preference_pairs(stage, tok, stage.heldout(),
                                  torch.Generator().manual_seed(cfg.seed + 99991))

    @torch.no_grad()
    def evaluate():
        model.eval()
        loss, r_c, r_r, _ = bradley_terry(model, *eval_pairs)
        model.train()
        return {"rm/eval_accuracy": float((r_c > r_r).float().mean()), "rm/eval_loss": loss.item()}

    def checkpoint(step):
        run.save_checkpoint(step, {"reward_model": lambda p: model.save(tok, p)},
                            {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})

    with ops_backend(cfg.ops):
        for step in stage.steps(start, evaluate):
            t0 = time.perf_counter()
            chosen, rejected = preference_pairs(stage, tok, stage.problems(per_rank), stage.data_rng, sampler,
                                                cfg.sampled_negatives)
            loss, r_c, r_r, nll = bradley_terry(model, chosen, rejected, cfg.lm_coef)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = stage.step_optimizer(opt, model.parameters())
            sched.step()
            margin = (r_c - r_r).detach()
            metrics = {"rm/loss": loss.item(), "rm/lm_nll": nll.item(),
                       "rm/accuracy": float((margin > 0).float().mean()),
                       "rm/margin": float(margin.mean()), "rm/grad_norm": grad_norm}
            tokens = chosen.n_tokens + rejected.n_tokens
            stage.end_step(step, metrics, t0=t0, tokens=tokens, evaluate=evaluate, save=checkpoint)
    out = stage.finish(lambda path: model.save(tok, path))
    out["rm/eval_accuracy"] = run.rows()[-1].get("rm/eval_accuracy") if run.main else None
    return out
