"""Reverse scans over [rows, T]: masked GAE and REINFORCE++ discounted returns, Triton kernels.

Same recursions and the same entry points as csrc/returns.cpp (see there). The scan is sequential
in t, so a program owns BLOCK_R rows and walks t = T-1 .. 0 with one lane per row: the rows' chains
run side by side. The mask is read in its own dtype (a bool mask as uint8), nonzero = valid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R = 16


@triton.jit
def _nonzero(m):
    """A mask element of any dtype is valid when nonzero. Compared as float32 (exact for 0 / nonzero
    in every mask dtype): Triton's interpreter compares a bfloat16's bits, reading -0.0 as valid."""
    return m.to(tl.float32) != 0


@triton.jit
def _gae_kernel(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, rows, length, gamma, gamma_lam, BLOCK_R: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = row < rows
    base = row * length
    next_value = tl.zeros((BLOCK_R,), tl.float32)
    running = tl.zeros((BLOCK_R,), tl.float32)
    for step in range(0, length):
        i = base + (length - 1 - step)
        v = tl.load(v_ptr + i, mask=live, other=0.0)
        a = (tl.load(r_ptr + i, mask=live, other=0.0) + gamma * next_value - v) + gamma_lam * running
        valid = _nonzero(tl.load(m_ptr + i, mask=live, other=0))
        next_value = tl.where(valid, v, next_value)
        running = tl.where(valid, a, running)
        tl.store(adv_ptr + i, running, mask=live)
        tl.store(ret_ptr + i, running + v, mask=live)


@triton.jit
def _returns_kernel(r_ptr, m_ptr, ret_ptr, rows, length, gamma, BLOCK_R: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = row < rows
    base = row * length
    running = tl.zeros((BLOCK_R,), tl.float32)
    for step in range(0, length):
        i = base + (length - 1 - step)
        run = tl.load(r_ptr + i, mask=live, other=0.0) + gamma * running
        tl.store(ret_ptr + i, run, mask=live)
        running = tl.where(_nonzero(tl.load(m_ptr + i, mask=live, other=0)), run, 0.0)


def _mask_arg(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def gae_fwd(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
            adv: torch.Tensor, ret: torch.Tensor) -> None:
    """rewards, values: contiguous float32 [rows, T]; mask: contiguous [rows, T], any dtype."""
    rows, length = rewards.shape
    if rows == 0 or length == 0:
        return
    # gamma * lam rounded to float32 once, as the C++ kernel and the reference do.
    _gae_kernel[(triton.cdiv(rows, BLOCK_R),)](rewards, values, _mask_arg(mask), adv, ret, rows, length,
                                               gamma, gamma * lam, BLOCK_R=BLOCK_R)


def discounted_returns_fwd(rewards: torch.Tensor, mask: torch.Tensor, gamma: float,
                           ret: torch.Tensor) -> None:
    rows, length = rewards.shape
    if rows == 0 or length == 0:
        return
    _returns_kernel[(triton.cdiv(rows, BLOCK_R),)](rewards, _mask_arg(mask), ret, rows, length, gamma,
                                                   BLOCK_R=BLOCK_R)
