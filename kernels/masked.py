"""Masked statistics (sum / mean / var / whiten and their gradients): Triton kernels.

The same four entry points as csrc/masked.cpp (see there for the maths), with the same arguments
and results: ``masked_stat_fwd``, ``masked_stat_bwd``, ``masked_whiten_fwd``, ``masked_whiten_bwd``
(each allocates its outputs, NaN-filled when ``poison``). x is
contiguous; ``merge_all`` reduces everything to one statistic, else each row of the last dim. The
mask is x-shaped in any dtype (a bool mask is read as uint8), loaded as it is and compared with 0 (_nonzero).

The data is cut into segments, one row each for per-row statistics or SEGMENT-element runs of the
flat tensor for a global one. A program takes the moments (count, sum, M2 about the segment's own
mean: two passes, the second from cache) of one segment; the launcher merges a global reduction's
segments in float64 with Chan et al.'s formula in its parallel form, M2 = sum_i M2_i + sum_i n_i
(mean_i - mean)^2, and derives the statistics there (a few tiny device ops). Every elementwise pass
(the whitening and all gradients) is one kernel with per-segment coefficients mu, a, b, c (MODE).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

SEGMENT = 4096
BLOCK = 1024
SUM, MEAN, VAR = 0, 1, 2
# Elementwise modes (csrc/masked.cpp, enum Affine): [m] a; [m] b (x - mu); gy c + [m] (a + b (x - mu));
# c + b (x - mu).
MASKED_CONST, MASKED_CENTERED, WHITEN_GRAD, WHITEN = 0, 1, 2, 3


@triton.jit
def _nonzero(m):
    """A mask element of any dtype is valid when nonzero. Compared as float32 (exact for 0 / nonzero
    in every mask dtype): Triton's interpreter compares a bfloat16's bits, reading -0.0 as valid."""
    return m.to(tl.float32) != 0


@triton.jit
def _segment(numel, seg):
    """This program's segment: (its index, first element, one past its last element), int64."""
    pid = tl.program_id(0).to(tl.int64)
    start = pid * seg
    return pid, start, tl.minimum(start + seg, numel)


@triton.jit
def _moments_kernel(x_ptr, m_ptr, n_ptr, s_ptr, m2_ptr, numel, seg, WANT_M2: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid, start, stop = _segment(numel, seg)
    acc_s = tl.zeros((BLOCK,), tl.float32)
    acc_n = tl.zeros((BLOCK,), tl.float32)
    for off in range(start, stop, BLOCK):
        offs = off + tl.arange(0, BLOCK).to(tl.int64)
        valid = _nonzero(tl.load(m_ptr + offs, mask=offs < stop, other=0)) & (offs < stop)
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
            valid = _nonzero(tl.load(m_ptr + offs, mask=offs < stop, other=0)) & (offs < stop)
            d = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32) - mean
            acc_m2 += tl.where(valid, d * d, 0.0)
        tl.store(m2_ptr + pid, tl.sum(acc_m2, axis=0))


