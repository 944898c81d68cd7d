"""Reverse scans over token tensors: ``gae`` (masked GAE) and ``discounted_returns`` (REINFORCE++).

One pass from the last token to the first, fp32, every row independent; the mask is read in its
own dtype, nonzero = valid. Advantages and returns are targets, not functions to differentiate: the
outputs are detached (inputs that require grad are read, never differentiated). Kernels:
csrc/returns.cpp (CPU), kernels/returns.py (Triton), the same entry points; oracle:
rlkern.reference.gae / discounted_returns.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlkern import reference
from rlkern.ops._common import check_number, check_tensor, new_output, pick_backend, token_mask
from rlkern.ops._registry import kernel_op, kernels

__all__ = ["gae", "discounted_returns"]


def _check_discount(value, name: str) -> float:
    value = check_number(value, name)
    if not torch.compiler.is_compiling() and not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def _rows(x: Tensor) -> Tensor:
    """[..., T] as the kernels' contiguous float32 [rows, T] (a view when it already is one)."""
    return x.reshape(-1, x.shape[-1]).float().contiguous()


@kernel_op("gae")
def _gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float,
         backend: str) -> tuple[Tensor, Tensor]:
    adv = new_output(rewards.shape, device=rewards.device)
    ret = new_output(rewards.shape, device=rewards.device)
    if rewards.numel():
        length = rewards.shape[-1]
        kernels(backend, "returns").gae_fwd(_rows(rewards), _rows(values), mask.reshape(-1, length), gamma,
                                            lam, adv.view(-1, length), ret.view(-1, length))
    return adv, ret


@_gae.register_fake
def _(rewards, values, mask, gamma, lam, backend):
    new = lambda: rewards.new_empty(rewards.shape, dtype=torch.float32)  # noqa: E731
    return new(), new()


@kernel_op("discounted_returns")
def _discounted_returns(rewards: Tensor, mask: Tensor, gamma: float, backend: str) -> Tensor:
    ret = new_output(rewards.shape, device=rewards.device)
    if rewards.numel():
        length = rewards.shape[-1]
        kernels(backend, "returns").discounted_returns_fwd(_rows(rewards), mask.reshape(-1, length), gamma,
                                                           ret.view(-1, length))
    return ret


@_discounted_returns.register_fake
def _(rewards, mask, gamma, backend):
    return rewards.new_empty(rewards.shape, dtype=torch.float32)


def _check_tokens(x, name: str, shape=None) -> Tensor:
    check_tensor(x, name)
    if x.dim() == 0:
        raise ValueError(f"{name} must have shape [..., T], got a 0-d tensor")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x.detach()


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation with verl's masking (compute_gae_advantage_return):

        walking t = T-1 .. 0 with next_value = running = 0:
        delta = rewards_t + gamma * next_value - values_t
        a = delta + gamma * lam * running
        where mask_t: next_value = values_t, running = a      (else both carry through)
        advantages_t = running,   returns_t = advantages_t + values_t

    A masked position (padding, or a tool/observation token inside a multi-turn response) takes no
    part in the recursion: it holds the running advantage of the next valid token, and the valid
    token before it bootstraps from the next valid token's value, so gaps are skipped exactly.
    Unlike verl's function, the advantages are not whitened: compose with :func:`masked_whiten`.

    Args:
        rewards, values: ``[..., T]`` float32 / bfloat16 / float16 (float64 runs the reference).
        mask: ``[..., T]``, any real dtype (bool, uint8, int32, int64, float32, bfloat16 and float16
            are read as they are, without a conversion pass): nonzero = valid, so 2.0 and NaN select
            and 0 and -0.0 do not. RLKERN_STRICT_MASKS=1 refuses anything but 0 and 1.
        gamma, lam: discount and GAE lambda, each in [0, 1].

    Returns:
        ``(advantages, returns)``, float32 ``[..., T]`` (float64 for float64 inputs), detached.
    """
    rewards = _check_tokens(rewards, "rewards")
    values = _check_tokens(values, "values", rewards.shape)
    mask = token_mask(mask, "mask", rewards.shape)
    gamma, lam = _check_discount(gamma, "gamma"), _check_discount(lam, "lam")
    backend = pick_backend(rewards, values)
    if backend == "torch":
        return reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
    return _gae(rewards, values, mask, gamma, lam, backend)


def discounted_returns(rewards: Tensor, mask: Tensor, *, gamma: float) -> Tensor:
    """REINFORCE++ discounted returns (verl's compute_reinforce_plus_plus_outcome_advantage, before
    its whitening), resetting after the end of each sequence:

        walking t = T-1 .. 0 with running = 0:
        running = rewards_t + gamma * running;  returns_t = running;  running = 0 where not mask_t

    so a valid token's return sums only the rewards of its own sequence's valid suffix, and a
    padding position holds its own reward plus the return that follows it.

    Args:
        rewards: ``[..., T]`` float32 / bfloat16 / float16 (float64 runs the reference).
        mask: ``[..., T]``, any real dtype, nonzero = valid (as :func:`gae`).
        gamma: discount in [0, 1].

    Returns:
        float32 ``[..., T]`` returns (float64 for float64 input), detached.
    """
    rewards = _check_tokens(rewards, "rewards")
    mask = token_mask(mask, "mask", rewards.shape)
    gamma = _check_discount(gamma, "gamma")
    backend = pick_backend(rewards)
    if backend == "torch":
        return reference.discounted_returns(rewards, mask, gamma=gamma)
    return _discounted_returns(rewards, mask, gamma, backend)
