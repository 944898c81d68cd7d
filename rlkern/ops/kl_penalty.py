"""Token KL estimators and KL reward shaping, fused: ``kl``, ``token_rewards``.

One elementwise pass computes the estimator in fp32 (and one more its gradient); token_rewards
adds the sequence score at each row's last valid token in the same pass. Kernels: csrc/kl_penalty.cpp
(CPU), kernels/kl_penalty.py (Triton), both ``kernels(backend, "kl_penalty")``; estimator codes:
rlkern/codes.py; oracle: rlkern.reference.kl / token_rewards.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlkern import reference
from rlkern.codes import KL_ESTIMATORS
from rlkern.ops._common import check_finite, check_number, check_tensor, new_output, pick_backend, token_mask
from rlkern.ops._registry import kernel_op, kernels

__all__ = ["kl", "token_rewards"]

_VALID_NAMES = reference.KL_ESTIMATORS + tuple(reference.KL_ALIASES)


# Every accepted name -> (canonical name, kernel code of its value, straight-through?).
_PARSED = {alias: (name, KL_ESTIMATORS[name.rstrip("+")], name.endswith("+"))
           for alias, name in [(n, n) for n in reference.KL_ESTIMATORS] + list(reference.KL_ALIASES.items())}


def _parse_estimator(estimator) -> tuple[str, int, bool]:
    """(canonical name, kernel code of its value, straight-through?) or a ValueError listing names."""
    parsed = _PARSED.get(estimator) if isinstance(estimator, str) else None
    if parsed is None:
        raise ValueError(f"estimator must be one of {_VALID_NAMES}, got {estimator!r}")
    return parsed


_NO_CLAMP, _VERL_CLAMP = reference.kl_bounds(None), reference.kl_bounds(True)


def _parse_clamp(clamp) -> tuple[float, float, float]:
    if clamp is None or clamp is False:
        return _NO_CLAMP
    if clamp is True:
        return _VERL_CLAMP
    try:
        ratio_bound, value_bound = (check_number(c, "clamp's bounds") for c in clamp)
    except (TypeError, ValueError):
        raise TypeError(f"clamp must be None, True (verl's (20, 10)) or a pair of numbers (log-ratio bound, "
                        f"value bound), got {clamp!r}") from None
    for what, v in (("log-ratio bound", ratio_bound), ("value bound", value_bound)):
        if torch.compiler.is_compiling():  # eager-only value checks (symbolic floats, Liger #1366)
            break
        if math.isnan(v) or v <= 0:
            raise ValueError(f"clamp's {what} must be > 0 (inf for none), got {v}")
    return reference.kl_bounds(clamp)


def _pair(logp, ref_logp) -> tuple[Tensor, Tensor]:
    check_tensor(logp, "logp")
    check_tensor(ref_logp, "ref_logp")
    if ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp must have logp's shape {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    if logp.dtype != ref_logp.dtype:  # the kernels read both in one storage type
        logp, ref_logp = logp.float(), ref_logp.float()
    return logp.contiguous(), ref_logp.contiguous()


# The registered ops take contiguous logp / ref_logp of one shape and dtype (and, for token_rewards,
# a contiguous mask of that shape in any dtype and float32 scores, one per row).
@kernel_op("kl_fwd")
def _kl_fwd(logp: Tensor, ref_logp: Tensor, estimator: int, straight_through: bool, lo: float, hi: float,
            value_bound: float, backend: str) -> Tensor:
    out = new_output(logp.shape, device=logp.device)
    kernels(backend, "kl_penalty").kl_fwd(logp, ref_logp, estimator, straight_through, lo, hi, value_bound,
                                          out)
    return out


@_kl_fwd.register_fake
def _(logp, *_):
    return logp.new_empty(logp.shape, dtype=torch.float32)


@kernel_op("kl_bwd")
def _kl_bwd(grad: Tensor, logp: Tensor, ref_logp: Tensor, estimator: int, straight_through: bool, lo: float,
            hi: float, value_bound: float, backend: str) -> Tensor:
    out = new_output(logp.shape, device=logp.device, dtype=logp.dtype)
    if grad.numel() > 1 and not any(grad.stride()):
        grad = grad.as_strided((1,), (1,))  # an expanded scalar (the backward of a sum): read it once
    kernels(backend, "kl_penalty").kl_bwd(grad.float().contiguous(), logp, ref_logp, estimator,
                                          straight_through, lo, hi, value_bound, out)
    return out


@_kl_bwd.register_fake
def _(grad, logp, *_):
    return torch.empty_like(logp, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logp, ref_logp, *args = inputs
    ctx.save_for_backward(logp, ref_logp)
    ctx.args = args


def _backward(ctx, grad):
    logp, ref_logp = ctx.saved_tensors
    grad_logp = _kl_bwd(grad, logp, ref_logp, *ctx.args)
    # Every estimator is a function of logp - ref_logp: d/d ref = -d/d logp.
    grad_ref = -grad_logp if ctx.needs_input_grad[1] else None
    return (grad_logp if ctx.needs_input_grad[0] else None), grad_ref, None, None, None, None, None, None


_kl_fwd.register_autograd(_backward, setup_context=_setup_context)


def kl(logp: Tensor, ref_logp: Tensor, estimator: str = "k3", *, clamp=None) -> Tensor:
    """Per-token KL estimate of KL(policy || reference) from sampled tokens' log-probs.

    With r = ref_logp - logp (Schulman, "Approximating KL divergence"):

    * ``"k1"`` (``"kl"``): -r = logp - ref_logp
    * ``"abs"``: |r|
    * ``"k2"`` (``"mse"``): r^2 / 2
    * ``"k3"`` (``"low_var_kl"``): e^r - r - 1, computed as expm1(r) - r (no cancellation near 0)
    * ``"k1+"``, ``"abs+"``, ``"k2+"``, ``"k3+"`` (``"low_var_kl+"`` ...): verl's straight-through
      variants: the value of the named estimator, the gradient of k2 (= logp - ref_logp).

    Args:
        logp, ref_logp: ``[...]`` float32 / bfloat16 / float16 (float64 runs the reference), one shape.
        clamp: k3 only. ``None``: no clamp; ``True``: verl's, the log-ratio to [-20, 20] before the
            exp and the result to [-10, 10]; a pair ``(ratio_bound, value_bound)`` for other bounds
            (``inf`` disables either). The log-ratio entering the exp is always capped at 80, so the
            value and the gradient are finite for any finite input (OpenRLHF PR #1335 fixed a NaN
            gradient from an overflowing exp under a value clamp); where a clamp is active the
            gradient is 0, as torch autograd gives for ``torch.clamp``.

    Returns:
        float32 ``[...]`` (float64 for float64 inputs), differentiable w.r.t. both inputs.

    NaN (every backend): a NaN in ``logp`` or ``ref_logp`` gives a NaN estimate there; its gradient
    is NaN for k2, k3 and the straight-through names, 1 for k1 and 0 for abs (torch's sign(NaN)).
    """
    name, code, straight_through = _parse_estimator(estimator)
    lo, hi, value_bound = _parse_clamp(clamp)
    logp, ref_logp = _pair(logp, ref_logp)
    backend = pick_backend(logp, ref_logp)
    if backend == "torch":
        return reference.kl(logp, ref_logp, name, clamp=clamp)
    return _kl_fwd(logp, ref_logp, code, straight_through, lo, hi, value_bound, backend)


@kernel_op("token_rewards")
def _token_rewards(scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float,
                   estimator: int, lo: float, hi: float, value_bound: float, backend: str) -> Tensor:
    out = new_output(logp.shape, device=logp.device)
    kernels(backend, "kl_penalty").token_rewards_fwd(scores, logp, ref_logp, mask, kl_coef, estimator, lo, hi,
                                                     value_bound, out)
    return out


@_token_rewards.register_fake
def _(scores, logp, *_):
    return logp.new_empty(logp.shape, dtype=torch.float32)


def token_rewards(scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, *, kl_coef: float,
                  estimator: str = "k1", clamp=None) -> Tensor:
    """KL-shaped token rewards (the design note's reward shaping; verl's apply_kl_penalty):

        rewards[..., t] = -kl_coef * kl(logp, ref_logp, estimator)[..., t]   where mask[..., t]
                        + scores[...]                                        at the last t where mask is set

    and 0 at masked-out positions (a select: a non-finite KL on padding does not leak in). A row
    with no valid token gets no score and all-zero rewards.

    Args:
        scores: ``[...]`` sequence scores (one per row of the mask).
        logp, ref_logp: ``[..., T]`` float32 / bfloat16 / float16 (float64 runs the reference).
        mask: ``[..., T]`` which tokens are response tokens: bool, uint8, int32, int64, float32,
            bfloat16 or float16 (other integer / float dtypes are converted), read in its own dtype
            with nonzero = valid (verl's float masks and TRL's int masks cost no conversion pass).
        kl_coef: the KL penalty coefficient (finite).
        estimator, clamp: as for :func:`kl`; a straight-through name gives its value.

    Returns:
        float32 ``[..., T]`` rewards, detached: rewards are data, no gradient flows through them.
    """
    name, code, _ = _parse_estimator(estimator)
    lo, hi, value_bound = _parse_clamp(clamp)
    logp, ref_logp = _pair(logp, ref_logp)
    if logp.dim() == 0:
        raise ValueError("logp must have shape [..., T], got a 0-d tensor")
    mask = token_mask(mask, "mask", logp.shape)
    check_tensor(scores, "scores")
    if scores.shape != logp.shape[:-1]:
        raise ValueError(f"scores must have shape {tuple(logp.shape[:-1])} (one per sequence), "
                         f"got {tuple(scores.shape)}")
    kl_coef = check_finite(kl_coef, "kl_coef")
    scores, logp, ref_logp = scores.detach(), logp.detach(), ref_logp.detach()
    backend = pick_backend(logp, ref_logp, scores)
    if backend == "torch":
        return reference.token_rewards(scores, logp, ref_logp, mask, kl_coef=kl_coef, estimator=name,
                                       clamp=clamp)
    return _token_rewards(scores.float().contiguous(), logp, ref_logp, mask, kl_coef, code, lo, hi,
                          value_bound, backend)
