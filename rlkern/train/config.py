"""Configuration: one dataclass per subcommand, a docstring under every field.

The command line is parsed by ``transformers.HfArgumentParser`` (as in TRL): one flag per field, typed
from its annotation. The field docstrings are read from this file's source (``field_docs``) and become
the ``--help`` text, so the documentation a reader sees in the code and on the command line is the same
text. Values resolve in this order: the dataclass default, then ``--config FILE`` (JSON or YAML, keys
spelled as the fields or as the flags), then the flags given on the command line. Every dataclass
checks its values in ``__post_init__``: a bad value is one line naming the flag.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import math
import os
import textwrap
import typing
from dataclasses import dataclass

__all__ = ["RunConfig", "SFTConfig", "RMConfig", "PPOConfig", "PPOPenaltyConfig", "GRPOConfig", "DPOConfig",
           "TRPOConfig", "RLHFConfig", "COMMANDS", "field_docs", "build_parser", "parse_config",
           "ConfigError"]


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; the message names the option."""


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _positive(cfg, *names: str) -> None:
    """Finite and > 0 (a NaN fails every comparison, so ``not x > 0`` also catches it)."""
    for name in names:
        v = getattr(cfg, name)
        _need(math.isfinite(v) and v > 0, f"{_flag(name)} must be a finite number > 0, got {v}")