@triton.jit
def _dot_kernel(g_ptr, x_ptr, mu_ptr, s1_ptr, s2_ptr, numel, seg, ONE_MEAN: tl.constexpr,
                BLOCK: tl.constexpr):
    pid, start, stop = _segment(numel, seg)
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
def _affine_kernel(x_ptr, m_ptr, g_ptr, k_ptr, out_ptr, numel, seg, stats, MODE: tl.constexpr,
                   BLOCK: tl.constexpr):
    """k_ptr: float32 [4, stats] = (mu, a, b, c) per segment of seg elements."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    row = offs // seg
    mu = tl.load(k_ptr + row, mask=inside, other=0.0)
    a = tl.load(k_ptr + stats + row, mask=inside, other=0.0)
    b = tl.load(k_ptr + 2 * stats + row, mask=inside, other=0.0)
    c = tl.load(k_ptr + 3 * stats + row, mask=inside, other=0.0)
    if MODE == 0:  # MASKED_CONST: never reads x (d sum / d x_j = m_j whatever x_j holds)
        valid = _nonzero(tl.load(m_ptr + offs, mask=inside, other=0))
        out = tl.where(valid, a, 0.0)
    else:
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        if MODE == 3:  # WHITEN
            out = c + b * (x - mu)
        else:
            valid = _nonzero(tl.load(m_ptr + offs, mask=inside, other=0))
            if MODE == 1:  # MASKED_CENTERED
                out = tl.where(valid, b * (x - mu), 0.0)
            else:  # WHITEN_GRAD
                gy = tl.load(g_ptr + offs, mask=inside, other=0.0)
                out = gy * c + tl.where(valid, a + b * (x - mu), 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


def _layout(x: torch.Tensor, merge_all: bool) -> tuple[int, int, int]:
    """(segment length, segments, statistics)."""
    if merge_all:
        return SEGMENT, triton.cdiv(x.numel(), SEGMENT), 1
    length = x.shape[-1]
    rows = x.numel() // length if length else math.prod(x.shape[:-1])
    return max(length, 1), rows, rows


def _mask_arg(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _moments(x: torch.Tensor, mask: torch.Tensor, merge_all: bool, want_m2: bool):
    """float64 (count, sum, M2) per statistic."""
    seg, nseg, _ = _layout(x, merge_all)
    parts = torch.zeros(3, max(nseg, 1), device=x.device, dtype=torch.float32)
    if nseg > 0 and x.numel() > 0:
        _moments_kernel[(nseg,)](x, _mask_arg(mask), parts[0], parts[1], parts[2], x.numel(), seg,
                                 WANT_M2=want_m2, BLOCK=BLOCK)
    n, s, q = parts[:, :nseg].double()
    if merge_all:
        n_all, s_all = n.sum(), s.sum()
        seg_mean = torch.where(n > 0, s / n.clamp(min=1), 0.0)
        q = (q + torch.where(n > 0, n * (seg_mean - s_all / n_all.clamp(min=1)).square(), 0.0)).sum()
        n, s = n_all.reshape(1), s_all.reshape(1)
        q = q.reshape(1)
    return n, s, q


def _new(shape, like: torch.Tensor, dtype: torch.dtype, poison: bool) -> torch.Tensor:
    """An output (NaN-filled when ``poison``: tests then catch an element a kernel forgets to write)."""
    if poison:
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _stat_shape(x: torch.Tensor, merge_all: bool, *lead: int) -> tuple[int, ...]:
    return lead if merge_all else (*lead, *x.shape[:-1])


def _min_count(n: torch.Tensor):
    return n.min() if n.numel() else math.inf


def _apply(x, mask, grad, coef: torch.Tensor, merge_all: bool, mode: int, out: torch.Tensor) -> None:
    numel = x.numel()
    if numel == 0:
        return
    seg, _, stats = _layout(x, merge_all)
    if merge_all:
        seg = numel
    _affine_kernel[(triton.cdiv(numel, BLOCK),)](
        x, _mask_arg(mask) if mask is not None else x, grad if grad is not None else x,
        coef.float().contiguous(), out, numel, seg, stats, MODE=mode, BLOCK=BLOCK)


def masked_stat_fwd(x: torch.Tensor, mask: torch.Tensor, merge_all: bool, kind: int, ddof: int, poison: bool):
    """(statistic float32 [stats], what backward reads float64 [2, stats]: the centring mean and the
    gradient's scale, the smallest selected count: a 0-d device tensor, or inf)."""
    out = _new(_stat_shape(x, merge_all), x, torch.float32, poison)
    saved = _new(_stat_shape(x, merge_all, 2), x, torch.float64, poison)
    n, s, q = _moments(x, mask, merge_all, kind == VAR)
    stat = s if kind == SUM else s / n if kind == MEAN else q / (n - ddof)
    scale = torch.ones_like(n) if kind == SUM else 1 / n if kind == MEAN else 2 / (n - ddof)
    out.copy_(stat.reshape(out.shape))
    saved.copy_(torch.stack([torch.where(n > 0, s / n.clamp(min=1), 0.0), scale]).reshape(saved.shape))
    return out, saved, _min_count(n)


def masked_stat_bwd(grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, saved: torch.Tensor,
                    merge_all: bool, kind: int, poison: bool) -> torch.Tensor:
    """d x (x-shaped, x's dtype) from grad, float32 [stats]."""
    out = _new(x.shape, x, x.dtype, poison)
    mean, scale = saved.reshape(2, -1)
    scaled = grad.reshape(-1).double() * scale
    zero = torch.zeros_like(scaled)
    a, b = (zero, scaled) if kind == VAR else (scaled, zero)
    _apply(x, mask, None, torch.stack([mean, a, b, zero]), merge_all,
           MASKED_CENTERED if kind == VAR else MASKED_CONST, out)
    return out


def masked_whiten_fwd(x: torch.Tensor, mask: torch.Tensor, merge_all: bool, shift_mean: bool, ddof: int,
                      eps: float, poison: bool):
    """(whitened x float32, float64 [4, stats] (mean, rstd, n, n - ddof), the smallest selected count)."""
    out = _new(x.shape, x, torch.float32, poison)
    saved = _new(_stat_shape(x, merge_all, 4), x, torch.float64, poison)
    n, s, q = _moments(x, mask, merge_all, True)
    mean, dof = s / n, n - ddof
    rstd = torch.rsqrt(q / dof + eps)
    saved.copy_(torch.stack([mean, rstd, n, dof]).reshape(saved.shape))
    zero = torch.zeros_like(mean)
    coef = torch.stack([mean, zero, rstd, zero if shift_mean else mean])
    _apply(x, None, None, coef, merge_all, WHITEN, out)
    return out, saved, _min_count(n)


def masked_whiten_bwd(grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, saved: torch.Tensor,
                      merge_all: bool, shift_mean: bool, poison: bool) -> torch.Tensor:
    """d x (x-shaped, x's dtype) from grad, float32 like x."""
    out = _new(x.shape, x, x.dtype, poison)
    mean, rstd, n, dof = saved.reshape(4, -1)
    seg, nseg, _ = _layout(x, merge_all)
    mean32 = mean.float()
    parts = torch.zeros(2, max(nseg, 1), device=x.device, dtype=torch.float32)
    if nseg > 0 and x.numel() > 0:
        _dot_kernel[(nseg,)](grad, x, mean32, parts[0], parts[1], x.numel(), seg, ONE_MEAN=merge_all,
                             BLOCK=BLOCK)
    s1, s2 = parts[:, :nseg].double()
    if merge_all:
        s1, s2 = s1.sum().reshape(1), s2.sum().reshape(1)
    a = s1 * ((0.0 if shift_mean else 1.0) - rstd) / n
    b = -s2 * rstd.pow(3) / dof
    _apply(x, mask, grad, torch.stack([mean, a, b, rstd]), merge_all, WHITEN_GRAD, out)
    return out
