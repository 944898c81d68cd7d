"""Pieces every stage shares: the starting model, the task, optimizers and schedules, greedy evaluation,
rewards (rule or reward model), and loading a checkpoint's models back."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

import rlkern
from rlkern import ops
from rlkern.train.models import HeadModel, ModelError, TinyModelSpec, build_tiny_model, load_causal_lm
from rlkern.train.rollout import Sequences, decode_responses, encode_prompts, generate
from rlkern.train.run import Run, Timer
from rlkern.train.task import ArithmeticTask, build_char_tokenizer

__all__ = ["Stage", "ops_backend", "final_dir", "sequence_score", "check_divisible", "load_weights",
           "ModelError"]

FINAL = "final"
# Below this many parameters a CPU step is a chain of tiny matmuls: intra-op threads cost more in
# synchronisation than they save (measured ~10x slower with 2 threads on a loaded 2-core machine).
SMALL_MODEL = 5_000_000


def final_dir(run_dir: str) -> str:
    """Where a finished stage leaves its model (``save_pretrained`` layout)."""
    return os.path.join(run_dir, FINAL)


@contextlib.contextmanager
def ops_backend(name: str):
    """``--ops reference`` forces every rlkern op onto the plain-PyTorch oracle; ``rlkern`` keeps auto."""
    if name == "reference":
        with rlkern.use_backend("torch"):
            yield
    else:
        yield


class Stage:
    """A stage's run directory, device, task, tokenizer and data RNG, set up from its config, and the
    blocks every algorithm's loop starts and ends with (``begin``, ``steps``, ``end_step``, ``finish``):

        stage = Stage(cfg, "sft"); model = ...            # a bad --model fails before any file is written
        start = stage.begin()                             # run directory, printed config, resume step
        with ops_backend(cfg.ops):
            for step in stage.steps(start, evaluate):     # step-0 evaluation, progress bar
                t0 = time.perf_counter(); ...             # the algorithm's own step
                stage.end_step(step, metrics, t0=t0, tokens=n, evaluate=evaluate, save=checkpoint)
        return stage.finish(save_final)                   # final/ model, DONE marker
    """

    def __init__(self, cfg, command: str, out: str | None = None):
        self.cfg = cfg
        self.run = Run(cfg, command, out)
        self.run.init_distributed()
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = self.run.device
        self.task = ArithmeticTask(cfg.max_operand, cfg.heldout)
        # Per-rank streams: rank r samples different prompts and tokens than rank 0.
        torch.manual_seed(cfg.seed * 1009 + self.run.rank)
        self.data_rng = torch.Generator().manual_seed(cfg.seed * 7919 + self.run.rank)
        self.timer = Timer()
        self.bar = None

    # ---- the loop ------------------------------------------------------------------------------
    def begin(self) -> int:
        """Start of every stage, once its models are built: prepares the run directory, prints the
        resolved config, and puts the data order in the checkpoints. Returns the step to start from
        (0, or the newest intact checkpoint's under --resume)."""
        start = self.run.prepare()
        self.run.print_config()
        self.run.generators["data"] = self.data_rng
        return start

    def steps(self, start: int, evaluate: Callable[[], dict]) -> Iterator[int]:
        """Steps ``start + 1 .. --steps`` with a progress bar, after logging step 0's evaluation in a
        fresh run."""
        if start == 0:
            self.run.log(0, evaluate())
        self.bar = self.run.progress(start, self.cfg.steps, self.run.command)
        yield from range(start + 1, self.cfg.steps + 1)

    def end_step(self, step: int, metrics: dict, *, t0: float, tokens: float, evaluate: Callable[[], dict],
                 save: Callable[[int], None], last: bool = False) -> None:
        """What every step ends with: its phase times (``time/*``) and tokens/s over all ranks, the
        evaluation every --eval-every steps and at the last, the log line and the progress bar, and
        ``save(step)`` every --save-every steps and at the last (``last``: an early stop)."""
        cfg, run = self.cfg, self.run
        metrics.update(self.timer.pop())
        metrics["perf/tokens_per_s"] = tokens * run.world / (time.perf_counter() - t0)
        last = last or step == cfg.steps
        if (cfg.eval_every and step % cfg.eval_every == 0) or last:
            metrics.update(evaluate())
        run.log(step, metrics)
        self.bar.update(1)
        if (cfg.save_every and step % cfg.save_every == 0) or last:
            save(step)

    def finish(self, save_final: Callable[[str], None]) -> dict:
        """End of every stage: the step-time breakdown, ``save_final(dir)`` on rank 0 into ``final/``,
        the DONE marker. Returns ``{"dir", "model"}``."""
        run = self.run
        run.close_progress()
        run.print_time_breakdown()
        final = final_dir(run.dir)
        if run.main:
            save_final(final)
        run.mark_done()
        return {"dir": run.dir, "model": final}

    # ---- models --------------------------------------------------------------------------------
    def start_model(self, path: str | None = None):
        """``(policy, tokenizer)``: the causal LM at ``path`` (default ``--model``), or the built-in tiny
        model over the character tokenizer, initialised from the seed, identical on every rank."""
        path = self.cfg.model if path is None else path
        if path:
            model, tok = load_causal_lm(path, self.device)
        else:
            tok = build_char_tokenizer()
            spec = TinyModelSpec(hidden_size=self.cfg.hidden_size, num_layers=self.cfg.num_layers,
                                 intermediate_size=3 * self.cfg.hidden_size)
            model = build_tiny_model(tok, spec, self.cfg.seed, self.device).to(self.device)
        self._auto_threads(model)
        self.run.broadcast_module(model)
        return model, tok

    def _auto_threads(self, model) -> None:
        if self.cfg.threads == 0 and sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
            torch.set_num_threads(1)

    def head_model(self, path: str, kind: str, *, load_head: bool, flag: str = "--model"):
        """``(HeadModel, tokenizer)`` on the causal LM at ``path`` (given by option ``flag``); the head is
        read from ``path`` when ``load_head``, else freshly initialised."""
        lm, tok = load_causal_lm(path, self.device, flag)
        self._auto_threads(lm)
        model = HeadModel(lm, kind).to(self.device)
        if load_head:
            model.load_head(path)
        self.run.broadcast_module(model)
        return model, tok

    def optimizer(self, params, lr: float, weight_decay: float = 0.0):
        # eps 1e-8 and betas (0.9, 0.95): the usual LM fine-tuning setting (nanoGPT, TRL's examples).
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)

    @staticmethod
    def schedule(opt, warmup: int, total: int, floor: float = 0.1):
        """Linear warm-up for ``warmup`` steps, then cosine decay to ``floor`` x the peak at ``total``."""
        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def step_optimizer(self, opt, params) -> float:
        """All-reduce gradients across ranks, clip by global norm, step. Returns the pre-clip norm."""
        params = [p for p in params if p.grad is not None]
        self.run.sync_grads(params)
        if self.cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        opt.step()
        return float(norm)

    # ---- data and evaluation -----------------------------------------------------------------------
    def problems(self, n: int) -> Tensor:
        return self.task.sample_train(n, self.data_rng)

    def heldout(self) -> Tensor:
        return self.task.heldout[: self.cfg.eval_size]

    def prompts(self, tok, problems: Tensor) -> tuple[Tensor, Tensor]:
        return encode_prompts(tok, self.task.prompts(problems), self.device)

    @torch.no_grad()
    def evaluate(self, policy, tok, reward_model=None, ref=None, *, max_new_tokens: int = 5) -> dict[str,
                                                                                                     float]:
        """Greedy exact-match accuracy on the held-out problems; with ``reward_model`` its mean score of
        the greedy answers; with ``ref`` the KL to ``ref`` (per sequence, summed k1 over sampled
        answers, an unbiased estimate). Does not touch the training RNG streams."""
        was_training = policy.training
        policy.eval()
        problems = self.heldout()
        ids, mask = self.prompts(tok, problems)
        seqs = generate(policy, tok, ids, mask, max_new_tokens=max_new_tokens, greedy=True)
        out = {"eval/accuracy": float(self.task.reward(problems, decode_responses(tok, seqs)).mean())}
        if reward_model is not None:
            out["eval/reward"] = float(self.score(reward_model, seqs).mean())
        if ref is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(12345)
                sampled = generate(policy, tok, ids, mask, max_new_tokens=max_new_tokens)
            from rlkern.train.rollout import token_logprobs

            lp, ref_lp = token_logprobs(policy, sampled), token_logprobs(ref, sampled)
            per_seq = ops.masked_sum(ops.kl(lp, ref_lp, "k1"), sampled.response_mask, dim=-1)
            out["eval/kl_to_ref"] = float(per_seq.mean())
        policy.train(was_training)
        return out

    @staticmethod
    def score(reward_model: HeadModel, seqs: Sequences) -> Tensor:
        """The reward model's score of each sequence ``[B]``: see :func:`sequence_score`."""
        return sequence_score(reward_model(seqs.input_ids, seqs.attention_mask, seqs.position_ids), seqs)