def _non_negative(cfg, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        _need(math.isfinite(v) and v >= 0, f"{_flag(name)} must be a finite number >= 0, got {v}")


def _choice(cfg, name: str, choices: tuple[str, ...]) -> None:
    v = getattr(cfg, name)
    _need(v in choices, f"{_flag(name)} must be one of {choices}, got {v!r}")


def _check_device(name: str) -> None:
    import torch

    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, auto)") from None
    if dev.type == "cuda":
        _need(torch.cuda.is_available(), f"--device {name!r}: no CUDA GPU is visible to torch here "
              "(use --device cpu or auto)")
        _need(dev.index is None or dev.index < torch.cuda.device_count(),
              f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    else:
        _need(dev.type == "cpu", f"--device {name!r}: only cpu and cuda are supported")


@dataclass
class RunConfig:
    """Options every subcommand takes."""

    model: str = ""
    """Local Hugging Face causal-LM directory (weights + tokenizer) to start from; empty = the built-in
    tiny Llama-style model over the task's character tokenizer."""
    out: str = ""
    """Run directory (metrics, checkpoints, final model); empty = runs/<command>."""
    config: str = ""
    """JSON or YAML file of option values (field or flag names); flags given on the command line win."""
    seed: int = 0
    """Seed of every random stream (model init, data order, sampling)."""
    device: str = "cpu"
    """Torch device: cpu, cuda, cuda:1, ... ('auto' = cuda when available)."""
    ops: str = "rlkern"
    """Kernels for the hot loops: 'rlkern' (C++ on CPU, Triton on GPU) or 'reference' (the plain-PyTorch
    oracle, via rlkern.use_backend('torch'))."""
    steps: int = 1
    """Optimisation steps of this stage."""
    resume: bool = False
    """Continue from the last complete checkpoint in the run directory."""
    overwrite: bool = False
    """Delete an existing run directory first (otherwise an existing run is an error unless --resume)."""
    save_every: int = 50
    """Write a checkpoint every N steps (and always at the end); 0 = only at the end."""
    eval_every: int = 50
    """Greedy accuracy on the held-out prompts every N steps (and at the start and end); 0 = start and end."""
    eval_size: int = 500
    """Number of held-out problems used by the evaluations (never seen in training)."""
    max_operand: int = 99
    """The task: a+b with a, b in [0, max_operand]."""
    heldout: int = 500
    """How many of the (max_operand+1)^2 problems are held out from training."""
    hidden_size: int = 128
    """Built-in model only: hidden size."""
    num_layers: int = 3
    """Built-in model only: decoder layers."""
    threads: int = 0
    """torch intra-op threads; 0 = auto: 1 for models under 5M parameters (their matrices are too small for
    threads to pay, and a loaded machine then slows them ~10x), else torch's default."""
    progress: bool = True
    """Show a progress bar with live metrics (disable with --no-progress)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 = off)."""

    def __post_init__(self):
        # Every config checks itself when built (from flags, a file, or the pipeline's stage configs),
        # so a bad value is one line naming the flag before any model is built or file written.
        self.check()

    def check(self) -> None:
        _choice(self, "ops", ("rlkern", "reference"))
        _need(self.steps > 0, f"--steps must be > 0, got {self.steps}")
        _need(not (self.resume and self.overwrite), "--resume and --overwrite cannot be combined")
        for name in ("save_every", "eval_every", "threads"):
            _need(getattr(self, name) >= 0, f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        _need(self.max_operand >= 1, f"--max-operand must be >= 1, got {self.max_operand}")
        n_problems = (self.max_operand + 1) ** 2
        _need(0 < self.heldout < n_problems, f"--heldout must lie in [1, {n_problems - 1}] (the task has "
              f"{n_problems} problems), got {self.heldout}")
        _need(0 < self.eval_size <= self.heldout, f"--eval-size must lie in [1, --heldout={self.heldout}] "
              f"(evaluation only uses held-out problems), got {self.eval_size}")
        _need(self.hidden_size > 0 and self.hidden_size % 4 == 0, "--hidden-size must be a positive multiple "
              f"of 4 (the built-in model has 4 attention heads), got {self.hidden_size}")
        _need(self.num_layers > 0, f"--num-layers must be > 0, got {self.num_layers}")
        _non_negative(self, "max_grad_norm")
        _check_device(self.device)


@dataclass
class SFTConfig(RunConfig):
    """Supervised fine-tuning on the task's demonstrations (next-token cross-entropy on the answer)."""

    steps: int = 1600
    """Optimisation steps of this stage (the demonstration budget is steps x batch_size: 102,400 by
    default; at 800 two of seeds 0-4 had not left the initial plateau of learning addition)."""
    batch_size: int = 64
    """Demonstrations per step (split across ranks under torchrun)."""
    lr: float = 3e-3
    """AdamW peak learning rate (linear warm-up, then cosine decay to final_lr_ratio x lr)."""
    final_lr_ratio: float = 0.1
    """Learning rate at the last step relative to the peak (1.0 = constant after warm-up)."""
    warmup: int = 50
    """Warm-up steps of the learning-rate schedule."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    teacher_carry: float = 0.3
    """The demonstrator writes a units carry only this often (else it answers a+b-10): SFT imitates a
    flawed teacher and RL has the rest to learn (1.0 = a perfect teacher)."""

    def check(self) -> None:
        super().check()
        _need(self.batch_size > 0, f"--batch-size must be > 0, got {self.batch_size}")
        _need(self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}")
        _positive(self, "lr", "final_lr_ratio")
        _non_negative(self, "weight_decay")
        _need(0 <= self.teacher_carry <= 1, f"--teacher-carry must lie in [0, 1], got {self.teacher_carry}")


@dataclass
class RMConfig(RunConfig):
    """Reward model: a scalar head on the (SFT) backbone, Bradley-Terry loss on preference pairs."""

    steps: int = 300
    """Optimisation steps of this stage."""
    batch_size: int = 64
    """Preference pairs per step."""
    lm_coef: float = 1.0
    """Weight of the auxiliary next-token loss on the chosen answers (0 = pure Bradley-Terry)."""
    sampled_negatives: float = 0.5
    """Fraction of each batch whose rejected answer is the starting policy's own sample when it is wrong
    (the rest, and right samples, get a synthetic mistake)."""
    max_new_tokens: int = 5
    """Generation budget of those samples, eos included."""
    lr: float = 1e-3
    """AdamW peak learning rate (warm-up, then cosine decay to final_lr_ratio x lr)."""
    final_lr_ratio: float = 0.1
    """Learning rate at the last step relative to the peak (1.0 = constant after warm-up)."""
    warmup: int = 20
    """Warm-up steps of the learning-rate schedule."""
    weight_decay: float = 0.0
    """AdamW weight decay."""

    def check(self) -> None:
        super().check()
        for name in ("batch_size", "max_new_tokens"):
            _need(getattr(self, name) > 0, f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        _need(self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}")
        _positive(self, "lr", "final_lr_ratio")
        _non_negative(self, "weight_decay", "lm_coef")
        _need(0 <= self.sampled_negatives <= 1, f"--sampled-negatives must lie in [0, 1], got "
              f"{self.sampled_negatives}")


@dataclass
class _RolloutConfig(RunConfig):
    """Options shared by the on-policy algorithms (sampling, reference, reward)."""

    rollout_batch: int = 64
    """Prompts sampled per step (split across ranks under torchrun)."""
    max_new_tokens: int = 5
    """Generation budget per response, eos included."""
    temperature: float = 1.0
    """Sampling temperature (log-probs are computed at the same temperature)."""
    lr: float = 5e-4
    """AdamW learning rate of the policy."""
    reward: str = "auto"
    """Reward: 'model' (the reward model at --reward-model), 'rule' (exact match), or 'auto' (model if
    --reward-model is given, else rule)."""
    reward_model: str = ""
    """Directory of a reward model written by the rm stage."""
    ref_sync_every: int = 0
    """Copy the policy into the frozen reference every K steps ('target network'); 0 = never."""

    def check(self) -> None:
        super().check()
        _choice(self, "reward", ("auto", "model", "rule"))
        for name in ("rollout_batch", "max_new_tokens"):
            _need(getattr(self, name) > 0, f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        _positive(self, "lr")
        # Below ~0.01 logits / temperature overflows float32 and the sampled log-probs become NaN.
        _need(math.isfinite(self.temperature) and self.temperature >= 0.01, "--temperature must be a "
              f"finite number >= 0.01, got {self.temperature}")
        _need(self.ref_sync_every >= 0, f"--ref-sync-every must be >= 0 (0 = never), got "
              f"{self.ref_sync_every}")
        if self.reward_model:
            _need(os.path.isdir(self.reward_model), f"--reward-model {self.reward_model!r} is not a "
                  "directory")


@dataclass
class PPOConfig(_RolloutConfig):
    """PPO-clip with a critic: GAE, whitened advantages, clipped policy and value losses."""

    steps: int = 100
    """Optimisation steps of this stage."""
    lr: float = 1e-4
    """AdamW learning rate of the policy (below SFT's final 3e-4: at 5e-4 the first updates moved the
    policy ~1 nat from SFT and lost accuracy before gaining it)."""
    ppo_epochs: int = 2
    """Passes over each rollout buffer."""
    minibatches: int = 2
    """Shuffled minibatches per pass (the per-rank rollout batch must divide evenly)."""
    kl_coef: float = 0.05
    """beta: weight of the KL-to-reference penalty in the token rewards."""
    kl_estimator: str = "k1"
    """Estimator of the token KL in the reward shaping (k1, abs, k2, k3)."""
    adaptive_kl: bool = False
    """Adapt beta with the proportional controller towards --kl-target."""
    kl_target: float = 0.1
    """Target KL of the adaptive controller (and delta of ppo-penalty)."""
    kl_horizon: int = 10000
    """Horizon (in samples) of the adaptive controller."""
    target_kl: float = 0.0
    """Stop the epochs of a step early when the approximate KL to the rollout policy exceeds 1.5x this
    (0 = never)."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda."""
    clip_low: float = 0.2
    """Lower clip range: the ratio is clipped below at 1 - clip_low."""
    clip_high: float = 0.2
    """Upper clip range: the ratio is clipped above at 1 + clip_high (clip-higher when > clip_low)."""
    vf_coef: float = 0.5
    """c1: weight of the value loss."""
    value_clip: float = 0.2
    """Value clipping range around the rollout's values."""
    ent_coef: float = 0.0
    """c2: weight of the entropy bonus."""
    critic_lr: float = 1e-3
    """AdamW learning rate of the critic."""
    whiten_advantages: bool = True
    """Whiten the advantages over the rollout (masked mean 0, std 1)."""
    rm_refresh_every: int = 10
    """With a reward model: train it further every K steps on the policy's samples since the last
    refresh, labelled by the checker (iterated RLHF); 0 = a frozen reward model."""
    rm_refresh_steps: int = 40
    """Bradley-Terry steps of each reward-model refresh (batches of --rollout-batch pairs: 4 passes over
    the 640 fresh samples by default; with 10 steps at 3e-4 seed 0 gained +9.8 points, with 40 at 1e-3
    +34)."""
    rm_refresh_lr: float = 1e-3
    """AdamW learning rate of the reward-model refresh."""
    rm_lm_coef: float = 1.0
    """Weight of the auxiliary next-token loss on the chosen answers during a refresh."""
    reward_baseline: str = "greedy"
    """With a reward model: subtract the score of the policy's own greedy answer to the same prompt
    ('greedy', ReMax) or nothing ('none')."""
    reward_whiten: bool = True
    """With a reward model: whiten its scores over each rollout (mean 0, std 1)."""
    reward_clip: float = 3.0
    """With a reward model: clip the (whitened) scores to +-this; 0 = off."""
    early_stop_patience: int = 3
    """With a refreshed reward model: at every refresh the checker grades the policy's greedy answers on
    --early-stop-size training problems (never the held-out ones) beside the reward model's score of
    them; after this many checks without a better accuracy the run stops, and it ends with the best
    policy seen (0 = off)."""
    early_stop_size: int = 500
    """Training problems in the early-stopping slice."""

    def check(self) -> None:
        super().check()
        for name in ("ppo_epochs", "minibatches"):
            _need(getattr(self, name) > 0, f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        _choice(self, "kl_estimator", ("k1", "abs", "k2", "k3"))
        _choice(self, "reward_baseline", ("greedy", "none"))
        _positive(self, "kl_target", "critic_lr")
        _non_negative(self, "kl_coef", "target_kl", "vf_coef", "value_clip", "ent_coef", "reward_clip",
                      "rm_lm_coef")
        _positive(self, "rm_refresh_lr")
        for name in ("rm_refresh_every", "rm_refresh_steps", "early_stop_patience"):
            _need(getattr(self, name) >= 0, f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        _need(self.early_stop_size > 0, f"--early-stop-size must be > 0, got {self.early_stop_size}")
        _need(self.kl_horizon > 0, f"--kl-horizon must be > 0, got {self.kl_horizon}")
        if self.adaptive_kl:
            _need(self.kl_coef > 0, "--adaptive-kl needs --kl-coef > 0 (a zero beta never grows)")
            # The controller's step factor 1 + err * n / horizon reaches 0 at n = 5 * horizon.
            _need(self.rollout_batch < 5 * self.kl_horizon, f"--kl-horizon {self.kl_horizon} is too short "
                  f"for --rollout-batch {self.rollout_batch}: --adaptive-kl needs rollout_batch < 5 * "
                  "kl_horizon")
        _clip_range(self)
        _need(0 <= self.lam <= 1 and 0 <= self.gamma <= 1, f"--gamma and --lam must lie in [0, 1], got "
              f"{self.gamma}, {self.lam}")


@dataclass
class PPOPenaltyConfig(PPOConfig):
    """PPO-penalty: the clip replaced by beta * KL(old || new) in the loss, beta halved below kl_target/1.5
    and doubled above 1.5 * kl_target after every step."""

    penalty_beta: float = 1.0
    """Initial beta of the in-loss KL penalty."""

    def check(self) -> None:
        super().check()
        _positive(self, "penalty_beta")


@dataclass
class GRPOConfig(_RolloutConfig):
    """GRPO: group_size samples per prompt, group-relative advantages, no critic."""

    steps: int = 100
    """Optimisation steps of this stage."""
    rollout_batch: int = 16
    """Prompts per step (each sampled group_size times)."""
    group_size: int = 8
    """Samples per prompt (>= 2)."""
    method: str = "grpo"
    """Advantage estimator: grpo, rloo, reinforce_baseline, winrate."""
    scale_by_std: bool = True
    """Divide by the group std (off = Dr. GRPO)."""
    loss_type: str = "grpo"
    """Loss (TRL's loss_type): grpo, bnpo, dr_grpo, dapo (normalisations of the clipped surrogate); gspo
    (grpo with the sequence-level ratio, the same as --importance-sampling-level sequence); and the
    variants rlkern.ops.grpo_loss implements (cispo, sapo, luspo, vespo: ops.losses.GRPO_LOSS_TYPES)."""
    importance_sampling_level: str = "token"
    """Importance ratio of the surrogate (TRL's importance_sampling_level): 'token', or 'sequence' (GSPO:
    one ratio per response, exp of the masked mean log-ratio)."""
    is_correction: str = "none"
    """Rollout/training mismatch correction (OpenRLHF's names): weights exp(logp_old - logp_sampler) per
    token, between the trainer's log-probs of the rollout (a full forward pass) and the sampler's
    (recorded token by token while sampling), multiplying the clipped surrogate: 'tis' (clamped to
    [--is-clip-low, --is-clip-high]), 'icepop' (0 outside that range), 'seq-mask-tis' (unclamped,
    0 for a response whose geometric-mean ratio is outside it), or 'none'. Here the sampler is the
    same fp32 model, so the two log-probs differ only by rounding and the weights are ~1."""
    is_clip_low: float = 0.5
    """Lower bound of --is-correction (OpenRLHF's vllm_is_truncated_threshold[0])."""
    is_clip_high: float = 5.0
    """Upper bound of --is-correction (OpenRLHF's vllm_is_truncated_threshold[1])."""
    top_entropy_quantile: float = 1.0
    """Keep in the policy loss only the top quantile of response tokens by entropy (TRL's
    top_entropy_quantile, "Beyond the 80/20 rule": 0.2); 1.0 = every token."""
    beta: float = 0.04
    """Weight of the k3 KL to the reference in the loss."""
    clip_low: float = 0.2
    """Lower clip range of the ratio."""
    clip_high: float = 0.2
    """Upper clip range of the ratio; with --loss-type cispo the absolute cap of the ratio (TRL's
    epsilon_high; ScaleRL recommends 5.0)."""
    ppo_epochs: int = 1
    """Passes over each group batch."""
    minibatches: int = 1
    """Minibatches per pass."""

    def check(self) -> None:
        super().check()
        _need(self.group_size >= 2, "--group-size must be >= 2 (a group-relative baseline needs at least two "
              f"samples per prompt), got {self.group_size}")
        _choice(self, "method", ("grpo", "rloo", "reinforce_baseline", "winrate"))
        loss_types, levels = grpo_loss_options()
        _choice(self, "loss_type", loss_types)
        _choice(self, "importance_sampling_level", levels)
        _choice(self, "is_correction", ("none", "tis", "icepop", "seq-mask-tis"))
        _positive(self, "is_clip_low", "is_clip_high")
        _need(self.is_clip_low <= self.is_clip_high, f"--is-clip-low ({self.is_clip_low}) must be <= "
              f"--is-clip-high ({self.is_clip_high})")
        _need(0 <= self.top_entropy_quantile <= 1, "--top-entropy-quantile must lie in [0, 1], got "
              f"{self.top_entropy_quantile}")
        for name in ("ppo_epochs", "minibatches"):
            _need(getattr(self, name) > 0, f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        _non_negative(self, "beta")
        if self.loss_type == "cispo":  # clip_high is an absolute cap of the ratio there (TRL)
            _need(0 <= self.clip_low < 1, f"--clip-low must lie in [0, 1), got {self.clip_low}")
            _positive(self, "clip_high")
        else:
            _clip_range(self)


def grpo_loss_options() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(loss types, importance-sampling levels) that ``--loss-type`` / ``--importance-sampling-level``
    accept: what this build's ``rlkern.ops.grpo_loss`` implements (``GRPO_LOSS_TYPES``, and
    ``GRPO_IS_LEVELS`` once it takes ``importance_sampling_level``), plus 'gspo' when the sequence
    level is there."""
    from rlkern.ops import losses

    levels = tuple(getattr(losses, "GRPO_IS_LEVELS", ("token",)))
    types = tuple(losses.GRPO_LOSS_TYPES) + (("gspo",) if "sequence" in levels else ())
    return types, levels


@dataclass
class DPOConfig(RunConfig):
    """DPO: offline on preference pairs, reference log-probs computed once per batch from the frozen start."""

    steps: int = 200
    """Optimisation steps of this stage."""
    batch_size: int = 64
    """Preference pairs per step."""
    lr: float = 5e-4
    """AdamW learning rate."""
    beta: float = 0.1
    """DPO temperature beta."""
    loss_type: str = "sigmoid"
    """sigmoid, ipo, hinge or robust."""
    label_smoothing: float = 0.0
    """Conservative-DPO label smoothing in [0, 0.5)."""

    def check(self) -> None:
        super().check()
        _need(self.batch_size > 0, f"--batch-size must be > 0, got {self.batch_size}")
        _positive(self, "lr", "beta")
        _choice(self, "loss_type", ("sigmoid", "ipo", "hinge", "robust"))
        _need(0 <= self.label_smoothing < 0.5, f"--label-smoothing must lie in [0, 0.5), got "
              f"{self.label_smoothing}")


@dataclass
class TRPOConfig(_RolloutConfig):
    """TRPO: natural-gradient step by conjugate gradient on Fisher-vector products, backtracking line
    search."""

    steps: int = 100
    """Optimisation steps of this stage."""
    max_kl: float = 0.01
    """delta: trust-region size (mean KL from the rollout policy)."""
    cg_iters: int = 10
    """Conjugate-gradient iterations."""
    damping: float = 0.1
    """Damping added to the Fisher-vector product (F + damping * I)."""
    backtrack_iters: int = 10
    """Line-search halvings before the step is rejected."""
    backtrack_coef: float = 0.5
    """Step shrink factor of the line search."""
    kl_coef: float = 0.02
    """beta of the KL penalty in the token rewards."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda."""
    critic_lr: float = 1e-3
    """AdamW learning rate of the critic."""
    critic_iters: int = 4
    """Critic regression steps per rollout (trained separately from the policy step)."""
    value_clip: float = 0.2
    """Value clipping range."""

    def check(self) -> None:
        super().check()
        for name in ("cg_iters", "critic_iters", "backtrack_iters"):
            _need(getattr(self, name) > 0, f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        _positive(self, "max_kl", "critic_lr", "backtrack_coef")
        _non_negative(self, "damping", "kl_coef", "value_clip")
        _need(0 <= self.lam <= 1 and 0 <= self.gamma <= 1, f"--gamma and --lam must lie in [0, 1], got "
              f"{self.gamma}, {self.lam}")


@dataclass
class RLHFConfig(PPOConfig):
    """The whole pipeline: SFT -> reward model -> PPO, then the before/after table. PPO's reward is the
    learned reward model (--reward auto/model; the exact-match checker only evaluates, and labels the
    policy's samples for the reward model's refreshes) or the checker itself (--reward rule)."""

    sft_steps: int = 1600
    """Steps of the SFT stage."""
    sft_lr: float = 3e-3
    """Learning rate of the SFT stage."""
    rm_steps: int = 300
    """Steps of the reward-model stage."""
    rm_lr: float = 1e-3
    """Learning rate of the reward-model stage."""

    def check(self) -> None:
        super().check()
        for name in ("sft_steps", "rm_steps"):
            _need(getattr(self, name) > 0, f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        _positive(self, "sft_lr", "rm_lr")


COMMANDS: dict[str, type] = {
    "rlhf": RLHFConfig, "sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "ppo-penalty": PPOPenaltyConfig,
    "grpo": GRPOConfig, "dpo": DPOConfig, "trpo": TRPOConfig,
}

@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` for a config dataclass and its bases, read from the class source (the
    string literal right under each annotated field); the most derived class wins."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt,
                                                                                                     ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def build_parser(command: str):
    """The parser of one subcommand: ``transformers.HfArgumentParser`` over its config dataclass (the
    parser TRL uses: one flag per field from its type hint, ``--name`` and ``--name_with_underscores``,
    ``--no-name`` for a flag that is on by default), with each field's docstring as its help and a bad
    flag reported as one line."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str):
            self.exit(2, f"{self.prog}: error: {message}\n")

    cls = COMMANDS[command]
    parser = Parser(cls, prog=f"python -m rlkern.train {command}", description=cls.__doc__)
    docs = field_docs(cls)
    for action in parser._actions:
        if action.dest in docs and action.help is None:
            action.help = docs[action.dest].replace("%", "%%")
        action.option_strings.sort(key=lambda flag: "_" in flag)  # --save-every first, in usage too
    for f in dataclasses.fields(cls):  # --no-resume etc. for the flags that are off by default
        if f.default is False:
            parser.add_argument(f"--no-{f.name.replace('_', '-')}", action="store_false", dest=f.name,
                                help=argparse.SUPPRESS)
    return parser


def _load_file(cls, path: str) -> dict:
    """The option values of a ``--config`` file (keys spelled as fields or flags), checked against the
    fields' types."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r}: no such file")
    with open(path) as fh:
        text = fh.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # noqa: BLE001  (any parse error is reported as one line)
        raise ConfigError(f"--config {path!r} cannot be parsed: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r} must hold a mapping of option names to values")
    values = {str(k).lstrip("-").replace("-", "_"): v for k, v in data.items()}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints) - {"config"})
    if unknown:
        raise ConfigError(f"--config {path!r}: unknown option(s): {', '.join(unknown)}")
    for key, value in values.items():
        kind = hints[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"--config {path!r}: option {key} must be {kind.__name__}, got {value!r}")
    return values


def parse_config(command: str, argv: list[str]):
    """The config dataclass of ``command``: its defaults, then the ``--config`` file (as the parser's
    defaults, the way TRL's parser reads one), then the flags in ``argv``. The dataclass checks every
    value when built (one ``ConfigError`` line naming the flag)."""
    parser = build_parser(command)
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_load_file(COMMANDS[command], known.config))
    cfg, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True,
                                                   look_for_args_file=False)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return cfg


def _clip_range(cfg) -> None:
    for name in ("clip_low", "clip_high"):
        v = getattr(cfg, name)
        _need(0 <= v < 1, f"{_flag(name)} must lie in [0, 1), got {v}")
