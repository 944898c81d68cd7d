"""PPO / GRPO policy losses and the clipped value loss: Triton kernels (one program per row of T tokens).

Same maths and data flow as csrc/losses.cpp: the forward kernel writes per-row partial sums (loss,
valid count, clip counters, KL sums) in fp32, a one-program combine kernel reduces them in a fixed
order into the loss, the stats and one aggregation scale per row; the backward kernel writes
d x = grad * scale_row * w * d l / d x. Ties in max / min / clamp share the gradient exactly as
torch.maximum / torch.minimum / torch.clamp do. The dual clip is compiled in only when it is on
(HAS_DUAL), so -A * inf never produces a NaN to be discarded.

NaN (issue 9), as rlkern.reference and the C++ kernels: every clamp and max propagates NaN
(tl.maximum / tl.minimum default to returning the non-NaN operand), so a NaN in any input of a valid
token makes its loss and gradient NaN; a clip / dual flag of a token whose clipped surrogate is NaN
counts as NaN (a comparison with NaN is False, which would count the token as unclipped). Masked-out
tokens never contribute: every sum selects with tl.where, never multiplies by the mask.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from rlkern.codes import LOSS_KINDS, LOSS_STATS

# Per-row partial sums: loss, count, then the LOSS_STATS stats: clipped, clip_high, clip_low, dual,
# -log r, k3.
N_PARTIALS = 8
assert N_PARTIALS == 2 + LOSS_STATS
# The kinds (rlkern/codes.py) as constexpr globals. GRPO_BC: grpo with the KL term weighted by the
# importance ratio (TRL's use_bias_correction_kl).
POLICY = tl.constexpr(LOSS_KINDS["policy"])
GRPO = tl.constexpr(LOSS_KINDS["grpo"])
VALUE = tl.constexpr(LOSS_KINDS["value"])
GRPO_BC = tl.constexpr(LOSS_KINDS["grpo_bc"])


@triton.jit
def _max_share(a, b):
    """torch.maximum(a, b)'s backward share for a: 1 if a > b, 1/2 on a tie, else 0."""
    return tl.where(a > b, 1.0, tl.where(a == b, 0.5, 0.0))


@triton.jit
def _max_nan(a, b):
    """torch.maximum: NaN if either operand is NaN."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _clamp_nan(x, lo, hi):
    """torch.clamp: NaN if x or a bound is NaN."""
    low = tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(low, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _flag(cond, probe):
    """cond as 1.0 / 0.0, or NaN where probe (the clipped surrogate) is NaN."""
    return tl.where(probe != probe, probe, tl.where(cond, 1.0, 0.0))  # noqa: PLR0124 (a NaN test)


@triton.jit
def _terms(x, y, a, z, lo, hi, dual, beta, vclip, KIND: tl.constexpr, HAS_DUAL: tl.constexpr):
    """Per-token (loss, d loss / d x, clipped, clip_high, clip_low, dual, -log r, k3, beta d k3 / d x)
    for 16+ lanes: the loss and its gradient without the KL term, which is added after the per-token
    weight (TRL weights the surrogate, not the KL): the token's loss is w * loss + beta * k3."""
    zero = tl.zeros_like(x)
    if KIND == VALUE:  # x = v, y = v_old, a = returns
        vlo = y - vclip
        vhi = y + vclip
        vc = _clamp_nan(x, vlo, vhi)
        vc_pass = tl.where((x >= vlo) & (x <= vhi), 1.0, 0.0)
        e1 = x - a
        e2 = vc - a
        l1 = e1 * e1
        l2 = e2 * e2
        a1 = _max_share(l1, l2)
        loss = 0.5 * _max_nan(l1, l2)
        # The clamp's pass is a select (torch.clamp's backward): an infinite old value or return gives
        # 0 there, not 0 * inf = NaN. A NaN token's gradient is NaN.
        grad = a1 * e1 + tl.where(vc_pass != 0.0, (1.0 - a1) * e2, 0.0)
        grad = tl.where(loss != loss, loss, grad)  # noqa: PLR0124 (a NaN test)
        return loss, grad, _flag(l2 > l1, loss), zero, zero, zero, zero, zero, zero
    else:  # policy / grpo: x = logp, y = old_logp, a = advantage, z = ref_logp
        lr_raw = x - y
        lr = _clamp_nan(lr_raw, -20.0, 20.0)
        lr_pass = tl.where((lr_raw >= -20.0) & (lr_raw <= 20.0), 1.0, 0.0)
        ratio = tl.exp(lr)
        rc = _clamp_nan(ratio, lo, hi)
        rc_pass = tl.where((ratio >= lo) & (ratio <= hi), 1.0, 0.0)
        pg1 = -a * ratio
        pg2 = -a * rc
        a1 = _max_share(pg1, pg2)
        clip1 = _max_nan(pg1, pg2)
        d_clip1 = -a * (a1 + (1.0 - a1) * rc_pass)
        negative = a < 0.0
        loss = clip1
        grad = tl.where(lr_pass != 0.0, d_clip1 * ratio, 0.0)  # a select, as torch.clamp's backward
        dual_on = negative & (a != a)  # all False
        if HAS_DUAL:  # A < 0 only: min(clip1, -A c)
            pg3 = -a * dual
            b1 = _max_share(pg3, clip1)  # torch.minimum's share for clip1
            loss = tl.where(negative & (pg3 < clip1), pg3, clip1)
            grad = tl.where(negative, b1, 1.0) * grad
            dual_on = negative & (clip1 > pg3)
        grad = tl.where(loss != loss, loss, grad)  # noqa: PLR0124 (a NaN token's gradient is NaN)
        k3 = zero
        kl_grad = zero
        if (KIND == GRPO) or (KIND == GRPO_BC):
            d_raw = z - x
            d = _clamp_nan(d_raw, -20.0, 20.0)
            d_pass = tl.where((d_raw >= -20.0) & (d_raw <= 20.0), 1.0, 0.0)
            ed = tl.exp(d)
            k3 = ed - d - 1.0
            d_k3 = (1.0 - ed) * d_pass
            # grpo_bc: k3 r, d/d logp = d_k3 r + k3 r lr_pass; the stat reports k3 r, as TRL's `kl`
            if KIND == GRPO_BC:
                kl_grad = beta * (d_k3 * ratio + k3 * ratio * lr_pass)
                k3 = k3 * ratio
            else:
                kl_grad = beta * d_k3
        high_clip, low_clip = _flag((ratio > hi) & (a > 0.0), clip1), _flag((ratio < lo) & negative, clip1)
        clipped = _flag(pg2 > pg1, clip1)
        return loss, grad, clipped, high_clip, low_clip, _flag(dual_on, clip1), -lr, k3, kl_grad


