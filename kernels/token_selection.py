"""KL-Cov token selection and token losses: the GPU side (same names and arguments as
csrc/token_selection.cpp, which documents the maths).

The selection is a handful of torch ops, sync-free: ``torch.topk`` over the flattened covariances
(invalid tokens at -inf) with the width the shape allows, ``max(1, int(numel * ratio))``, which is at
least ``k``; the k-th value read by a tensor index; then every valid token above it plus the first
``k - #above`` tokens equal to it in row-major order (a cumulative count): the C++ kernel's tie rule.
The token losses are Triton kernels: one program per row sums ``l``, ``|d|`` and the count (fp32
accumulators), one program per BLOCK tokens writes the gradient. Offsets are int64. Mask elements are
compared as float32 (exact for 0 / nonzero in every mask dtype; Triton's interpreter cannot compare a
bfloat16 mask directly).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK = 1024


def _flat_bytes(x: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 (Triton loads bytes), flattened."""
    return (x.view(torch.uint8) if x.dtype == torch.bool else x).reshape(-1)


def kl_cov_select(advantages, logp, mask, ratio, chosen):
    valid = (mask != 0).reshape(-1)
    n = torch.count_nonzero(valid)
    a = advantages.reshape(-1).float()
    x = logp.reshape(-1).float()
    # float32 means (the C++ kernel's and verl's): the masked sum, then / n
    mean_a = torch.where(valid, a, 0).sum() / n
    mean_x = torch.where(valid, x, 0).sum() / n
    cov = torch.nan_to_num((a - mean_a) * (x - mean_x), nan=math.inf, posinf=math.inf)
    key = torch.where(valid, cov, -math.inf)
    numel = key.numel()
    width = min(max(1, int(numel * ratio)), numel)
    k = torch.where(n > 0, torch.floor(n.double() * ratio).long().clamp(min=1), 0)
    top = torch.topk(key, width, sorted=True).values
    kth = top.gather(0, (k - 1).clamp(min=0).reshape(1))
    above = valid & (key > kth)
    tied = valid & (key == kth)
    need = k - torch.count_nonzero(above)
    take = above | (tied & (torch.cumsum(tied, 0, dtype=torch.int32) <= need))
    chosen.copy_((take & (k > 0)).view(chosen.shape))


@triton.jit
def _kl_cov_rows_kernel(lp_ptr, old_ptr, adv_ptr, mask_ptr, w_ptr, chosen_ptr, rows_ptr, R, T, coef,
                        HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    base = r.to(tl.int64) * T
    acc_loss = tl.zeros([BLOCK], dtype=tl.float32)
    acc_abs = tl.zeros([BLOCK], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, T, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < T
        at = base + offs
        valid = (tl.load(mask_ptr + at, mask=inside, other=0).to(tl.float32) != 0) & inside
        x = tl.load(lp_ptr + at, mask=valid, other=0.0).to(tl.float32)
        d = x - tl.load(old_ptr + at, mask=valid, other=0.0).to(tl.float32)
        a = tl.load(adv_ptr + at, mask=valid, other=0.0).to(tl.float32)
        tok = -a * tl.exp(d)
        pick = tl.load(chosen_ptr + at, mask=valid, other=0) != 0
        tok = tl.where(pick, tok + coef * tl.abs(d), tok)
        if HAS_W:
            tok = tok * tl.load(w_ptr + at, mask=valid, other=0.0)
        acc_loss += tl.where(valid, tok, 0.0)
        acc_abs += tl.where(valid, tl.abs(d), 0.0)
        acc_n += valid.to(tl.float32)
    tl.store(rows_ptr + r, tl.sum(acc_loss, 0))
    tl.store(rows_ptr + R + r, tl.sum(acc_abs, 0))
    tl.store(rows_ptr + 2 * R + r, tl.sum(acc_n, 0))


@triton.jit
def _kl_cov_bwd_kernel(g_ptr, lp_ptr, old_ptr, adv_ptr, mask_ptr, w_ptr, chosen_ptr, dx_ptr, n, T, coef,
                       HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    valid = (tl.load(mask_ptr + offs, mask=inside, other=0).to(tl.float32) != 0) & inside
    x = tl.load(lp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    d = x - tl.load(old_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    a = tl.load(adv_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs // T, mask=valid, other=0.0)
    if HAS_W:
        g = g * tl.load(w_ptr + offs, mask=valid, other=0.0)
    local = -a * tl.exp(d)
    sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, d))  # torch.sign: 0 at 0, NaN kept
    pick = tl.load(chosen_ptr + offs, mask=valid, other=0) != 0
    local = tl.where(pick, local + coef * sign, local)
    tl.store(dx_ptr + offs, tl.where(valid, g * local, 0.0).to(dx_ptr.dtype.element_ty), mask=inside)


def kl_cov_fwd(logp, old_logp, advantages, mask, weights, ratio, coef, chosen, rows):
    kl_cov_select(advantages, logp, mask, ratio, chosen)
    T = logp.shape[-1]
    R = logp.numel() // T
    if R == 0:
        return
    w = weights if weights is not None else logp  # never read without HAS_W
    block = min(BLOCK, triton.next_power_of_2(T))
    _kl_cov_rows_kernel[(R,)](logp, old_logp, advantages, _flat_bytes(mask), w, _flat_bytes(chosen), rows, R,
                              T, float(coef), HAS_W=weights is not None, BLOCK=block)


def kl_cov_bwd(grad_rows, logp, old_logp, advantages, mask, weights, chosen, coef, grad_logp):
    n = logp.numel()
    if n == 0:
        return
    w = weights if weights is not None else logp
    _kl_cov_bwd_kernel[(triton.cdiv(n, BLOCK),)](grad_rows, logp, old_logp, advantages, _flat_bytes(mask), w,
                                                  _flat_bytes(chosen), grad_logp, n, logp.shape[-1],
                                                  float(coef), HAS_W=weights is not None, BLOCK=BLOCK)
