"""PPO / GRPO policy losses and the clipped value loss, fused: ``policy_loss``, ``value_loss``, ``grpo_loss``.

Each loss is one forward kernel pass over the ``[B, T]`` token tensors (per-token terms, the masked
aggregation and the stats together) and one backward pass that writes d logp (d values). The
forward saves one fp32 scale per row (the aggregation weight of its tokens), so the backward needs no
reduction. Kernels: csrc/losses.cpp (CPU), kernels/losses.py (Triton); oracle: rlkern.reference
(``policy_loss``, ``value_loss``, ``grpo_loss``, ``aggregate_loss``).

Conventions shared by the three losses:

* Tensors are ``[..., T]``; every leading index is one sequence (a "row"). ``mask`` is bool, uint8,
  int32, int64, float32, bfloat16 or float16 (other integer / float dtypes are converted), read by the
  kernels in its own dtype with nonzero = valid: verl's float and TRL's int masks cost no conversion
  pass (RLKERN_STRICT_MASKS=1 adds a check that it holds only 0 and 1). Masked-out positions are never
  read into a result, so padding may hold anything.
* The gradient flows to ``logp`` (``values``) only. ``old_logp``, ``ref_logp``, ``advantages``,
  ``returns`` and ``weights`` are constants, as in verl and TRL where they come from ``no_grad``.
* Every denominator is clamped to >= 1: a batch with no valid token gives loss 0, stats 0 and a zero
  gradient, never NaN.
* ``stats`` is a dict of 0-d float32 tensors (masked token means, computed in the same pass); they are
  not ``.item()``-ed, so reading them is the caller's choice of when to synchronise.
* NaN, the same on every backend (issue 9; tests/test_losses_hostile.py): a NaN in any input of a
  valid token (``mask`` set) makes the loss NaN and that token's gradient NaN, so a trainer's
  non-finite check fires; the log-ratio clamps (+-20) and the maxes keep NaN as torch.clamp /
  torch.maximum do. The stats follow the same rule: a clip fraction is NaN when a valid token's
  clipped surrogate is NaN (a comparison with NaN would count it as unclipped), ``approx_kl`` /
  ``kl`` when that token's log-ratio / KL term is. NaN in ``ref_logp`` reaches the loss even with
  ``beta = 0`` (0 * NaN). A NaN at a masked-out token never contributes: loss, stats and gradients
  are bit for bit those with clean padding. (verl's and TRL's ``masked_mean`` multiply by the mask,
  so there 0 * NaN from padding makes the loss NaN; rlkern selects, as ``torch.where`` does.)

For fused kernels that produce ``logp`` themselves (issue #4, ``linear_policy_loss``): use
:func:`grpo_loss_and_grad` / :func:`policy_loss_and_grad`, which return ``(loss, d loss / d logp,
stats)`` for given tensors without autograd, through the same kernels and normalisation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from rlkern import reference
from rlkern.codes import LOSS_KINDS, LOSS_STATS
from rlkern.codes import LOSS_VARIANTS as _VARIANT_CODES
from rlkern.codes import RATIO_LEVELS as _LEVEL_CODES
from rlkern.ops import _common
from rlkern.ops._common import (
    check_finite,
    check_int,
    check_tensor,
    new_output,
    pick_backend,
    token_mask,
)
from rlkern.ops._registry import kernel_op, kernels

__all__ = ["policy_loss", "value_loss", "grpo_loss", "policy_loss_and_grad", "grpo_loss_and_grad",
           "POLICY_AGGS", "GRPO_LOSS_TYPES", "POLICY_VARIANTS", "RATIO_LEVELS", "GRPO_IS_LEVELS"]

POLICY_AGGS = reference.POLICY_AGGS
GRPO_LOSS_TYPES = reference.GRPO_VARIANT_LOSS_TYPES
POLICY_VARIANTS = reference.POLICY_VARIANTS
RATIO_LEVELS = reference.RATIO_LEVELS
GRPO_IS_LEVELS = reference.GRPO_IS_LEVELS

# Kernel kinds (rlkern/codes.py). grpo_bc: GRPO with the KL term multiplied by the importance ratio
# (TRL's use_bias_correction_kl).
_POLICY, _GRPO, _VALUE, _GRPO_BC = (LOSS_KINDS[k] for k in ("policy", "grpo", "value", "grpo_bc"))
_SEQUENCE = _LEVEL_CODES["sequence"]
# grpo_loss's loss types: the surrogate variant each runs, and the normaliser (TRL _compute_loss:
# cispo shares dapo's, sapo grpo's; luspo is (per_token_loss * mask).sum(-1).mean()).
_GRPO_VARIANT = {"cispo": "cispo_cap", "sapo": "sapo", "vespo": "vespo"}
_GRPO_NORMALISER = {"cispo": "dapo", "sapo": "grpo", "vespo": "dapo"}
# The layout of the LOSS_STATS-long stats vector the kernels write (csrc/losses.cpp): six masked means,
# then clip_high + clip_low (grpo's clip_ratio) and 0.
_CLIPPED, _CLIP_HIGH, _CLIP_LOW, _DUAL, _NEG_LOG_RATIO, _K3, _CLIP_REGION, _ZERO = range(LOSS_STATS)
# TRL 1.16 GRPOConfig's vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg.
_VESPO_DEFAULTS = (2.0, 3.0, 3.0, 2.0)
# Denominator codes: > 0 is a constant; these two are counts the forward pass finds itself.
_DENOM_TOKENS, _DENOM_LIVE_ROWS = -1.0, -2.0
_grad_enabled = torch.is_grad_enabled  # bound once (every eager forward reads it)


# The registered ops take canonical tensors: x, old, adv (or per-row advantages of x's leading shape),
# ref and weights (or None): contiguous [..., T] of one dtype; mask: contiguous [..., T], any dtype.
# With save_grad (x requires grad: 1, or 2 when the caller drops `saved`, so the first eager backward may
# overwrite it with the gradient) the forward also writes each token's unscaled gradient (float32,
# x's shape; 0 elements otherwise), and the backward is one elementwise pass over it
# (_losses_bwd_saved) instead of a second evaluation of every token's terms (_losses_bwd).
# variant / level: rlkern/codes.py LOSS_VARIANTS / RATIO_LEVELS; delta (+inf: off), tau_pos, tau_neg:
# TRL's delta and sapo temperatures. row_aux ([..., 2] float32): per row the mean log-ratio and the
# gradient through it (the sequence level; zeros at the token level). row_in ([...] float32 or None):
# vespo's summed vLLM IS log-ratios / gmpo's rollout-weight log geometric mean per row; vk_pos, vl_pos,
# vk_neg, vl_neg: vespo's k / lambda for A >= 0 and A < 0.
@kernel_op("losses_fwd")
def _losses_fwd(x: Tensor, old: Tensor, adv: Tensor, ref: Tensor | None, weights: Tensor | None, mask: Tensor,
                kind: int, clip_low: float, clip_high: float, dual_clip: float, beta: float,
                value_clip: float, per_row_mean: bool, denom: float, save_grad: int,
                backend: str, variant: int, level: int, delta: float, tau_pos: float,
                tau_neg: float, row_in: Tensor | None, vk_pos: float, vl_pos: float, vk_neg: float,
                vl_neg: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dev = x.device
    loss, stats, row_scale = new_output((), device=dev), new_output((LOSS_STATS,), device=dev), new_output(
        x.shape[:-1], device=dev)
    row_aux = new_output((*x.shape[:-1], 2), device=dev)
    saved = new_output(x.shape, device=dev) if save_grad else None
    kernels(backend, "losses").losses_fwd(x, old, adv, ref, weights, mask, kind, clip_low, clip_high,
                                          dual_clip, beta, value_clip, per_row_mean, denom, loss, stats,
                                          row_scale, saved, variant, level, delta, tau_pos, tau_neg, row_aux,
                                          row_in, vk_pos, vl_pos, vk_neg, vl_neg)
    none = x.new_empty(0, dtype=torch.float32)
    return loss, stats, row_scale, row_aux, saved if saved is not None else none


def _native_fwd(x, old, adv, ref, weights, mask, kind, clip_low, clip_high, dual_clip, beta, value_clip,
                per_row_mean, denom, save_grad, backend, *options):
    """Eager calls on the C++ backend that build no autograd node: one C++ call allocating the same
    outputs as _losses_fwd (csrc/losses.cpp losses_fwd_new). None (_losses_fwd's own path) where a
    tensor input requires grad under grad mode, or on another backend."""
    if backend != "cpp" or (_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, old, adv, ref, weights, options[5]))):  # row_in
        return None
    return kernels("cpp", "").losses_fwd_new(x, old, adv, ref, weights, mask, kind, clip_low, clip_high,
                                             dual_clip, beta, value_clip, per_row_mean, denom, save_grad,
                                             *options, _common.POISON_OUTPUTS)


_losses_fwd.register_native(_native_fwd, without_grad=True)


@_losses_fwd.register_fake
def _(x, *args):
    new = lambda shape: x.new_empty(shape, dtype=torch.float32)  # noqa: E731
    save_grad = args[13]
    return new(()), new((LOSS_STATS,)), new(x.shape[:-1]), new((*x.shape[:-1], 2)), new(
        x.shape if save_grad else (0,))


@kernel_op("losses_bwd")
def _losses_bwd(grad_loss: Tensor, x: Tensor, old: Tensor, adv: Tensor, ref: Tensor | None,
                weights: Tensor | None, mask: Tensor, row_scale: Tensor, kind: int, clip_low: float,
                clip_high: float, dual_clip: float, beta: float, value_clip: float, backend: str,
                variant: int, level: int, delta: float, tau_pos: float, tau_neg: float,
                row_aux: Tensor, row_in: Tensor | None, vk_pos: float, vl_pos: float, vk_neg: float,
                vl_neg: float) -> Tensor:
    grad_x = new_output(x.shape, device=x.device, dtype=x.dtype)
    kernels(backend, "losses").losses_bwd(grad_loss.float(), x, old, adv, ref, weights, mask, row_scale, kind,
                                          clip_low, clip_high, dual_clip, beta, value_clip, grad_x, variant,
                                          level, delta, tau_pos, tau_neg, row_aux, row_in, vk_pos, vl_pos,
                                          vk_neg, vl_neg)
    return grad_x


@_losses_bwd.register_fake
def _(grad_loss, x, *_):
    return torch.empty_like(x)


# saved None: the row-constant rows (_row_constant), whose gradient is all in row_aux's G_b.
@kernel_op("losses_bwd_saved")
def _losses_bwd_saved(grad_loss: Tensor, saved: Tensor | None, mask: Tensor, row_scale: Tensor,
                      dtype: torch.dtype, backend: str, row_aux: Tensor | None) -> Tensor:
    grad_x = new_output(mask.shape, device=mask.device, dtype=dtype)
    kernels(backend, "losses").losses_bwd_saved(grad_loss.float(), saved, mask, row_scale, grad_x, row_aux)
    return grad_x


@_losses_bwd_saved.register_fake
def _(_grad_loss, _saved, mask, _row_scale, dtype, _backend, _row_aux):
    return mask.new_empty(mask.shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    _, stats, row_scale, row_aux, saved = output
    ctx.dtype = inputs[0].dtype
    # The non-differentiable outputs get no gradient at all: materialised, `saved`'s would be a zero
    # [..., T] fp32 tensor filled on every backward.
    ctx.set_materialize_grads(False)
    # x, old, adv, ref, weights, mask, row_scale, row_aux, saved (None without save_grad). The inputs
    # are kept with save_grad too: with save_grad == 2 (the caller dropped `saved`) the first eager
    # backward turns `saved` into the gradient in place, so a second one (retain_graph) recomputes.
    ctx.save_for_backward(*inputs[:6], row_scale, row_aux, saved if inputs[14] else None, inputs[21])
    ctx.saved_spent, ctx.saved_private = False, inputs[14] == 2
    # kind, clip_low, clip_high, dual_clip, beta, value_clip, backend, variant, level, delta, tau_pos, tau_neg
    ctx.args = (*inputs[6:12], *inputs[15:21])
    ctx.vespo = tuple(inputs[22:26])  # vk_pos, vl_pos, vk_neg, vl_neg
    ctx.row_add = inputs[17] == _SEQUENCE  # the saved gradient misses the row-mean part
    ctx.row_constant = _row_constant(inputs[6], inputs[0], inputs[2], inputs[3], inputs[4], inputs[16],
                                     inputs[17])
    ctx.mark_non_differentiable(stats, row_scale, row_aux, saved)


_ROW_CONSTANT_VARIANTS = (_VARIANT_CODES["ppo"], _VARIANT_CODES["sapo"])


def _row_constant(kind: int, x: Tensor, adv: Tensor, ref: Tensor | None, weights: Tensor | None, variant: int,
                  level: int) -> bool:
    """The kernels' row-constant rows (csrc/losses.cpp row_constant): at the sequence level with per-row
    advantages, no weights and no KL term, the ppo / sapo surrogate is the same at every valid token of
    a row, so its gradient is the row's G_b alone: the forward saves nothing and the backward is
    ``grad * scale_b * G_b`` at the valid tokens."""
    return (level == _SEQUENCE and kind != _VALUE and variant in _ROW_CONSTANT_VARIANTS
            and adv.dim() < x.dim() and ref is None and weights is None)


def _eager(t: Tensor) -> bool:
    """Outside tracing (see _registry.KernelOp) and a plain tensor: a kernel may write it in place."""
    return (type(t) is Tensor and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0)


def _grad_from_saved(grad_loss: Tensor, saved: Tensor, mask: Tensor, row_scale: Tensor, dtype: torch.dtype,
                     backend: str, row_aux: Tensor | None, *, in_place: bool) -> Tensor:
    """d x from the forward's saved per-token gradients (plus, at the sequence level, each row's
    gradient through its mean log-ratio, ``row_aux[..., 1]``). ``in_place`` (eager, fp32 x): the
    kernel overwrites ``saved`` (an elementwise pass, each element read before it is written), which
    saves allocating and faulting in a new [..., T] buffer. ``saved`` None: the row-constant rows."""
    if in_place and saved is not None and saved.dtype == dtype and _eager(saved):
        kernels(backend, "losses").losses_bwd_saved(grad_loss.float(), saved, mask, row_scale, saved, row_aux)
        return saved
    return _losses_bwd_saved(grad_loss, saved, mask, row_scale, dtype, backend, row_aux)


def _backward(ctx, grad_loss, *_):
    if grad_loss is None:  # only the non-differentiable outputs were used
        return (None,) * 26
    *tensors, row_scale, row_aux, saved, row_in = ctx.saved_tensors
    if ctx.row_constant:
        grad_x = _grad_from_saved(grad_loss, None, tensors[5], row_scale, ctx.dtype, ctx.args[6], row_aux,
                                  in_place=False)
    elif saved is not None and not ctx.saved_spent:
        ctx.saved_spent = ctx.saved_private and _eager(saved) and saved.dtype == ctx.dtype
        grad_x = _grad_from_saved(grad_loss, saved, tensors[5], row_scale, ctx.dtype, ctx.args[6],
                                  row_aux if ctx.row_add else None, in_place=ctx.saved_spent)
    else:
        grad_x = _losses_bwd(grad_loss, *tensors, row_scale, *ctx.args, row_aux, row_in, *ctx.vespo)
    return (grad_x,) + (None,) * 25


_losses_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Validation and canonicalisation
# ------------------------------------------------------------------------------------------------


def _check_choice(value, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _in_range(value, name: str, ok, what: str) -> float:
    """``value`` through _common.check_finite (the one rule for numbers: bool, str and tensors are a
    TypeError), then ``ok(value)`` or a ValueError saying it must be ``what``. Eager-only, as there."""
    try:
        value = check_finite(value, name)
    except ValueError:
        raise ValueError(f"{name} must be {what}, got {value}") from None
    if not torch.compiler.is_compiling() and not ok(value):
        raise ValueError(f"{name} must be {what}, got {value}")
    return value


def _memoised(check: Callable) -> Callable:
    """``check`` (a pure validation of hashable scalars: numbers, strings, None, bools) with its answer
    kept per argument values *and types* (``typed``: ``True``, ``1`` and ``1.0`` are three keys, so a
    bool the check refuses is never answered from an int's entry). A trainer passes the same
    hyperparameters on every step, so the ~10 us of number checks become one dict lookup. Nothing
    that raises is kept, NaN never matches itself, and an unhashable argument (a list, a tensor) goes
    to ``check`` itself, which raises its clear error. While tracing, ``check`` runs as before."""
    cached = functools.lru_cache(maxsize=64, typed=True)(check)

    def call(*args):
        if torch.compiler.is_compiling():
            return check(*args)
        try:
            return cached(*args)
        except TypeError:  # unhashable, or refused by check: check says why
            return check(*args)

    return functools.wraps(check)(call)


def _check_clips(clip_low, clip_high) -> tuple[float, float]:
    return (_in_range(clip_low, "clip_low", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
            _in_range(clip_high, "clip_high", lambda v: v >= 0.0, "a finite number >= 0"))


def _check_tokens(main, main_name: str, others: dict, advantages=None, adv_name: str = "advantages") -> None:
    check_tensor(main, main_name)
    if main.dim() == 0:
        raise ValueError(f"{main_name} must have shape [..., T] (one row per sequence), got a 0-d tensor")
    for name, t in others.items():
        if t is None:
            continue
        check_tensor(t, name)
        if t.shape != main.shape:
            raise ValueError(f"{name} must have shape {tuple(main.shape)} (the same as {main_name}), "
                             f"got {tuple(t.shape)}")
    if advantages is not None:
        check_tensor(advantages, adv_name)
        if advantages.shape != main.shape and advantages.shape != main.shape[:-1]:
            raise ValueError(f"{adv_name} must have shape {tuple(main.shape)} (per token) or "
                             f"{tuple(main.shape[:-1])} (per sequence), got {tuple(advantages.shape)}")


def _mask(mask, shape: torch.Size) -> Tensor:
    return token_mask(mask, "mask", shape)


def _denominator(agg: str, rows: int, length: int, max_completion_length,
                 num_items_in_batch) -> tuple[bool, float]:
    """(per_row_mean, denom) for the kernels; see reference.aggregate_loss for the formulas."""
    if agg in ("token-mean", "bnpo"):
        return False, _DENOM_TOKENS
    if agg == "seq-mean-token-sum":
        return False, _DENOM_LIVE_ROWS
    if agg == "seq-mean-token-mean":
        return True, _DENOM_LIVE_ROWS
    if agg == "seq-mean-token-sum-norm":
        return False, float(max(length, 1))
    if agg == "grpo":
        return True, float(max(rows, 1))
    if agg == "dr_grpo":
        per_row = length if max_completion_length is None else max_completion_length
        return False, float(max(rows * per_row, 1))
    if agg == "dapo":
        return False, _DENOM_TOKENS if num_items_in_batch is None else max(float(num_items_in_batch), 1.0)
    if agg == "luspo":
        return False, float(max(rows, 1))
    raise AssertionError(agg)


def _canonical(main: Tensor, old: Tensor, adv: Tensor, ref: Tensor | None, weights: Tensor | None):
    """Contiguous tensors of one storage dtype (the shared one, else float32); None stays None."""
    dtype = main.dtype
    if old.dtype != dtype or adv.dtype != dtype or (ref is not None and ref.dtype != dtype) or (
            weights is not None and weights.dtype != dtype):
        dtype = torch.float32
        return tuple(t if t is None else t.to(dtype).contiguous() for t in (main, old, adv, ref, weights))
    return tuple(t if t is None else t.contiguous() for t in (main, old, adv, ref, weights))


def _run(kind, main, old, adv, ref, weights, mask, *, clip_low=0.2, clip_high=0.2, dual_clip=None, beta=0.0,
         value_clip=0.0, agg, max_completion_length=None, num_items_in_batch=None, backend, want_grad=False,
         variant="ppo", level="token", delta=None, tau_pos=1.0, tau_neg=1.05, row_in=None,
         vespo=_VESPO_DEFAULTS):
    """Dispatches one loss to the kernels (``mask`` already through token_mask). Returns (loss, stats
    vector) or, with want_grad, (loss, d loss / d main, stats vector) computed without autograd.
    ``row_in``: vespo's / gmpo's per-row float32 log-weight (or None); ``vespo``: its (k_pos,
    lambda_pos, k_neg, lambda_neg)."""
    length = main.shape[-1]
    per_row_mean, denom = _denominator(agg, main.shape[:-1].numel(), length, max_completion_length,
                                       num_items_in_batch)
    x, old_c, adv_c, ref_c, w_c = _canonical(main, old, adv, ref, weights)
    consts = (clip_low, clip_high, math.inf if dual_clip is None else dual_clip, beta, value_clip)
    lvl = _LEVEL_CODES[level]
    opts = (_VARIANT_CODES[variant], lvl, math.inf if delta is None else delta, tau_pos, tau_neg, row_in,
            *(float(v) for v in vespo))
    row_constant = _row_constant(kind, x, adv_c, ref_c, w_c, opts[0], lvl)
    if not want_grad:
        # `saved` is dropped here; row-constant rows need none
        save_grad = 2 if x.requires_grad and torch.is_grad_enabled() and not row_constant else 0
        loss, stats, *_ = _losses_fwd(x, old_c, adv_c, ref_c, w_c, mask, kind, *consts, per_row_mean, denom,
                                      save_grad, backend, *opts)
        return loss, stats
    with torch.no_grad():
        loss, stats, row_scale, row_aux, saved = _losses_fwd(x, old_c, adv_c, ref_c, w_c, mask, kind, *consts,
                                                             per_row_mean, denom, int(not row_constant),
                                                             backend, *opts)
        grad = _grad_from_saved(torch.ones((), device=x.device), None if row_constant else saved, mask,
                                row_scale, x.dtype, backend, row_aux if lvl == _SEQUENCE else None,
                                in_place=True)
    return loss, grad.to(main.dtype), stats


def _reference_with_grad(fn, main: Tensor, *args, **kwargs):
    x = main.detach().requires_grad_()
    with torch.enable_grad():
        loss, stats = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    grad = torch.zeros_like(main) if grad is None else grad
    return loss.detach(), grad.to(main.dtype), stats


# ------------------------------------------------------------------------------------------------
# Public ops
# ------------------------------------------------------------------------------------------------


def _policy_stats(stats: Tensor) -> dict[str, Tensor]:
    s = stats.unbind()
    return {"clip_frac": s[_CLIPPED], "clip_frac_lower": s[_DUAL], "approx_kl": s[_NEG_LOG_RATIO]}


def _check_variant_options(variant, ratio_level, delta, tau_pos, tau_neg, *, variants, levels, names):
    """The surrogate / ratio-level options (``names``: the argument names the caller exposes)."""
    _check_choice(variant, names[0], variants)
    _check_choice(ratio_level, names[1], levels)
    if delta is not None:
        delta = _in_range(delta, names[2], lambda v: v > 0.0, "None or a finite number > 0")
    tau_pos = _in_range(tau_pos, names[3], lambda v: v > 0.0, "a finite number > 0")
    tau_neg = _in_range(tau_neg, names[4], lambda v: v > 0.0, "a finite number > 0")
    return delta, tau_pos, tau_neg


_POLICY_OPTION_NAMES = ("variant", "ratio_level", "delta", "sapo_tau_pos", "sapo_tau_neg")


def _validate_policy(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, agg, weights,
                     variant="ppo", ratio_level="token", delta=None, tau_pos=1.0, tau_neg=1.05,
                     dro_beta=None):
    _check_tokens(logp, "logp", {"old_logp": old_logp, "weights": weights}, advantages)
    clip_low, clip_high, dual_clip, delta, tau_pos, tau_neg, dro_beta = _policy_scalars(
        clip_low, clip_high, dual_clip, agg, variant, ratio_level, delta, tau_pos, tau_neg, dro_beta)
    mask = _mask(mask, logp.shape)
    tensors = [t for t in (logp, old_logp, advantages, mask, weights) if t is not None]
    return (clip_low, clip_high, dual_clip, mask, pick_backend(*tensors),
            dict(variant=variant, level=ratio_level, delta=delta, tau_pos=tau_pos, tau_neg=tau_neg,
                 dro_beta=dro_beta))


@_memoised
def _policy_scalars(clip_low, clip_high, dual_clip, agg, variant, ratio_level, delta, tau_pos, tau_neg,
                    dro_beta) -> tuple:
    clip_low, clip_high = _check_clips(clip_low, clip_high)
    if dual_clip is not None:
        dual_clip = _in_range(dual_clip, "dual_clip", lambda v: v > 1.0, "None or a finite number > 1")
    _check_choice(agg, "agg", POLICY_AGGS)
    delta, tau_pos, tau_neg = _check_variant_options(variant, ratio_level, delta, tau_pos, tau_neg,
                                                     variants=POLICY_VARIANTS, levels=RATIO_LEVELS,
                                                     names=_POLICY_OPTION_NAMES)
    if variant != "ppo" and (dual_clip is not None or delta is not None):
        raise ValueError(f"dual_clip and delta apply to variant='ppo' only, got variant={variant!r}")
    if variant in ("gmpo", "dro") and ratio_level != "token":
        raise ValueError(f"variant={variant!r} has ratio_level='token' only, got {ratio_level!r}")
    if variant == "dro":
        if dro_beta is None:
            raise ValueError("dro_beta must be a finite number > 0 with variant='dro', got None")
        dro_beta = _in_range(dro_beta, "dro_beta", lambda v: v > 0.0, "a finite number > 0")
    elif dro_beta is not None:
        raise ValueError(f"dro_beta applies to variant='dro' only, got variant={variant!r}")
    return clip_low, clip_high, dual_clip, delta, tau_pos, tau_neg, dro_beta


def _policy_reference(logp, old_logp, advantages, mask, *, opts, **kwargs):
    """rlkern.reference's policy_loss, or its variant form when an option is not the default."""
    if opts["variant"] == "ppo" and opts["level"] == "token" and opts["delta"] is None:
        return reference.policy_loss(logp, old_logp, advantages, mask, **kwargs)
    return reference.policy_loss_variant(logp, old_logp, advantages, mask, variant=opts["variant"],
                                         ratio_level=opts["level"], delta=opts["delta"],
                                         sapo_tau_pos=opts["tau_pos"], sapo_tau_neg=opts["tau_neg"],
                                         dro_beta=1.0 if opts["dro_beta"] is None else opts["dro_beta"],
                                         **kwargs)


def _policy_run(logp, old_logp, advantages, mask, weights, *, clip_low, clip_high, dual_clip, agg, backend,
                opts, want_grad=False):
    """_run for policy_loss: gmpo's rollout weights become its row_in (their log row geometric mean) and
    its loss is the mean over rows whatever ``agg`` says (verl); dro's beta is the kernel's beta."""
    opts = dict(opts)
    beta = opts.pop("dro_beta") or 0.0
    if opts["variant"] == "gmpo":
        agg = "luspo"  # sum of the row losses / B
        if weights is not None:
            opts["row_in"] = reference.gmpo_log_weight(weights, mask).contiguous()
            weights = None
    return _run(_POLICY, logp, old_logp, advantages, None, weights, mask, clip_low=clip_low,
                clip_high=clip_high, dual_clip=dual_clip, beta=beta, agg=agg, backend=backend,
                want_grad=want_grad, **opts)


_POLICY_DOC = """PPO-style policy loss (verl ``core_algos.py`` numerics), one fused pass.

    Per valid token, with the importance ratio ``r`` of ``ratio_level`` and ``A`` the advantage, the
    surrogate ``l`` of ``variant``:

    * ``ppo``: ``max(-A r', -A clamp(r, 1 - clip_low, 1 + clip_high))`` with ``r' = min(r, delta)``
      (``delta=None``: ``r``; TRL's INTELLECT-2 two-sided clip); with ``dual_clip = c`` (verl's
      ``clip_ratio_c``), ``l = min(l, -A c)`` where ``A < 0`` (verl ``compute_policy_loss_vanilla``;
      with ``ratio_level="sequence_token"``, verl ``compute_policy_loss_gspo``)
    * ``cispo``: ``-sg(clamp(r, 1 - clip_low, 1 + clip_high)) A logp`` (verl
      ``compute_policy_loss_cispo``)
    * ``cispo_cap``: ``-sg(min(r, clip_high)) A logp``: ``clip_high`` is the absolute cap (TRL / Liger
      ``loss_type="cispo"``, whose ``epsilon_high`` is e.g. 5.0)
    * ``sapo``: ``-sigmoid(tau (r - 1)) 4 / tau A``, ``tau = sapo_tau_pos`` where ``A > 0`` else
      ``sapo_tau_neg`` (verl ``compute_policy_loss_sapo``; verl always aggregates it as
      ``seq-mean-token-mean``, pass that ``agg`` to match it)
    * ``gpg``: ``-A logp`` (verl ``compute_policy_loss_gpg``)
    * ``gmpo``: verl ``compute_policy_loss_geo_mean`` (GMPO), a loss per row:
      ``-mean_b(A) exp(mean_b(m))``, ``m = min(d, clip_high)`` where ``A > 0``, ``max(d, -clip_low)``
      where ``A < 0``, 0 where ``A = 0`` (``d = logp - old_logp`` unclamped; means over the row's
      valid tokens, ``/ (n_b + 1e-8)``), times ``exp(mean_b(log(weights + 1e-10)))`` with ``weights``;
      the loss is the mean over all rows (``agg`` is ignored, as verl ignores ``loss_agg_mode``);
      ``ratio_level="token"`` only. ``clip_frac`` / ``clip_frac_lower``: share of valid tokens with
      ``d`` outside ``[-clip_low, clip_high]`` and ``A > 0`` / ``A < 0`` (verl pg_clipfrac /
      pg_clipfrac_lower); ``approx_kl`` unclamped.
    * ``dro``: ``-A logp + dro_beta / 2 (logp - old_logp)^2`` (verl ``compute_policy_loss_dro``,
      unclamped; ``approx_kl`` unclamped); ``ratio_level="token"`` only.

    ``ratio_level``:

    * ``token``: ``r = exp(clamp(logp - old_logp, -20, 20))``
    * ``sequence``: ``r_b = exp(clamp(s_b, -20, 20))``, ``s_b`` the masked row mean of
      ``logp - old_logp``; the gradient flows through the mean (TRL ``importance_sampling_level=
      "sequence"``)
    * ``sequence_token``: verl GSPO-token, ``exp(min(logp - sg(logp) + sg(s_b), 10))``: the row's
      value, the gradient per token

    Then ``l *= weights`` (per-token importance weights, e.g. truncated IS for rollout/training
    mismatch), aggregated per ``agg``:

    * ``token-mean``: sum / (valid tokens)
    * ``seq-mean-token-sum``: per-row sums, averaged over rows with >= 1 valid token
    * ``seq-mean-token-mean``: per-row means, averaged over rows with >= 1 valid token
    * ``seq-mean-token-sum-norm``: sum / T (verl: the padded length, Dr. GRPO)

    Args:
        logp: ``[..., T]`` float32/bf16/fp16 (float64 runs the reference); the only input with a gradient.
        old_logp: ``[..., T]`` behaviour-policy log-probs.
        advantages: ``[..., T]`` per token, or ``[...]`` per sequence (broadcast over T).
        mask: ``[..., T]``, any dtype, nonzero = valid (module docstring).
        clip_low, clip_high: ratio bounds ``1 - clip_low`` (``clip_low`` in [0, 1)) and ``1 + clip_high``
            (``cispo_cap``: the cap ``clip_high``).
        dual_clip: None (off) or > 1; ``ppo`` only.
        weights: optional ``[..., T]``, constant.
        variant: ``ppo`` | ``cispo`` | ``cispo_cap`` | ``sapo`` | ``gpg`` | ``gmpo`` | ``dro``.
        ratio_level: ``token`` | ``sequence`` | ``sequence_token``.
        delta: None or > 0; ``ppo`` only.
        sapo_tau_pos, sapo_tau_neg: > 0, ``sapo`` only (verl ``tau_pos`` / ``tau_neg``).
        dro_beta: > 0, required with ``dro`` (verl ``policy_loss.dro_beta``), None otherwise.

    Returns:
        ``(loss, stats)``: float32 0-d loss; stats, 0-d float32 tensors: ``clip_frac`` (verl
        ``pg_clipfrac``: share of valid tokens where the clip is active: ``pg2 > pg1`` for ``ppo``,
        ``r != clip(r)`` for ``cispo``, ``r > clip_high and A > 0`` for ``cispo_cap``, 0 for ``sapo``
        and ``gpg``; at ``ratio_level="sequence"`` with per-sequence advantages, the mean over rows of
        each row's share), ``clip_frac_lower`` (dual clip active, verl ``pg_clipfrac_lower``; 0 without
        it), ``approx_kl`` (mean of ``old_logp - logp``, verl ``ppo_kl``: clamped to +-20 at the token
        level, unclamped at the sequence levels as in verl's gspo).

    NaN: a NaN ``logp``, ``old_logp``, ``advantages`` or ``weights`` entry at a valid token makes the
    loss and that token's gradient NaN (at the sequence levels, every token of its row) and the stats it
    feeds; at a masked-out token it is ignored. See the module docstring.
    """


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float = 0.2,
                clip_high: float = 0.2, dual_clip: float | None = None, agg: str = "token-mean",
                weights: Tensor | None = None, variant: str = "ppo", ratio_level: str = "token",
                delta: float | None = None, sapo_tau_pos: float = 1.0,
                sapo_tau_neg: float = 1.05,
                dro_beta: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    clip_low, clip_high, dual_clip, mask, backend, opts = _validate_policy(
        logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, agg, weights, variant, ratio_level,
        delta, sapo_tau_pos, sapo_tau_neg, dro_beta)
    if backend == "torch":
        return _policy_reference(logp, old_logp, advantages, mask, opts=opts, clip_low=clip_low,
                                 clip_high=clip_high, dual_clip=dual_clip, agg=agg, weights=weights)
    loss, stats = _policy_run(logp, old_logp, advantages, mask, weights, clip_low=clip_low,
                              clip_high=clip_high, dual_clip=dual_clip, agg=agg, backend=backend, opts=opts)
    return loss, _policy_stats(stats)


policy_loss.__doc__ = _POLICY_DOC


def policy_loss_and_grad(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                         clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
                         agg: str = "token-mean", weights: Tensor | None = None, variant: str = "ppo",
                         ratio_level: str = "token", delta: float | None = None, sapo_tau_pos: float = 1.0,
                         sapo_tau_neg: float = 1.05,
                         dro_beta: float | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """:func:`policy_loss` as ``(loss, d loss / d logp, stats)``, without autograd: for fused kernels
    that compute ``logp`` themselves and chain this gradient into their own backward. ``d loss / d logp``
    has ``logp``'s shape and dtype and is 0 at masked positions."""
    clip_low, clip_high, dual_clip, mask, backend, opts = _validate_policy(
        logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, agg, weights, variant, ratio_level,
        delta, sapo_tau_pos, sapo_tau_neg, dro_beta)
    if backend == "torch":
        return _reference_with_grad(_policy_reference, logp, old_logp, advantages, mask, opts=opts,
                                    clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg,
                                    weights=weights)
    loss, grad, stats = _policy_run(logp, old_logp, advantages, mask, weights, clip_low=clip_low,
                                    clip_high=clip_high, dual_clip=dual_clip, agg=agg, backend=backend,
                                    opts=opts, want_grad=True)
    return loss, grad, _policy_stats(stats)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float = 0.2,
               agg: str = "token-mean") -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (verl ``compute_value_loss``): per valid token
    ``1/2 max((v - R)^2, (clamp(v, v_old - clip, v_old + clip) - R)^2)``, aggregated per ``agg``
    (the modes of :func:`policy_loss`).

    Args:
        values: ``[..., T]`` float32/bf16/fp16; the only input with a gradient.
        old_values, returns: ``[..., T]``.
        mask: ``[..., T]``, any dtype, nonzero = valid (module docstring).
        clip: > 0, the half-width of the trust region around ``old_values``.

    Returns:
        ``(loss, {"clip_frac": ...})``: float32 0-d tensors; ``clip_frac`` is the share of valid tokens
        where the clipped term is the larger (verl ``vf_clipfrac``).

    NaN: a NaN ``values``, ``old_values`` or ``returns`` entry at a valid token makes the loss, that
    token's gradient and ``clip_frac`` NaN; at a masked-out token it is ignored (module docstring).
    """
    _check_tokens(values, "values", {"old_values": old_values, "returns": returns})
    clip = _in_range(clip, "clip", lambda v: v > 0.0, "a finite number > 0")
    _check_choice(agg, "agg", POLICY_AGGS)
    mask = _mask(mask, values.shape)
    backend = pick_backend(values, old_values, returns, mask)
    if backend == "torch":
        return reference.value_loss(values, old_values, returns, mask, clip=clip, agg=agg)
    loss, stats = _run(_VALUE, values, old_values, returns, None, None, mask, value_clip=clip, agg=agg,
                       backend=backend)
    return loss, {"clip_frac": stats[_CLIPPED]}


def _grpo_stats(stats: Tensor, loss_type: str) -> dict[str, Tensor]:
    # Views of the kernels' vector only (one unbind for all of them; indexing each costs ~1 us, a torch
    # op ~3 us): the region share and the zeros are slots the kernels write.
    s = stats.unbind()
    high, zero = s[_CLIP_HIGH], s[_ZERO]
    if loss_type == "vespo":  # the kernels' clip_high slot holds phi (csrc/losses.cpp)
        return {"kl": s[_K3], "clip_ratio": zero, "clip_ratio_low": zero, "clip_ratio_high": zero,
                "cispo_clip_ratio": zero, "approx_kl": s[_NEG_LOG_RATIO], "phi_seq_mean": high}
    return {"kl": s[_K3], "clip_ratio": s[_CLIP_REGION], "clip_ratio_low": s[_CLIP_LOW],
            "clip_ratio_high": high, "cispo_clip_ratio": high if loss_type == "cispo" else zero,
            "approx_kl": s[_NEG_LOG_RATIO], "phi_seq_mean": zero}


_GRPO_OPTION_NAMES = ("loss_type", "importance_sampling_level", "delta", "sapo_temperature_pos",
                      "sapo_temperature_neg")
_VESPO_NAMES = ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")


def _vespo_options(loss_type, importance_sampling_ratio, vespo, logp) -> dict:
    """vespo's kernel options: row_in (TRL's vLLM IS log-ratios, clamped and summed over each whole row,
    as get_gamma_weights does) and the four gamma constants (finite numbers; TRL clamps the lambdas to
    >= 1e-4 itself). Other loss types take no importance_sampling_ratio (fold it into weights)."""
    if loss_type != "vespo" and importance_sampling_ratio is None:
        return {"vespo": _VESPO_DEFAULTS}  # the other loss types ignore them (as TRL does)
    vespo = tuple(check_finite(v, name) for v, name in zip(vespo, _VESPO_NAMES, strict=True))
    if importance_sampling_ratio is None:
        return {"vespo": vespo}
    if loss_type != "vespo":
        raise ValueError("importance_sampling_ratio is vespo's (folded into phi); the other loss types take "
                         f"TRL's vLLM IS ratios as weights, got loss_type={loss_type!r}")
    check_tensor(importance_sampling_ratio, "importance_sampling_ratio")
    if importance_sampling_ratio.shape != logp.shape:
        raise ValueError(f"importance_sampling_ratio must have shape {tuple(logp.shape)} (the same as logp), "
                         f"got {tuple(importance_sampling_ratio.shape)}")
    return {"vespo": vespo, "row_in": reference.vespo_is_log_sum(importance_sampling_ratio).contiguous()}


@_memoised
def _grpo_scalars(beta, clip_low, clip_high, loss_type, level, delta, tau_pos, tau_neg, max_completion_length,
                  has_ref: bool) -> tuple:
    beta = _in_range(beta, "beta", lambda v: v >= 0.0, "a finite number >= 0")
    if not has_ref and beta != 0.0:
        raise ValueError(f"ref_logp is required when beta != 0 (the KL term reads it), got beta={beta}; "
                         "None means no KL term, as TRL with beta=0 loads no reference model")
    clip_low, clip_high = _check_clips(clip_low, clip_high)
    delta, tau_pos, tau_neg = _check_variant_options(loss_type, level, delta, tau_pos, tau_neg,
                                                     variants=GRPO_LOSS_TYPES, levels=GRPO_IS_LEVELS,
                                                     names=_GRPO_OPTION_NAMES)
    if max_completion_length is not None and check_int(max_completion_length, "max_completion_length") < 1:
        raise ValueError(f"max_completion_length must be None or an int >= 1, got {max_completion_length!r}")
    return beta, clip_low, clip_high, delta, tau_pos, tau_neg


def _validate_grpo(logp, old_logp, ref_logp, advantages, mask, beta, clip_low, clip_high, loss_type,
                   max_completion_length, num_items_in_batch, weights=None, level="token", delta=None,
                   tau_pos=1.0, tau_neg=1.05, is_ratio=None, vespo=_VESPO_DEFAULTS):
    _check_tokens(logp, "logp", {"old_logp": old_logp, "ref_logp": ref_logp, "weights": weights}, advantages)
    beta, clip_low, clip_high, delta, tau_pos, tau_neg = _grpo_scalars(
        beta, clip_low, clip_high, loss_type, level, delta, tau_pos, tau_neg, max_completion_length,
        ref_logp is not None)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError("num_items_in_batch must be a number or a one-element tensor, got shape "
                                 f"{tuple(num_items_in_batch.shape)}")
            num_items_in_batch = num_items_in_batch.item()  # a host number for the kernel (a sync on GPU)
        # 0 is allowed: an all-padding batch (TRL clamps its count to >= 1 and returns loss 0).
        num_items_in_batch = _in_range(num_items_in_batch, "num_items_in_batch", lambda v: v >= 0.0,
                                       "None or a finite number >= 0")
    mask = _mask(mask, logp.shape)
    backend = pick_backend(logp, old_logp, advantages, mask, *(() if ref_logp is None else (ref_logp,)),
                           *(() if weights is None else (weights,)))
    variant = _GRPO_VARIANT.get(loss_type, "ppo")
    # TRL applies delta in the PPO-clip loss types only (it ignores it for cispo and sapo).
    opts = dict(variant=variant, level=level, delta=delta if variant == "ppo" else None, tau_pos=tau_pos,
                tau_neg=tau_neg, **_vespo_options(loss_type, is_ratio, vespo, logp))
    return beta, clip_low, clip_high, num_items_in_batch, mask, backend, opts


def _grpo_reference(logp, old_logp, ref_logp, advantages, mask, *, opts, loss_type, is_ratio=None, **kwargs):
    """rlkern.reference's grpo_loss, or its variant form for the options the first does not have. No
    ``ref_logp`` (beta = 0): ``logp`` itself, whose KL term and its gradient are exactly 0."""
    if ref_logp is None:
        ref_logp = logp.detach()
    if loss_type in reference.GRPO_LOSS_TYPES and opts["level"] == "token" and opts["delta"] is None:
        loss, stats = reference.grpo_loss(logp, old_logp, ref_logp, advantages, mask, loss_type=loss_type,
                                          **kwargs)
        zero = torch.zeros_like(stats["kl"])
        return loss, {**stats, "cispo_clip_ratio": zero, "phi_seq_mean": zero.clone()}
    vespo = dict(zip(_VESPO_NAMES, opts["vespo"], strict=True))
    return reference.grpo_loss_variant(logp, old_logp, ref_logp, advantages, mask, loss_type=loss_type,
                                       importance_sampling_level=opts["level"], delta=opts["delta"],
                                       sapo_temperature_pos=opts["tau_pos"],
                                       sapo_temperature_neg=opts["tau_neg"],
                                       importance_sampling_ratio=is_ratio, **vespo, **kwargs)


def _grpo_run(logp, old_logp, ref_logp, advantages, mask, weights, *, beta, clip_low, clip_high, loss_type,
              max_completion_length, num_items, bc, backend, opts, want_grad):
    return _run(_GRPO_BC if bc else _GRPO, logp, old_logp, advantages, ref_logp, weights, mask,
                clip_low=clip_low, clip_high=clip_high, beta=beta,
                agg=_GRPO_NORMALISER.get(loss_type, loss_type), max_completion_length=max_completion_length,
                num_items_in_batch=num_items, backend=backend, want_grad=want_grad, **opts)


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor, mask: Tensor, *,
              beta: float = 0.04, clip_low: float = 0.2, clip_high: float = 0.2, loss_type: str = "grpo",
              max_completion_length: int | None = None, num_items_in_batch: float | Tensor | None = None,
              use_bias_correction_kl: bool = False, weights: Tensor | None = None,
              importance_sampling_level: str = "token", delta: float | None = None,
              sapo_temperature_pos: float = 1.0,
              sapo_temperature_neg: float = 1.05, importance_sampling_ratio: Tensor | None = None,
              vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
              vespo_lambda_neg: float = 2.0) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss (TRL 1.16 ``trl/trainer/grpo_trainer.py::GRPOTrainer._compute_loss`` numerics).

    Per valid token, with ``coef_1 = r`` the importance ratio of ``importance_sampling_level`` and
    ``d = clamp(ref_logp - logp, -20, 20)``, the surrogate of ``loss_type``:

    * grpo / bnpo / dr_grpo / dapo / luspo: ``l = -min(r' A, clamp(r, 1 - clip_low, 1 + clip_high) A)``,
      ``r' = min(r, delta)`` (``delta=None``: ``r``; INTELLECT-2's two-sided clip)
    * cispo: ``l = -sg(min(r, clip_high)) A logp``: ``clip_high`` is TRL's ``epsilon_high``, an absolute
      cap on the ratio (ScaleRL recommends 5.0)
    * sapo: ``l = -sigmoid(tau (r - 1)) 4 / tau A``, ``tau = sapo_temperature_pos`` where ``A > 0``, else
      ``sapo_temperature_neg``
    * vespo: ``l = -sg(phi) A logp`` (TRL ``get_gamma_weights``): ``log w_b = clamp(sum over the row's
      valid tokens of clamp(logp - old_logp, -20, 20) + sum over ALL its positions of
      clamp(log importance_sampling_ratio, log 1e-8, 20), log 1e-8, 20)``, ``phi = exp(lam + k log w
      - lam w)`` (NaN / inf -> 0), ``(k, lam) = (vespo_k_pos, vespo_lambda_pos)`` where ``A >= 0`` else
      ``(vespo_k_neg, vespo_lambda_neg)``, ``lam`` clamped to >= 1e-4. TRL folds its vLLM IS ratios
      into phi instead of multiplying the loss: pass them as ``importance_sampling_ratio`` (vespo
      only), not in ``weights``. ``phi`` does not depend on ``importance_sampling_level``.

    then ``l = l * weights + beta (e^d - d - 1)`` (times ``r`` with ``use_bias_correction_kl``, TRL's
    default in 1.16: the reference KL importance-weighted by the unclipped ratio; the ``kl`` stat is
    then the mean of ``k3 * r``, as TRL logs it). ``weights`` (``[..., T]``, constant) are TRL's
    ``top_entropy_quantile`` and off-policy masks and its vLLM importance-sampling ratios.

    ``importance_sampling_level``: ``token``: ``r = exp(clamp(logp - old_logp, -20, 20))`` (TRL does not
    clamp the log-ratios; the results are identical whenever they lie in [-20, 20]); ``sequence``
    (GSPO): ``r_b = exp(clamp(s_b, -20, 20))``, ``s_b`` the masked mean of ``logp - old_logp`` over the
    row, with the gradient through the mean.

    Normalised per ``loss_type`` (TRL's names):

    * ``grpo``, ``sapo``: per-sequence mean, then mean over all ``B`` sequences
    * ``bnpo``: sum / (valid tokens in this batch)
    * ``dr_grpo``: sum / (B * max_completion_length), ``max_completion_length`` defaulting to T
    * ``dapo``, ``cispo``, ``vespo``: sum / num_items_in_batch (the global valid-token count when accumulating
      gradients; defaults to this batch's; clamped to >= 1, so an all-padding batch gives 0)
    * ``luspo``: sum / B (TRL: ``(per_token_loss * mask).sum(-1).mean()``)

    Args:
        logp: ``[..., T]`` float32/bf16/fp16; the only input with a gradient.
        old_logp: ``[..., T]``.
        ref_logp: ``[..., T]``, or None with ``beta=0`` (TRL loads no reference model then): no KL
            term, ``kl`` stat 0, and the kernels read no reference log-probs.
        advantages: ``[...]`` per sequence (TRL) or ``[..., T]`` per token.
        mask: ``[..., T]``, any dtype, nonzero = valid (module docstring).
        beta: KL coefficient >= 0 (0 with a ``ref_logp`` still computes the ``kl`` stat).
        importance_sampling_level: ``token`` | ``sequence``.
        delta: None or > 0 (PPO-clip loss types only; TRL ignores it for cispo and sapo).
        sapo_temperature_pos, sapo_temperature_neg: > 0.

    Returns:
        ``(loss, stats)``, float32 0-d tensors; stats: ``kl`` (mean k3), ``clip_ratio`` /
        ``clip_ratio_low`` / ``clip_ratio_high`` (TRL's region / low / high clip shares, on ``min(r,
        delta)``; for cispo ``clip_ratio = clip_ratio_high = cispo_clip_ratio``, ``clip_ratio_low = 0``;
        for sapo 0; at the sequence level with per-sequence advantages, means over the ``B`` rows as TRL
        logs a ``(B, 1)`` flag), ``cispo_clip_ratio`` (share with ``r > clip_high`` and ``A > 0``; 0
        unless cispo), ``approx_kl`` (mean of ``old_logp - logp``; unclamped at the sequence level),
        ``phi_seq_mean`` (vespo: TRL's vespo/phi_seq_mean, the mean of phi over all rows with per-row
        advantages, over valid tokens with per-token ones; 0 otherwise; for vespo the clip ratios are 0).

    NaN: a NaN in any input at a valid token makes the loss and that token's gradient NaN (at the
    sequence level, every token of its row), ``ref_logp`` included even with ``beta = 0``; the stats it
    feeds are NaN; at a masked-out token it is ignored (module docstring).
    """
    beta, clip_low, clip_high, num_items, mask, backend, opts = _validate_grpo(
        logp, old_logp, ref_logp, advantages, mask, beta, clip_low, clip_high, loss_type,
        max_completion_length, num_items_in_batch, weights, importance_sampling_level, delta,
        sapo_temperature_pos, sapo_temperature_neg, importance_sampling_ratio,
        (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg))
    bc = bool(use_bias_correction_kl)
    if backend == "torch":
        return _grpo_reference(logp, old_logp, ref_logp, advantages, mask, opts=opts,
                               is_ratio=importance_sampling_ratio, beta=beta,
                               clip_low=clip_low, clip_high=clip_high, loss_type=loss_type,
                               max_completion_length=max_completion_length, num_items_in_batch=num_items,
                               use_bias_correction_kl=bc, weights=weights)
    loss, stats = _grpo_run(logp, old_logp, ref_logp, advantages, mask, weights, beta=beta, clip_low=clip_low,
                            clip_high=clip_high, loss_type=loss_type,
                            max_completion_length=max_completion_length,
                            num_items=num_items, bc=bc, backend=backend, opts=opts, want_grad=False)
    return loss, _grpo_stats(stats, loss_type)