@triton.jit
def _load_row(x_ptr, y_ptr, a_ptr, z_ptr, w_ptr, m_ptr, row, base, offs, in_row,
              KIND: tl.constexpr, A_PER_ROW: tl.constexpr, HAS_W: tl.constexpr):
    x = tl.load(x_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
    if A_PER_ROW:
        a = tl.zeros_like(x) + tl.load(a_ptr + row).to(tl.float32)
    else:
        a = tl.load(a_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
    z = tl.zeros_like(x)
    if (KIND == GRPO) or (KIND == GRPO_BC):
        z = tl.load(z_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
    w = tl.zeros_like(x) + 1.0
    if HAS_W:
        w = tl.load(w_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
    valid = tl.load(m_ptr + base + offs, mask=in_row, other=0).to(tl.float32) != 0
    return x, y, a, z, w, valid


@triton.jit
def _losses_fwd_kernel(x_ptr, y_ptr, a_ptr, z_ptr, w_ptr, m_ptr, partial_ptr, saved_ptr, length, lo, hi, dual,
                       beta, vclip, KIND: tl.constexpr, A_PER_ROW: tl.constexpr, HAS_W: tl.constexpr,
                       HAS_DUAL: tl.constexpr, SAVE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * length
    acc_loss = tl.zeros([BLOCK], tl.float32)
    acc_n = tl.zeros([BLOCK], tl.float32)
    acc_clipped = tl.zeros([BLOCK], tl.float32)
    acc_high = tl.zeros([BLOCK], tl.float32)
    acc_low = tl.zeros([BLOCK], tl.float32)
    acc_dual = tl.zeros([BLOCK], tl.float32)
    acc_nlr = tl.zeros([BLOCK], tl.float32)
    acc_k3 = tl.zeros([BLOCK], tl.float32)
    for start in range(0, length, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        in_row = offs < length
        x, y, a, z, w, valid = _load_row(x_ptr, y_ptr, a_ptr, z_ptr, w_ptr, m_ptr, row, base, offs, in_row,
                                         KIND, A_PER_ROW, HAS_W)
        loss, grad, clipped, high, low, dual_on, nlr, k3, kl_grad = _terms(x, y, a, z, lo, hi, dual, beta,
                                                                          vclip, KIND, HAS_DUAL)
        if SAVE_GRAD:  # the unscaled per-token gradient, for _losses_bwd_kernel's SAVED mode (same product)
            tl.store(saved_ptr + base + offs, grad * w + kl_grad, mask=in_row)
        loss = loss * w + beta * k3  # w = 1 without weights; k3 = 0 for the policy and value kinds
        # Selects, not products with the mask: padding may hold NaN (the flags are NaN there too).
        acc_loss += tl.where(valid, loss, 0.0)
        acc_n += tl.where(valid, 1.0, 0.0)
        acc_clipped += tl.where(valid, clipped, 0.0)
        acc_high += tl.where(valid, high, 0.0)
        acc_low += tl.where(valid, low, 0.0)
        acc_dual += tl.where(valid, dual_on, 0.0)
        acc_nlr += tl.where(valid, nlr, 0.0)
        acc_k3 += tl.where(valid, k3, 0.0)
    out = partial_ptr + row * 8
    tl.store(out + 0, tl.sum(acc_loss, axis=0))
    tl.store(out + 1, tl.sum(acc_n, axis=0))
    tl.store(out + 2, tl.sum(acc_clipped, axis=0))
    tl.store(out + 3, tl.sum(acc_high, axis=0))
    tl.store(out + 4, tl.sum(acc_low, axis=0))
    tl.store(out + 5, tl.sum(acc_dual, axis=0))
    tl.store(out + 6, tl.sum(acc_nlr, axis=0))
    tl.store(out + 7, tl.sum(acc_k3, axis=0))


@triton.jit
def _losses_combine_kernel(partial_ptr, loss_ptr, stats_ptr, scale_ptr, rows, denom,
                           PER_ROW_MEAN: tl.constexpr, BLOCK_B: tl.constexpr):
    """One program: fixed-order totals over the rows, then the per-row scales and the loss."""
    cols = tl.arange(0, 8)
    sums = tl.zeros([8], tl.float32)
    live = tl.zeros((), tl.float32)
    for start in range(0, rows, BLOCK_B):
        r = start + tl.arange(0, BLOCK_B).to(tl.int64)
        p = tl.load(partial_ptr + r[:, None] * 8 + cols[None, :], mask=(r < rows)[:, None], other=0.0)
        sums += tl.sum(p, axis=0)
        n = tl.load(partial_ptr + r * 8 + 1, mask=r < rows, other=0.0)
        live += tl.sum(tl.where(n > 0, 1.0, 0.0), axis=0)
    tokens = tl.sum(tl.where(cols == 1, sums, 0.0), axis=0)
    d = tl.where(denom > 0, denom, tl.where(denom == -1.0, tokens, live))
    d = tl.maximum(d, 1.0)
    total = tl.zeros((), tl.float32)
    for start in range(0, rows, BLOCK_B):
        r = start + tl.arange(0, BLOCK_B).to(tl.int64)
        in_b = r < rows
        row_loss = tl.load(partial_ptr + r * 8, mask=in_b, other=0.0)
        n = tl.load(partial_ptr + r * 8 + 1, mask=in_b, other=0.0)
        if PER_ROW_MEAN:
            s = 1.0 / tl.maximum(n, 1.0) / d
        else:
            s = tl.zeros_like(n) + 1.0 / d
        tl.store(scale_ptr + r, s, mask=in_b)
        total += tl.sum(tl.where(in_b, s * row_loss, 0.0), axis=0)
    tl.store(loss_ptr, total)
    # stats = partial columns 2..7 (clipped, clip_high, clip_low, dual, -log r, k3) / valid tokens.
    tl.store(stats_ptr + cols - 2, sums / tl.maximum(tokens, 1.0), mask=cols >= 2)


@triton.jit
def _losses_bwd_kernel(grad_ptr, x_ptr, y_ptr, a_ptr, z_ptr, w_ptr, m_ptr, sv_ptr, scale_ptr, out_ptr, length,
                       lo, hi, dual, beta, vclip, KIND: tl.constexpr, A_PER_ROW: tl.constexpr,
                       HAS_W: tl.constexpr, HAS_DUAL: tl.constexpr, SAVED: tl.constexpr, BLOCK: tl.constexpr):
    """d x = grad * scale_row * (d l / d x) where the mask is set, else 0. SAVED: the forward saved the
    unscaled per-token gradient (sv_ptr; the token pointers are not read); otherwise every token's
    terms are evaluated again."""
    row = tl.program_id(0).to(tl.int64)
    base = row * length
    g = tl.load(grad_ptr) * tl.load(scale_ptr + row)
    for start in range(0, length, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        in_row = offs < length
        if SAVED:
            valid = tl.load(m_ptr + base + offs, mask=in_row, other=0).to(tl.float32) != 0
            grad = tl.load(sv_ptr + base + offs, mask=in_row, other=0.0)
        else:
            x, y, a, z, w, valid = _load_row(x_ptr, y_ptr, a_ptr, z_ptr, w_ptr, m_ptr, row, base, offs,
                                             in_row, KIND, A_PER_ROW, HAS_W)
            _, grad, _, _, _, _, _, _, kl_grad = _terms(x, y, a, z, lo, hi, dual, beta, vclip, KIND, HAS_DUAL)
            grad = grad * w + kl_grad
        d = tl.where(valid, g * grad, 0.0)
        tl.store(out_ptr + base + offs, d.to(out_ptr.dtype.element_ty), mask=in_row)


def _block(length: int) -> int:
    return max(16, min(triton.next_power_of_2(max(length, 1)), 1024))


def _launch_args(x, old, adv, ref, weights, mask):
    """[rows, T] views of the [..., T] inputs (the mask in its own dtype, a bool one as uint8), with x
    standing in for an absent ref / weights (the kernel never reads them then)."""
    length = x.shape[-1]
    rows = x.shape[:-1].numel()
    flat = lambda t: t.reshape(rows, length)  # noqa: E731
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    ptrs = (flat(x), flat(old), adv.reshape(rows) if adv.dim() < x.dim() else flat(adv),
            x if ref is None else ref, x if weights is None else weights, m)
    return ptrs, rows, length, adv.dim() < x.dim(), weights is not None


def losses_fwd(x, old, adv, ref, weights, mask, kind, clip_low, clip_high, dual_clip, beta, value_clip,
               per_row_mean, denom, loss, stats, row_scale, saved) -> None:
    """Same contract as the C++ rlkern._C.losses_fwd: contiguous [..., T] inputs (advantages per token
    or per row; ref and weights or None; the mask in any dtype, nonzero = valid), writes loss (0-d),
    stats [LOSS_STATS] and row_scale [...] (all fp32), and, unless saved is None, each token's
    unscaled gradient into saved (fp32, x's shape) for losses_bwd_saved."""
    ptrs, rows, length, a_per_row, has_w = _launch_args(x, old, adv, ref, weights, mask)
    partial = torch.zeros(rows, N_PARTIALS, device=x.device, dtype=torch.float32)
    consts = (1.0 - clip_low, 1.0 + clip_high, dual_clip, beta, value_clip)
    if rows > 0:
        _losses_fwd_kernel[(rows,)](*ptrs, partial, x if saved is None else saved, length, *consts, KIND=kind,
                                    A_PER_ROW=a_per_row, HAS_W=has_w, HAS_DUAL=math.isfinite(dual_clip),
                                    SAVE_GRAD=saved is not None,
                                    # eight accumulators (and the saved gradient) per element: 512-wide
                                    # tiles on 8 warps. 1024 on 4 warps spilled 8 B on sm_80 (grpo_bc)
                                    # and, with Triton 3.4, on sm_90 for int64 / bf16 masks.
                                    BLOCK=min(_block(length), 512), num_warps=8)
    _losses_combine_kernel[(1,)](partial, loss, stats, row_scale, rows, float(denom),
                                 PER_ROW_MEAN=per_row_mean, BLOCK_B=128)


def losses_bwd(grad_loss, x, old, adv, ref, weights, mask, row_scale, kind, clip_low, clip_high, dual_clip,
               beta, value_clip, grad_x) -> None:
    """Same contract as the C++ rlkern._C.losses_bwd: writes d x (x's dtype) into grad_x."""
    ptrs, rows, length, a_per_row, has_w = _launch_args(x, old, adv, ref, weights, mask)
    if rows == 0:
        return
    consts = (1.0 - clip_low, 1.0 + clip_high, dual_clip, beta, value_clip)
    _losses_bwd_kernel[(rows,)](grad_loss, *ptrs, x, row_scale, grad_x, length, *consts, KIND=kind,
                                A_PER_ROW=a_per_row, HAS_W=has_w, HAS_DUAL=math.isfinite(dual_clip),
                                SAVED=False, BLOCK=_block(length),
                                num_warps=8)  # 4 warps: Triton 3.4 spilled (int64 mask)


def losses_bwd_saved(grad_loss, saved, mask, row_scale, grad_x) -> None:
    """Same contract as the C++ rlkern._C.losses_bwd_saved: d x = grad * row_scale * saved where the
    mask is set (0 elsewhere), in grad_x's dtype."""
    length = saved.shape[-1]
    rows = saved.shape[:-1].numel()
    if rows == 0:
        return
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    unread = (saved,) * 5  # the token pointers of the recomputing mode
    _losses_bwd_kernel[(rows,)](grad_loss, *unread, m, saved, row_scale, grad_x, length, *(0.0,) * 5, KIND=0,
                                A_PER_ROW=False, HAS_W=False, HAS_DUAL=False, SAVED=True,
                                BLOCK=_block(length))