def sequence_score(head_values: Tensor, seqs: Sequences) -> Tensor:
    """A sequence's reward: the sum of the reward head over the response tokens (eos included), read
    at each response token's own position. A per-token check ("is this token right, given the
    prompt and the tokens before it?") is a short circuit for a small backbone; reading one score at
    eos instead asks it to aggregate every check into one position, which here plateaued at ~80%
    held-out pairwise accuracy and was exploited by PPO within 25 steps."""
    return ops.masked_sum(head_values[:, seqs.prompt_len:], seqs.response_mask, dim=-1)


def check_divisible(n: int, parts: int, what: str, into: str) -> int:
    if n % parts:
        raise ValueError(f"{what}={n} cannot be split into {parts} equal {into}; "
                         "choose values that divide evenly")
    return n // parts



def load_weights(model, path: str) -> None:
    """Loads a ``save_pretrained`` directory's weights into an existing model in place (a causal LM, or
    a :class:`HeadModel` whose head file sits beside them)."""
    from safetensors.torch import load_file

    lm = model.lm if isinstance(model, HeadModel) else model
    files = sorted(f for f in os.listdir(path) if f.startswith("model") and f.endswith(".safetensors"))
    if not files:
        raise ModelError(f"{path!r} holds no model*.safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f), device=str(next(lm.parameters()).device)))
    missing, unexpected = lm.load_state_dict(state, strict=False)
    # Tied weights (lm_head = embeddings) are saved once; anything else missing is an error.
    tied = set(getattr(lm, "_tied_weights_keys", None) or [])
    tied_head = lm.config.tie_word_embeddings
    missing = [k for k in missing if k not in tied and not (k == "lm_head.weight" and tied_head)]
    if missing or unexpected:
        raise ModelError(f"{path!r} does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    if isinstance(model, HeadModel):
        model.load_head(path)