def grpo_loss_and_grad(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor,
                       mask: Tensor, *,
                       beta: float = 0.04, clip_low: float = 0.2, clip_high: float = 0.2,
                       loss_type: str = "grpo", max_completion_length: int | None = None,
                       num_items_in_batch: float | Tensor | None = None,
                       use_bias_correction_kl: bool = False, weights: Tensor | None = None,
                       importance_sampling_level: str = "token", delta: float | None = None,
                       sapo_temperature_pos: float = 1.0,
                       sapo_temperature_neg: float = 1.05, importance_sampling_ratio: Tensor | None = None,
                       vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
                       vespo_lambda_neg: float = 2.0) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """:func:`grpo_loss` as ``(loss, d loss / d logp, stats)`` without autograd (one forward and one
    backward kernel pass), for fused ops such as ``linear_policy_loss`` that produce ``logp`` from
    hidden states and chain ``d loss / d logp`` into their own backward. The gradient has ``logp``'s
    shape and dtype, is 0 at masked positions, and already includes the ``loss_type`` normalisation."""
    beta, clip_low, clip_high, num_items, mask, backend, opts = _validate_grpo(
        logp, old_logp, ref_logp, advantages, mask, beta, clip_low, clip_high, loss_type,
        max_completion_length, num_items_in_batch, weights, importance_sampling_level, delta,
        sapo_temperature_pos, sapo_temperature_neg, importance_sampling_ratio,
        (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg))
    bc = bool(use_bias_correction_kl)
    if backend == "torch":
        return _reference_with_grad(_grpo_reference, logp, old_logp, ref_logp, advantages, mask, opts=opts,
                                    is_ratio=importance_sampling_ratio, beta=beta, clip_low=clip_low,
                                    clip_high=clip_high, loss_type=loss_type,
                                    max_completion_length=max_completion_length, num_items_in_batch=num_items,
                                    use_bias_correction_kl=bc, weights=weights)
    loss, grad, stats = _grpo_run(logp, old_logp, ref_logp, advantages, mask, weights, beta=beta,
                                  clip_low=clip_low, clip_high=clip_high, loss_type=loss_type,
                                  max_completion_length=max_completion_length, num_items=num_items, bc=bc,
                                  backend=backend, opts=opts, want_grad=True)
    return loss, grad, _grpo_stats(stats, loss_type)
