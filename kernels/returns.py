"""Reverse scans over [rows, T]: masked GAE and REINFORCE++ discounted returns, Triton kernels.

Same recursions as csrc/returns.cpp (see there). The scan is sequential in t, so a program owns
BLOCK_R rows and walks t = T-1 .. 0 with one lane per row: the rows' chains run side by side.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R = 16


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
        valid = tl.load(m_ptr + i, mask=live, other=0) != 0
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
        running = tl.where(tl.load(m_ptr + i, mask=live, other=0) != 0, run, 0.0)


def gae_fwd(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gamma_lam: float,
            adv: torch.Tensor, ret: torch.Tensor) -> None:
    """rewards, values: contiguous float32 [rows, T]; mask: contiguous bool [rows, T]."""
    rows, length = rewards.shape
    if rows == 0 or length == 0:
        return
    _gae_kernel[(triton.cdiv(rows, BLOCK_R),)](rewards, values, mask.view(torch.uint8), adv, ret, rows, length,
                                               gamma, gamma_lam, BLOCK_R=BLOCK_R)


def discounted_returns_fwd(rewards: torch.Tensor, mask: torch.Tensor, gamma: float, ret: torch.Tensor) -> None:
    rows, length = rewards.shape
    if rows == 0 or length == 0:
        return
    _returns_kernel[(triton.cdiv(rows, BLOCK_R),)](rewards, mask.view(torch.uint8), ret, rows, length, gamma,
                                                   BLOCK_R=BLOCK_R)
