"""Masked statistics (sum / mean / var / whiten and their gradients): Triton kernels.

Same decomposition as csrc/masked.cpp (see there): the data is cut into segments, one row each for
per-row statistics or SEGMENT-element runs of the flat tensor for a global one. A program takes the
moments (count, sum, M2 about the segment's own mean: two passes, the second from cache) of one
segment; the launcher merges a global reduction's segments in float64 with Chan et al.'s pairwise
formula in its parallel form, M2 = sum_i M2_i + sum_i n_i (mean_i - mean)^2. The whitening and all
backward passes are one elementwise kernel out = (gy or 1) * c_r + [m] (a_r + b_r (x - mu_r)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SEGMENT = 4096
BLOCK = 1024


@triton.jit
def _moments_kernel(x_ptr, m_ptr, n_ptr, s_ptr, m2_ptr, numel, seg, WANT_M2: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * seg
    stop = tl.minimum(start + seg, numel)
    acc_s = tl.zeros((BLOCK,), tl.float32)
    acc_n = tl.zeros((BLOCK,), tl.float32)
    for off in range(start, stop, BLOCK):
        offs = off + tl.arange(0, BLOCK).to(tl.int64)
        valid = (tl.load(m_ptr + offs, mask=offs < stop, other=0) != 0) & (offs < stop)
        acc_s += tl.where(valid, tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32), 0.0)
        acc_n += tl.where(valid, 1.0, 0.0)
    count = tl.sum(acc_n, axis=0)
    total = tl.sum(acc_s, axis=0)
    tl.store(n_ptr + pid, count)
    tl.store(s_ptr + pid, total)
    if WANT_M2:
        mean = total / tl.maximum(count, 1.0)
        acc_m2 = tl.zeros((BLOCK,), tl.float32)
        for off in range(start, stop, BLOCK):
            offs = off + tl.arange(0, BLOCK).to(tl.int64)
            valid = (tl.load(m_ptr + offs, mask=offs < stop, other=0) != 0) & (offs < stop)
            d = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32) - mean
            acc_m2 += tl.where(valid, d * d, 0.0)
        tl.store(m2_ptr + pid, tl.sum(acc_m2, axis=0))


@triton.jit
def _dot_kernel(g_ptr, x_ptr, mu_ptr, s1_ptr, s2_ptr, numel, seg, ONE_MEAN: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * seg
    stop = tl.minimum(start + seg, numel)
    if ONE_MEAN:
        mean = tl.load(mu_ptr)
    else:
        mean = tl.load(mu_ptr + pid)
    acc1 = tl.zeros((BLOCK,), tl.float32)
    acc2 = tl.zeros((BLOCK,), tl.float32)
    for off in range(start, stop, BLOCK):
        offs = off + tl.arange(0, BLOCK).to(tl.int64)
        inside = offs < stop
        g = tl.load(g_ptr + offs, mask=inside, other=0.0)
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        acc1 += g
        acc2 += tl.where(inside, g * (x - mean), 0.0)
    tl.store(s1_ptr + pid, tl.sum(acc1, axis=0))
    tl.store(s2_ptr + pid, tl.sum(acc2, axis=0))


@triton.jit
def _affine_kernel(x_ptr, m_ptr, g_ptr, mu_ptr, a_ptr, b_ptr, c_ptr, out_ptr, numel, seg, HAS_MASK: tl.constexpr,
                   HAS_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    row = offs // seg
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    mu = tl.load(mu_ptr + row, mask=inside, other=0.0)
    affine = tl.load(a_ptr + row, mask=inside, other=0.0) + tl.load(b_ptr + row, mask=inside, other=0.0) * (x - mu)
    if HAS_MASK:
        affine = tl.where(tl.load(m_ptr + offs, mask=inside, other=0) != 0, affine, 0.0)
    c = tl.load(c_ptr + row, mask=inside, other=0.0)
    if HAS_GRAD:
        c = c * tl.load(g_ptr + offs, mask=inside, other=0.0)
    tl.store(out_ptr + offs, (c + affine).to(out_ptr.dtype.element_ty), mask=inside)


def _segments(x: torch.Tensor, merge_all: bool) -> tuple[int, int]:
    if merge_all:
        return SEGMENT, triton.cdiv(x.numel(), SEGMENT)
    rows, length = x.shape
    return max(length, 1), rows


def masked_moments(x: torch.Tensor, mask: torch.Tensor, merge_all: bool, want_m2: bool, count: torch.Tensor,
                   total: torch.Tensor, m2: torch.Tensor) -> None:
    """x: contiguous ([rows, N] unless merge_all); mask: bool like x. Writes float64 count, sum and
    M2 per row, or of everything (one element each) when merge_all."""
    seg, nseg = _segments(x, merge_all)
    parts = torch.zeros(3, max(nseg, 1), device=x.device, dtype=torch.float32)
    if nseg > 0 and x.numel() > 0:
        _moments_kernel[(nseg,)](x, mask.view(torch.uint8), parts[0], parts[1], parts[2], x.numel(), seg,
                                 WANT_M2=want_m2, BLOCK=BLOCK)
    n, s, q = parts[:, :nseg].double()
    if merge_all:
        n_all, s_all = n.sum(), s.sum()
        seg_mean = torch.where(n > 0, s / n.clamp(min=1), 0.0)
        mean = s_all / n_all.clamp(min=1)
        q = (q + torch.where(n > 0, n * (seg_mean - mean).square(), 0.0)).sum()
        n, s = n_all, s_all
    count.copy_(n.reshape(count.shape))
    total.copy_(s.reshape(total.shape))
    m2.copy_(q.reshape(m2.shape))


def masked_dot(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, merge_all: bool, s1: torch.Tensor,
               s2: torch.Tensor) -> None:
    """Per segment (or in total): S1 = sum grad, S2 = sum grad (x - mean), written as float64."""
    seg, nseg = _segments(x, merge_all)
    parts = torch.zeros(2, max(nseg, 1), device=x.device, dtype=torch.float32)
    if nseg > 0 and x.numel() > 0:
        _dot_kernel[(nseg,)](grad, x, mean, parts[0], parts[1], x.numel(), seg, ONE_MEAN=merge_all, BLOCK=BLOCK)
    a, b = parts[:, :nseg].double()
    if merge_all:
        a, b = a.sum(), b.sum()
    s1.copy_(a.reshape(s1.shape))
    s2.copy_(b.reshape(s2.shape))


def masked_affine(x: torch.Tensor, mask: torch.Tensor | None, grad: torch.Tensor | None, mu: torch.Tensor,
                  a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, merge_all: bool, out: torch.Tensor) -> None:
    """out = (grad or 1) * c + [mask] (a + b (x - mu)), coefficients per row (or one when merge_all)."""
    numel = x.numel()
    if numel == 0:
        return
    seg = numel if merge_all else max(x.shape[1], 1)
    _affine_kernel[(triton.cdiv(numel, BLOCK),)](
        x, mask.view(torch.uint8) if mask is not None else x, grad if grad is not None else x, mu, a, b, c, out,
        numel, seg, HAS_MASK=mask is not None, HAS_GRAD=grad is not None, BLOCK=BLOCK)
