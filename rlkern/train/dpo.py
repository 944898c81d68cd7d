"""DPO: offline on a fixed set of preference pairs, ``ops.dpo_loss`` (sigmoid / ipo / hinge / robust).

The dataset (``steps x batch_size`` pairs) is drawn once from the seed, and the reference model's
sequence log-probs of every pair are computed once, before the first step, then the reference is
dropped: each step reads its slice of the precomputed values.
"""

from __future__ import annotations

import os
import time

import torch

from rlkern import ops
from rlkern.train.common import Stage, load_weights, ops_backend
from rlkern.train.models import save_causal_lm
from rlkern.train.rm import preference_pairs
from rlkern.train.rollout import Sequences, token_logprobs

__all__ = ["train_dpo"]


def sequence_logprobs(model, seqs: Sequences) -> torch.Tensor:
    """Sum of the response tokens' log-probs per sequence ``[B]``."""
    return ops.masked_sum(token_logprobs(model, seqs), seqs.response_mask, dim=-1)


def train_dpo(cfg, out: str | None = None) -> dict:
    """Runs DPO from ``--model`` (its frozen copy is the reference); returns ``{"dir", "model"}``."""
    stage = Stage(cfg, "dpo", out)
    run = stage.run
    policy, tok = stage.start_model()  # a bad --model fails here, before the run directory is touched
    start = stage.begin()
    per_rank = run.shard(cfg.batch_size, "--batch-size")
    # The offline dataset: every step's pairs, fixed by the seed (and the rank).
    problems = stage.task.sample_train(cfg.steps * per_rank, stage.data_rng)
    pair_rng = torch.Generator().manual_seed(cfg.seed * 31 + run.rank)
    starts = range(0, len(problems), 1024)
    parts = [preference_pairs(stage, tok, problems[lo:lo + 1024], pair_rng) for lo in starts]
    chosen_all = _Padded([c for c, _ in parts], tok.pad_token_id)
    rejected_all = _Padded([r for _, r in parts], tok.pad_token_id)
    with ops_backend(cfg.ops), torch.no_grad():
        policy.eval()
        chunks = [slice(lo, lo + 1024) for lo in range(0, len(problems), 1024)]
        ref_chosen = torch.cat([sequence_logprobs(policy, chosen_all.slice(c)) for c in chunks])
        ref_rejected = torch.cat([sequence_logprobs(policy, rejected_all.slice(c)) for c in chunks])
        policy.train()
    opt = stage.optimizer(policy.parameters(), cfg.lr)
    if start:
        ckpt, state = run.load_checkpoint()
        load_weights(policy, os.path.join(ckpt, "policy"))
        opt.load_state_dict(state["optimizer"])

    def evaluate():
        return stage.evaluate(policy, tok)

    def checkpoint(step):
        run.save_checkpoint(step, {"policy": lambda p: save_causal_lm(policy, tok, p)},
                            {"optimizer": opt.state_dict()})

    with ops_backend(cfg.ops):
        for step in stage.steps(start, evaluate):
            t0 = time.perf_counter()
            sl = slice((step - 1) * per_rank, step * per_rank)
            chosen, rejected = chosen_all.slice(sl), rejected_all.slice(sl)
            loss, stats = ops.dpo_loss(sequence_logprobs(policy, chosen), sequence_logprobs(policy, rejected),
                                       ref_chosen[sl], ref_rejected[sl], beta=cfg.beta,
                                       loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = stage.step_optimizer(opt, policy.parameters())
            metrics = {"dpo/loss": loss.item(), "dpo/grad_norm": norm}
            metrics.update({f"dpo/{k}": float(v) for k, v in stats.items()})
            tokens = chosen.n_tokens + rejected.n_tokens
            stage.end_step(step, metrics, t0=t0, tokens=tokens, evaluate=evaluate, save=checkpoint)
    return stage.finish(lambda path: save_causal_lm(policy, tok, path))


class _Padded:
    """Sequences of different widths stacked into one batch (prompts left-, responses right-padded)."""

    def __init__(self, parts: list[Sequences], pad_id: int):
        p = max(s.prompt_len for s in parts)
        r = max(s.response_mask.shape[1] for s in parts)
        ids, att, resp = [], [], []
        for s in parts:
            left, right = p - s.prompt_len, r - s.response_mask.shape[1]
            ids.append(torch.nn.functional.pad(s.input_ids, (left, right), value=pad_id))
            att.append(torch.nn.functional.pad(s.attention_mask, (left, right), value=0))
            resp.append(torch.nn.functional.pad(s.response_mask, (0, right), value=0.0))
        self.seqs = Sequences(torch.cat(ids), torch.cat(att), p, torch.cat(resp))

    def slice(self, sl: slice) -> Sequences:
        s = self.seqs
        return Sequences(s.input_ids[sl], s.attention_mask[sl], s.prompt_len, s.response_mask[sl])

