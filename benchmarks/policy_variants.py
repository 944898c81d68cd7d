"""Benchmark family ``policy_variants`` (issue #13 item 4): four policy-loss variants the peers ship
beyond PPO/GRPO, at B=256,T=4096 and B=64,T=1024 with fp32 log-probs and a float (fp32 0/1) mask,
forward and forward+backward (to d logp):

* ``gspo``: TRL ``GRPOTrainer._compute_loss`` with ``importance_sampling_level="sequence"`` (the
  masked mean log-ratio of each row as one ratio), ``loss_type="grpo"``, ``beta=0``, the GSPO recipe's
  clip range ``epsilon=3e-4``, ``epsilon_high=4e-4`` (TRL's GSPO docs).
* ``cispo``: TRL ``loss_type="cispo"`` (``-sg(clamp(r, max=epsilon_high)) A logp``, epsilon_high 5.0
  as ScaleRL recommends), ``beta=0``, normalised by the batch's valid-token count.
* ``tis_grpo``: TRL's vLLM importance-sampling correction, ``vllm_importance_sampling_mode=
  "token_truncate"`` (``clamp(exp(nan_to_num((old - sampling) m)), max=3)``, computed without a
  gradient as TRL does in ``_generate_and_score_completions``) times the GRPO token loss,
  ``beta=0.04`` with ``use_bias_correction_kl=True`` (TRL 1.16's default). The timed call computes
  both the ratios and the loss.
* ``kl_cov``: verl 0.9.1 ``compute_policy_loss_kl_cov`` (``kl_cov_ratio=2e-4``, ``ppo_kl_coef=0.1``,
  verl's defaults; token-mean), per-token advantages. The peer row calls verl's real function (it
  moves the valid tokens to the host, ``topk`` there, and scatters back).

Columns per case: rlkern (C++ backend forced; for KL-Cov the ``rlkern.compat.verl_policy`` shim that
``patch("verl")`` installs, on ``ops.kl_cov_mask``), the peer's eager code, torch.compile of the same
maths, and the streaming floor (every input read once, d logp written once in fwd+bwd).
TRL's losses live inside ``GRPOTrainer._compute_loss`` (a method of a trainer that needs a model),
so ``trl_compute_loss`` / ``trl_vllm_is_ratio`` below are line-by-line transcriptions of it
(installed TRL 1.16, ``trl/trainer/grpo_trainer.py``: ``_compute_loss`` and the ratio block of
``_generate_and_score_completions``). verl's KL-Cov calls ``.cpu()`` and ``nonzero``, which
``torch.compile(fullgraph=True)`` cannot trace, so its compile column is ``math_kl_cov``: the same
maths with the top-k over the whole masked [B*T] covariance (invalid tokens at -inf) instead of
verl's host gather, and ``k`` computed on the host first, as verl does.

Target (issue #13): rlkern >= 1.2x torch.compile at B=256,T=4096 (>= 1.0x at the smaller shape,
issue #12's rule). A variant whose op has not landed in ``rlkern.ops`` gets a note and no rlkern row.

    python -m benchmarks -f policy_variants --no-plot                 # both shapes
    python -m benchmarks -f policy_variants --quick --impls rlkern    # B=64,T=1024, rlkern + floor
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from benchmarks import rlmath
from benchmarks.harness import Case, Impl, Target, streaming_probe
from benchmarks.rlmath import _compiled, _loss_forward_backward, _on_cpp_fn

FAMILY = "policy_variants"
RLKERN = "rlkern (cpp)"
COMPILE = "torch.compile(same maths)"
VARIANTS = ("gspo", "cispo", "tis_grpo", "kl_cov")
MODES = ("fwd", "fwd+bwd")
BIG_TOKENS = 256 * 4096
GSPO_EPS_LOW, GSPO_EPS_HIGH = 3e-4, 4e-4  # TRL docs, GSPO recipe
CISPO_EPS_HIGH = 5.0  # TRL GRPOConfig.epsilon_high doc: ScaleRL's epsilon_max
TIS_CLIP_MAX = 3.0  # TRL GRPOConfig.vllm_importance_sampling_clip_max default
TIS_BETA = 0.04
KL_COV_RATIO, KL_COV_COEF = 2e-4, 0.1  # verl PolicyLossConfig defaults


Shape = rlmath.Shape  # B, T, log-prob dtype, mask dtype; label "B=256,T=4096 fp32 mask=fp32"

SHAPES = {"full": [Shape(256, 4096), Shape(64, 1024)], "quick": [Shape(64, 1024)]}


# ---------------------------------------------------------------------------------------------
# The peers' code
# ---------------------------------------------------------------------------------------------


def trl_vllm_is_ratio(old_per_token_logps: Tensor, sampling_per_token_logps: Tensor, mask: Tensor, *,
                      mode: str = "token_truncate", clip_min: float | None = None,
                      clip_max: float | None = TIS_CLIP_MAX) -> Tensor:
    """TRL 1.16 ``GRPOTrainer._generate_and_score_completions``, the vLLM importance-sampling ratio
    (``vllm_importance_sampling_correction=True``): [B, T] for token_* modes, [B, 1] for sequence_*."""
    with torch.no_grad():
        per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
        per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
        sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
        if sequence_level_is:
            logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
        else:
            logps_diff = per_token_logps_diff
        ratio = torch.exp(logps_diff)
        if mode in ["sequence_truncate", "token_truncate"]:
            ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
        else:
            min_val = clip_min if clip_min is not None else -math.inf
            max_val = clip_max if clip_max is not None else math.inf
            ratio = ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)
    return ratio


def trl_compute_loss(per_token_logps: Tensor, old_per_token_logps: Tensor, ref_per_token_logps: Tensor | None,
                     advantages: Tensor, mask: Tensor, *, loss_type: str = "grpo",
                     importance_sampling_level: str = "token", beta: float = 0.0, epsilon_low: float = 0.2,
                     epsilon_high: float = 0.2, use_bias_correction_kl: bool = True,
                     importance_sampling_ratio: Tensor | None = None,
                     num_items_in_batch: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """TRL 1.16 ``GRPOTrainer._compute_loss`` from the log-probs on (no entropy mask, off-policy mask,
    delta or entropy bonus; one process, no gradient accumulation), for loss types grpo, bnpo, dapo,
    cispo. Returns ``(loss, metrics)``: the batch-mean metric tensors ``_compute_loss`` computes for
    its log (its ``global_masked_mean`` on one process, before ``.item()``), the ones rlkern's op
    returns from its pass: ``kl`` (beta != 0), the clip-ratio low / high / region means (PPO-clip
    loss types) or ``cispo_clip_ratio``. Not TRL's per-sequence ``clip_ratio/low_min`` /
    ``high_max`` (the patched trainer computes those with the same torch ops as TRL)."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)

    def global_masked_mean(x):
        if x.shape[1] == 1:  # importance_sampling_level == "sequence": one value per sequence
            return x.sum() / x.shape[0]
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    metrics = {}
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:  # "sequence"
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:
        per_token_kl = (torch.exp(ref_per_token_logps - per_token_logps)
                        - (ref_per_token_logps - per_token_logps) - 1)
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    else:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        per_token_loss1 = coef_1 * advantages
        per_token_loss2 = coef_2 * advantages
        per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if importance_sampling_ratio is not None:
        per_token_loss = per_token_loss * importance_sampling_ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    else:  # cispo, dapo: num_items_in_batch is the generation batch's valid-token count
        normalizer = (mask.sum() if num_items_in_batch is None else num_items_in_batch).clamp(min=1.0)
        loss = (per_token_loss * mask).sum() / normalizer
    with torch.no_grad():  # the metrics block of _compute_loss
        if beta != 0.0:
            metrics["kl"] = global_masked_mean(per_token_kl)
        if loss_type == "cispo":
            metrics["cispo_clip_ratio"] = global_masked_mean(
                ((coef_1 > epsilon_high) & (advantages > 0)).float())
        else:
            is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
            is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
            metrics["clip_ratio/low_mean"] = global_masked_mean(is_low_clipped.float())
            metrics["clip_ratio/high_mean"] = global_masked_mean(is_high_clipped.float())
            metrics["clip_ratio/region_mean"] = global_masked_mean((is_low_clipped | is_high_clipped).float())
    return loss, metrics


