"""Supervised fine-tuning: next-token cross-entropy on the task's demonstrations (answer tokens only)."""

from __future__ import annotations

import os
import time

from rlkern import ops
from rlkern.train.common import Stage, load_weights, ops_backend
from rlkern.train.models import save_causal_lm
from rlkern.train.rollout import join, token_logprobs

__all__ = ["train_sft"]


def train_sft(cfg, out: str | None = None) -> dict:
    """Runs the SFT stage; returns ``{"dir", "model", "eval/accuracy"}``."""
    stage = Stage(cfg, "sft", out)
    run = stage.run
    policy, tok = stage.start_model()  # a bad --model fails here, before the run directory is touched
    start = stage.begin()
    policy.train()
    opt = stage.optimizer(policy.parameters(), cfg.lr, cfg.weight_decay)
    sched = stage.schedule(opt, cfg.warmup, cfg.steps, cfg.final_lr_ratio)
    if start:
        ckpt, state = run.load_checkpoint()
        load_weights(policy, os.path.join(ckpt, "policy"))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    per_rank = run.shard(cfg.batch_size, "--batch-size")

    def evaluate():
        return stage.evaluate(policy, tok)

    def checkpoint(step):
        run.save_checkpoint(step, {"policy": lambda p: save_causal_lm(policy, tok, p)},
                            {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})

    with ops_backend(cfg.ops):
        for step in stage.steps(start, evaluate):
            t0 = time.perf_counter()
            problems = stage.problems(per_rank)
            answers = stage.task.demonstrations(problems, stage.data_rng, cfg.teacher_carry)
            seqs = join(tok, stage.task.prompts(problems), answers, stage.device)
            logp = token_logprobs(policy, seqs)
            loss = -ops.masked_mean(logp, seqs.response_mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = stage.step_optimizer(opt, policy.parameters())
            sched.step()
            metrics = {"sft/loss": loss.item(), "sft/grad_norm": grad_norm, "sft/lr": sched.get_last_lr()[0]}
            stage.end_step(step, metrics, t0=t0, tokens=seqs.n_tokens, evaluate=evaluate, save=checkpoint)
    out = stage.finish(lambda path: save_causal_lm(policy, tok, path))
    out["eval/accuracy"] = run.rows()[-1].get("eval/accuracy") if run.main else None
    return out
