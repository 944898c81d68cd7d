"""Supervised fine-tuning: next-token cross-entropy on the task's demonstrations (answer tokens only)."""

from __future__ import annotations

import os
import time

from rlkern import ops
from rlkern.train.common import Stage, final_dir, load_weights, ops_backend
from rlkern.train.models import save_causal_lm
from rlkern.train.rollout import join, token_logprobs

__all__ = ["train_sft"]


def train_sft(cfg, out: str | None = None) -> dict:
    """Runs the SFT stage; returns ``{"dir", "model", "eval/accuracy"}``."""
    stage = Stage(cfg, "sft", out)
    run = stage.run
    policy, tok = stage.start_model()  # a bad --model fails here, before the run directory is touched
    start = run.prepare()
    run.print_config()
    policy.train()
    opt = stage.optimizer(policy.parameters(), cfg.lr, cfg.weight_decay)
    sched = stage.schedule(opt, cfg.warmup, cfg.steps, cfg.final_lr_ratio)
    run.generators["data"] = stage.data_rng
    if start:
        ckpt, state = run.load_checkpoint()
        load_weights(policy, os.path.join(ckpt, "policy"))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    per_rank = run.shard(cfg.batch_size, "--batch-size")

    def checkpoint(step):
        run.save_checkpoint(step, {"policy": lambda p: save_causal_lm(policy, tok, p)},
                            {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})

    with ops_backend(cfg.ops):
        if start == 0:
            run.log(0, stage.evaluate(policy, tok))
        bar = run.progress(start, cfg.steps, "sft")
        for step in range(start + 1, cfg.steps + 1):
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
            n_tokens = float(seqs.attention_mask.sum()) * run.world
            metrics = {"sft/loss": loss.item(), "sft/grad_norm": grad_norm, "sft/lr": sched.get_last_lr()[0],
                       "perf/tokens_per_s": n_tokens / (time.perf_counter() - t0)}
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                metrics.update(stage.evaluate(policy, tok))
            run.log(step, metrics)
            bar.update(1)
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                checkpoint(step)
        run.close_progress()
    final = final_dir(run.dir)
    if run.main:
        save_causal_lm(policy, tok, final)
    run.mark_done()
    return {"dir": run.dir, "model": final, "eval/accuracy": run.rows()[-1].get("eval/accuracy") if run.main
            else None}