def trl_gspo_loss(logp: Tensor, old: Tensor, adv_seq: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
    return trl_compute_loss(logp, old, None, adv_seq, mask, importance_sampling_level="sequence",
                            epsilon_low=GSPO_EPS_LOW, epsilon_high=GSPO_EPS_HIGH)


def trl_cispo_loss(logp: Tensor, old: Tensor, adv_seq: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
    return trl_compute_loss(logp, old, None, adv_seq, mask, loss_type="cispo", epsilon_high=CISPO_EPS_HIGH)


def trl_tis_grpo_loss(logp: Tensor, old: Tensor, ref: Tensor, sampling: Tensor, adv_seq: Tensor,
                      mask: Tensor) -> tuple[Tensor, dict]:
    ratio = trl_vllm_is_ratio(old, sampling, mask)
    return trl_compute_loss(logp, old, ref, adv_seq, mask, beta=TIS_BETA, importance_sampling_ratio=ratio)


@functools.cache
def _verl_kl_cov():
    """verl's real ``compute_policy_loss_kl_cov`` and an ActorConfig with the default policy_loss
    settings (kl_cov_ratio 2e-4, ppo_kl_coef 0.1)."""
    from verl.trainer.ppo.core_algos import compute_policy_loss_kl_cov
    from verl.workers.config import ActorConfig
    from verl.workers.config.actor import PolicyLossConfig

    config = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1,
                         policy_loss=PolicyLossConfig(loss_mode="kl_cov", kl_cov_ratio=KL_COV_RATIO,
                                                      ppo_kl_coef=KL_COV_COEF))
    return compute_policy_loss_kl_cov, config


def verl_kl_cov_loss(logp: Tensor, old: Tensor, adv_tok: Tensor, mask: Tensor) -> Tensor:
    """verl 0.9.1 ``core_algos.compute_policy_loss_kl_cov`` itself (token-mean). Returns the loss."""
    fn, config = _verl_kl_cov()
    return fn(old, logp, adv_tok, mask, "token-mean", config)[0]


def kl_cov_k(mask: Tensor, ratio: float = KL_COV_RATIO) -> int:
    """verl's ``k_percent_nums = max(1, int(n_valid * kl_cov_ratio))`` (a host number in verl too)."""
    return max(1, int(int((mask > 0).sum()) * ratio))


def math_kl_cov(logp: Tensor, old: Tensor, adv_tok: Tensor, mask: Tensor, k: int,
                ppo_kl_coef: float = KL_COV_COEF) -> Tensor:
    """verl's KL-Cov without the host round trip, for torch.compile: the covariance
    ``(A - mean A)(logp - mean logp)`` over the valid tokens, its top ``k`` over the flattened [B*T]
    tensor with invalid tokens at -inf, those tokens get ``-A r + coef |log r|``, the others ``-A r``;
    verl's token-mean (``masked_sum(l, m) / m.sum()``)."""
    negative_approx_kl = logp - old
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -adv_tok * ratio
    pg_losses_kl = pg_losses1 + ppo_kl_coef * negative_approx_kl.abs()
    valid = mask > 0
    n = valid.sum()
    a, lp = adv_tok.detach(), logp.detach()
    cov = ((a - torch.where(valid, a, 0).sum() / n) * (lp - torch.where(valid, lp, 0).sum() / n))
    cov = cov.masked_fill(~valid, -math.inf).reshape(-1)
    chosen = torch.zeros_like(cov, dtype=torch.bool).scatter_(0, torch.topk(cov, k).indices, True)
    pg_losses = torch.where(chosen.view_as(pg_losses1), pg_losses_kl, pg_losses1)
    return (torch.where(valid, pg_losses, 0.0) * mask).sum() / mask.sum()


def kl_cov_same_maths(logp: Tensor, old: Tensor, adv_tok: Tensor, mask: Tensor, *,
                      maths: Callable = math_kl_cov) -> Tensor:
    """``maths`` (``math_kl_cov`` or its compiled form) with verl's ``k``, read on the host first."""
    return maths(logp, old, adv_tok, mask, kl_cov_k(mask))


def compile_column(variant: str) -> Callable:
    """torch.compile of the variant's same-maths function (KL-Cov: of ``math_kl_cov``, k given)."""
    if variant == "kl_cov":
        return functools.partial(kl_cov_same_maths, maths=_compiled(math_kl_cov))
    return _compiled(_PEERS[variant][3])


# ---------------------------------------------------------------------------------------------
# rlkern: each variant once its op is in rlkern.ops (issue #13 item 1)
# ---------------------------------------------------------------------------------------------


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _loss_types() -> tuple[str, ...]:
    from rlkern.ops import losses

    return tuple(getattr(losses, "GRPO_LOSS_TYPES", ()))


def rlkern_fn(variant: str) -> Callable | None:
    """``fn(x) -> loss`` calling rlkern.ops for ``variant`` (inputs as built by ``_inputs``), or None
    when the op has not landed."""
    from rlkern import ops

    # beta = 0 (gspo, cispo): no ref_logp, as the patched GRPOTrainer passes it (TRL loads no reference
    # model then, and its _compute_loss reads none).
    if variant == "gspo" and _accepts(ops.grpo_loss, "importance_sampling_level"):
        return lambda x: ops.grpo_loss(x["logp"], x["old"], None, x["adv_seq"], x["mask"], beta=0.0,
                                       clip_low=GSPO_EPS_LOW, clip_high=GSPO_EPS_HIGH,
                                       importance_sampling_level="sequence", use_bias_correction_kl=True)[0]
    if variant == "cispo" and "cispo" in _loss_types():
        return lambda x: ops.grpo_loss(x["logp"], x["old"], None, x["adv_seq"], x["mask"], beta=0.0,
                                       clip_high=CISPO_EPS_HIGH, loss_type="cispo",
                                       use_bias_correction_kl=True)[0]
    if variant == "tis_grpo" and _accepts(ops.grpo_loss, "weights"):
        def tis(x):
            w = ops.rollout_correction(x["old"], x["sampling"], x["mask"], level="token", mode="truncate",
                                       upper=TIS_CLIP_MAX, padding="trl", log_clamp=None,
                                       metrics=False).weights
            return ops.grpo_loss(x["logp"], x["old"], x["ref"], x["adv_seq"], x["mask"], beta=TIS_BETA,
                                 use_bias_correction_kl=True, weights=w)[0]
        return tis
    if variant == "kl_cov" and hasattr(ops, "kl_cov_mask"):
        # What a verl user gets from rlkern.compat.patch("verl"): the shim of verl's registry entry, on
        # ops.kl_cov_mask (the sync-free top-k selection); the same ActorConfig as verl's row.
        from rlkern.compat.verl_cov import compute_policy_loss_kl_cov

        config = _verl_kl_cov()[1]
        return lambda x: compute_policy_loss_kl_cov(x["old"], x["logp"], x["adv_tok"], x["mask"],
                                                    "token-mean", config)[0]
    return None


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


def _inputs(shape: Shape) -> dict:
    """rlmath's inputs (right-padded mask, logp, old, ref near logp, per-sequence and per-token
    advantages) plus the sampler's log-probs, nearer to old than old is to logp."""
    x = rlmath._inputs(shape)
    x["sampling"] = (x["old"].float() + 0.05 * torch.randn(shape.batch, shape.length)).to(shape.dtype)
    return x


# variant -> (peer label, peer function, its input names (logp first), the maths torch.compile gets)
_PEERS: dict[str, tuple[str, Callable, tuple[str, ...], Callable]] = {
    "gspo": ("TRL eager (_compute_loss, sequence IS)", trl_gspo_loss, ("logp", "old", "adv_seq", "mask"),
             trl_gspo_loss),
    "cispo": ("TRL eager (_compute_loss, cispo)", trl_cispo_loss, ("logp", "old", "adv_seq", "mask"),
              trl_cispo_loss),
    "tis_grpo": ("TRL eager (vLLM IS token_truncate + grpo)", trl_tis_grpo_loss,
                 ("logp", "old", "ref", "sampling", "adv_seq", "mask"), trl_tis_grpo_loss),
    "kl_cov": ("verl eager (compute_policy_loss_kl_cov)", verl_kl_cov_loss,
               ("logp", "old", "adv_tok", "mask"), kl_cov_same_maths),
}


def _call(fn: Callable, x: dict, names: tuple[str, ...], mode: str) -> Callable[[], object]:
    """One timed call: the loss (``fwd``) or the loss and d loss / d logp (``fwd+bwd``); logp is the
    first name."""
    args = tuple(x[n] for n in names)
    if mode == "fwd+bwd":
        return _loss_forward_backward(fn, 0, args)
    return functools.partial(fn, *args)


def _rlkern_call(fn: Callable, x: dict, mode: str) -> Callable[[], object]:
    on_cpp = _on_cpp_fn(fn)
    if mode == "fwd":
        return functools.partial(on_cpp, x)
    leaf = x["logp"].detach().requires_grad_(True)
    x = {**x, "logp": leaf}
    return lambda: torch.autograd.grad(on_cpp(x), leaf)[0]


def cases(shapes: list[Shape], *, compile: bool = True) -> Iterator[Case]:
    """Yields per shape, per variant, the fwd and the fwd+bwd case."""
    missing = [v for v in VARIANTS if rlkern_fn(v) is None]
    notes = [f"not in rlkern.ops yet, rlkern rows omitted: {', '.join(missing)}"] if missing else []
    for shape in shapes:
        x = _inputs(shape)
        tok = x["logp"].nbytes
        big = shape.batch * shape.length >= BIG_TOKENS
        bound = 1.2 if big else 1.0
        for variant in VARIANTS:
            peer_name, peer, names, _ = _PEERS[variant]
            read = sum(x[n].nbytes for n in names)
            ours = rlkern_fn(variant)
            for mode in MODES:
                write = tok if mode == "fwd+bwd" else 0
                impls = [Impl("floor: read inputs" + (" + write d logp" if write else ""),
                              streaming_probe(read, write), "floor")]
                if ours is not None:
                    impls.append(Impl(RLKERN, _rlkern_call(ours, x, mode), "rlkern"))
                impls.append(Impl(peer_name, _call(peer, x, names, mode)))
                if compile:
                    impls.append(Impl(COMPILE, _call(compile_column(variant), x, names, mode), "compile"))
                target = Target(f">= {bound:g}x torch.compile", RLKERN, "speedup", bound, COMPILE)
                yield Case(FAMILY, variant, shape.label, mode, impls, work=read + write, rows=shape.batch,
                           notes=notes, targets=[target])
